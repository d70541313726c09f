"""`slowllm-coordinator`: one WebSocket port for nodes and clients, and the remote chain over the nodes.

The coordinator owns the model's ends (tokenizer, embeddings, final norm, LM head) and runs every client
job with the same job code as local mode, over `RemoteChain`: activations go to each node of a route in
turn (nodes dial in, so the coordinator is the hub) and come back. Jobs run in worker threads; the
event loop only moves frames, so a slow job never blocks another client or a node's heartbeat.
`GET /status` (HTML) and `GET /status.json` are served on the same port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import torch
import websockets

from slowllm.node import Checkpoint, default_max_ram
from slowllm.node._checkpoint import EMBEDDING
from slowllm.protocol import (
    PROTOCOL_VERSION, Auth, BusyError, Challenge, Error, Event, Heartbeat, Hello, InputError, Job, JobResult, Limits,
    ProtocolError, Register, SlowllmError, Welcome, WireTensor, decode_tensor, encode_tensor, new_nonce, pack, peek,
    unpack, verify,
)

from ._ends import ModelEnds
from ._jobs import Sampling
from ._remote import RemoteChain
from ._router import NodeLink, Router
from ._runner import Runner
from ._softprompt import check_soft_prompt
from ._status_page import render_status
from ._tune import TuneOptions

log = logging.getLogger("slowllm.coordinator")
HANDSHAKE_TIMEOUT = 10.0  # seconds a peer has for each handshake message
HANDSHAKE_FRAME = 1 << 20  # bytes a frame may have before authentication


class Coordinator:
    def __init__(self, model: str, *, host: str = "127.0.0.1", port: int = 8765, secret: bytes | None = None,
                 wait_for_nodes: float = 60.0, limits: Limits = Limits(), ssl_context=None,
                 request_timeout: float = 120.0, max_jobs_per_client: int = 8, max_jobs: int = 32,
                 max_new_tokens: int = 4096):
        self.checkpoint = Checkpoint(model)
        self.model = model
        self.fingerprint = self.checkpoint.fingerprint()
        resident = self.checkpoint.nbytes([EMBEDDING]) < default_max_ram() // 2
        self.ends = ModelEnds(self.checkpoint, resident_embedding=resident)
        self.host, self.port, self.secret = host, port, secret
        self.limits, self.ssl = limits, ssl_context
        self.max_jobs_per_client, self.max_jobs, self.max_new_tokens = max_jobs_per_client, max_jobs, max_new_tokens
        self.router = Router(self.checkpoint.n_layer, wait_for_nodes=wait_for_nodes, request_timeout=request_timeout)
        self.jobs = ThreadPoolExecutor(max_workers=max_jobs, thread_name_prefix="slowllm-job")
        # admission state: the event loop's alone (changed only in `_run_job`)
        self.jobs_by_client: dict[str, int] = {}
        self.active_jobs = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- serving -------------------------------------------------------------------------------
    async def serve(self, ready=None) -> None:
        self.loop = asyncio.get_running_loop()
        self.router.start(self.loop)
        # no permessage-deflate: activations do not compress, and zlib on megabytes costs more than the wire
        # Before authentication a peer may send only small frames (a stranger cannot pin hundreds of MB);
        # after it, the --max-message-size limit applies.
        async with websockets.serve(self._handler, self.host, self.port, max_size=HANDSHAKE_FRAME, compression=None,
                                    process_request=self._http, ssl=self.ssl) as server:
            port = server.sockets[0].getsockname()[1]
            self.port = port
            scheme = "wss" if self.ssl else "ws"
            http = "https" if self.ssl else "http"
            print(f"slowllm coordinator ready at {scheme}://{self.host}:{port} (model {self.model}, "
                  f"{self.checkpoint.n_layer} blocks); status page: {http}://{self.host}:{port}/status", flush=True)
            if ready is not None:
                ready(port)
            await asyncio.Future()

    def _http(self, connection, request):
        path = request.path.split("?")[0]
        if request.headers.get("Upgrade", "").lower() == "websocket" and path not in ("/status", "/status.json"):
            return None  # a WebSocket handshake: nodes and clients
        if path == "/":  # a person who typed the coordinator's address into a browser
            response = connection.respond(HTTPStatus.FOUND, "see /status\n")
            response.headers["Location"] = "/status"
            return response
        if path not in ("/status", "/status.json"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found: this port serves /status, /status.json and "
                                      "slowllm's WebSocket protocol\n")
        status = self.status()
        if path == "/status.json":
            response = connection.respond(HTTPStatus.OK, json.dumps(status))
            response.headers["Content-Type"] = "application/json"
        else:
            response = connection.respond(HTTPStatus.OK, render_status(status))
            response.headers["Content-Type"] = "text/html; charset=utf-8"
        return response

    async def _handler(self, ws) -> None:
        try:
            hello = unpack(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT), self.limits)
            if not isinstance(hello, Hello):
                raise ProtocolError("the first message must be 'hello'.")
            if hello.version != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {hello.version} is not supported (this coordinator speaks "
                                    f"{PROTOCOL_VERSION}): upgrade slowllm on both sides.")
            nonce = new_nonce()
            await ws.send(pack(Challenge(version=PROTOCOL_VERSION, nonce=nonce, auth_required=self.secret is not None,
                                         model=self.model, fingerprint=self.fingerprint,
                                         n_layer=self.checkpoint.n_layer)))
            auth = unpack(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT), self.limits)
            if not isinstance(auth, Auth):
                raise ProtocolError("expected 'auth' after the challenge.")
            verify(self.secret, nonce, hello.role, auth.mac)
            ws.protocol.max_message_size = self.limits.max_frame
            await ws.send(pack(Welcome(info={"fingerprint": self.fingerprint, "model": self.model,
                                             "max_message_size": self.limits.max_frame,
                                             "max_new_tokens": self.max_new_tokens})))
            if hello.role == "node":
                await self._node(ws, hello)
            else:
                await self._client(ws)
        except SlowllmError as e:
            try:
                await ws.send(pack(Error(code=e.code, message=str(e))))
                await ws.close(1008 if e.code in ("auth", "protocol") else 1000, str(e)[:120])
            except websockets.ConnectionClosed:
                pass
        except (websockets.ConnectionClosed, asyncio.TimeoutError):
            pass

    async def _node(self, ws, hello: Hello) -> None:
        reg = unpack(await asyncio.wait_for(ws.recv(), 600), self.limits)  # a node may first load its blocks
        if not isinstance(reg, Register):
            raise ProtocolError("a node must send 'register' after authenticating.")
        n = self.checkpoint.n_layer
        if not 0 <= reg.first <= reg.last < n:
            raise InputError(f"node {reg.name or hello.name} claims blocks {reg.first}-{reg.last}, outside this "
                             f"model's 0-{n - 1}: pick a range inside it.")
        if reg.fingerprint != self.fingerprint:
            raise SlowllmError(f"node {reg.name or hello.name} has a different checkpoint than the coordinator's "
                               f"{self.model} (fingerprint {reg.fingerprint} != {self.fingerprint}): use the same model.",
                               code="bad_checkpoint")
        link = NodeLink(ws, reg.name or hello.name or f"node-{len(self.router.nodes)}", reg.first, reg.last,
                        reg.device, reg.dtype, reg.speed)
        await ws.send(pack(Welcome(info={"registered": [reg.first, reg.last]})))
        self.router.add(link)
        log.info("node %s registered blocks %d-%d", link.name, link.first, link.last)
        try:
            async for frame in ws:
                try:  # replies are routed by id; the waiting job's thread unpacks and checks them
                    kind, msg_id = peek(frame)
                    if kind in ("result", "error") and msg_id is not None:
                        link.resolve(msg_id, frame)
                        continue
                    msg = unpack(frame, self.limits)
                except ProtocolError as e:
                    await ws.send(pack(Error(code=e.code, message=str(e))))
                    continue
                if isinstance(msg, Heartbeat):
                    link.load, link.sessions = msg.load, msg.sessions
        finally:
            self.router.remove(link)
            log.info("node %s left", link.name)

    async def _client(self, ws) -> None:
        lock = asyncio.Lock()

        async def send(msg) -> None:
            async with lock:
                await ws.send(pack(msg))

        cancels: set[threading.Event] = set()
        try:
            async for frame in ws:
                try:
                    msg = unpack(frame, self.limits)
                    if not isinstance(msg, Job):
                        raise ProtocolError(f"a client may send 'job' messages only, not {msg.type!r}.")
                except ProtocolError as e:
                    await send(Error(code=e.code, message=str(e)))
                    continue
                cancel = threading.Event()
                cancels.add(cancel)
                task = asyncio.create_task(self._run_job(msg, send, _peer(ws), cancel))
                task.add_done_callback(lambda _, c=cancel: cancels.discard(c))
        finally:
            # The client went away: its jobs stop at their next hop (within a fraction of a second), close
            # their node sessions and give back their admission slots.
            for cancel in cancels:
                cancel.set()

    def _admit(self, client: str) -> None:
        """Admission control: a bounded number of jobs per client address and in all."""
        if self.active_jobs >= self.max_jobs:
            raise BusyError(f"the coordinator is busy with {self.active_jobs} jobs; retry in 5 s.")
        if self.jobs_by_client.get(client, 0) >= self.max_jobs_per_client:
            raise BusyError(f"busy: {self.max_jobs_per_client} of your jobs are already running; retry in 5 s "
                            "(or when one finishes).")

    async def _run_job(self, job: Job, send, client: str = "", cancel: threading.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        cancel = cancel or threading.Event()

        def emit(data: dict) -> None:
            if not cancel.is_set():
                asyncio.run_coroutine_threadsafe(send(Event(id=job.id, data=data)), loop)

        try:
            if job.job == "status":
                data = self.status()
            else:
                self._admit(client)
                self.active_jobs += 1
                self.jobs_by_client[client] = self.jobs_by_client.get(client, 0) + 1
                try:
                    data = await loop.run_in_executor(self.jobs, self._job_in_thread, job, emit, cancel)
                finally:
                    self.active_jobs -= 1
                    self.jobs_by_client[client] -= 1
                    if not self.jobs_by_client[client]:
                        del self.jobs_by_client[client]
            await send(JobResult(id=job.id, data=data))
        except SlowllmError as e:
            if not cancel.is_set():
                await send(Error(id=job.id, code=e.code, message=str(e)))
        except websockets.ConnectionClosed:
            pass
        except Exception as e:
            log.exception("job failed")
            await send(Error(id=job.id, code="internal", message=f"the job failed: {type(e).__name__} (a bug in "
                                                                  "slowllm: the coordinator's log has the details)."))

    # ---- jobs (worker threads) -----------------------------------------------------------------
    def _job_in_thread(self, job: Job, emit, cancel: threading.Event) -> dict:
        p = job.params
        compression = p.get("compression", "raw")
        if compression not in ("raw", "fp16", "bf16", "int8"):
            raise InputError(f"unknown compression {compression!r}: use raw, fp16, bf16 or int8.")
        chain = RemoteChain(self.router, self.limits, self.checkpoint.hidden_size, compression=compression,
                            notify=lambda text: emit({"notice": text}), cancel=cancel)
        runner = Runner(self.checkpoint, self.ends, chain)
        soft = self._soft_prompt(p.get("soft_prompt"))
        if job.job == "generate":
            sampling = _options(Sampling, p, "max_new_tokens", "temperature", "top_k", "top_p", "seed")
            sampling.check()
            if sampling.max_new_tokens > self.max_new_tokens:
                raise InputError(f"max_new_tokens {sampling.max_new_tokens} exceeds this coordinator's limit of "
                                 f"{self.max_new_tokens} (--max-new-tokens): ask for fewer.")
            prompts = p.get("prompts")
            if not (isinstance(prompts, list) and prompts and all(isinstance(x, str) for x in prompts)):
                raise InputError("generate needs a non-empty list of string prompts.")
            results = runner.generate(prompts, sampling, soft_prompt=soft,
                                      on_text=lambda i, text: emit({"prompt": i, "text": text}))
            return {"results": results}
        if job.job == "score":
            requests = p.get("requests")
            if not isinstance(requests, list) or not requests:
                raise InputError("score needs a non-empty list of requests.")
            return {"results": runner.score(requests, soft_prompt=soft)}
        options = _options(TuneOptions, p, "prompt_tokens", "steps", "lr", "batch_size", "seed")
        options.check()
        data = p.get("data")
        if not isinstance(data, list):
            raise InputError("tune needs a list of {context, continuation} objects.")
        if p.get("send_prompt"):  # the client saves every N steps, and the latest on Ctrl-C
            prompts: dict = {}
            prompt = runner.tune(data, options, on_prompt=lambda step, t: prompts.update({step: t}),
                                 on_step=lambda step, loss: emit({"step": step, "loss": loss,
                                                                  "prompt": encode_tensor(prompts.pop(step)).model_dump(),
                                                                  "fingerprint": self.fingerprint}))
        else:
            prompt = runner.tune(data, options, on_step=lambda step, loss: emit({"step": step, "loss": loss}))
        return {"prompt": encode_tensor(prompt).model_dump(), "fingerprint": self.fingerprint}

    def _soft_prompt(self, value) -> torch.Tensor | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InputError("soft_prompt must be an object with 'tensor' and 'meta'.")
        try:
            tensor = decode_tensor(WireTensor.model_validate(value.get("tensor")), self.limits)
        except Exception:
            raise InputError("soft_prompt tensor is malformed.") from None
        return check_soft_prompt(tensor, value.get("meta") or {}, self.fingerprint, self.checkpoint.hidden_size,
                                 str((value.get("meta") or {}).get("source", "")))

    def status(self) -> dict:
        return {
            "model": self.model, "n_layer": self.checkpoint.n_layer, "fingerprint": self.fingerprint,
            "nodes": self.router.node_status(), "missing": self.router.missing(), "active_jobs": self.active_jobs,
            "sessions": len(self.router.sessions()), "failovers": self.router.failovers,
            "replayed_bytes": self.router.replayed_bytes, "max_message_size": self.limits.max_frame,
        }


def _peer(ws) -> str:
    address = getattr(ws, "remote_address", None)
    return str(address[0]) if address else ""


def _options(cls, params: dict, *names: str):
    """Job options from a client's params; a wrong name or type is one sentence, not an internal error."""
    values = {k: params[k] for k in names if params.get(k) is not None}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"job parameter {key!r} must be a number, not {type(value).__name__}.")
    try:
        return cls(**values)
    except TypeError as e:
        raise InputError(f"bad job parameters: {e}.") from None
