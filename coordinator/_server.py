"""`slowllm-coordinator`: one WebSocket port for nodes and clients, and the remote chain over the nodes.

The coordinator owns the model's ends (tokenizer, embeddings, final norm, LM head) and runs every client
job with the same job code as local mode, over `RemoteChain`: activations go to each node of a route in
turn (nodes dial in, so the coordinator is the hub) and come back. Jobs run in worker threads; the
event loop only moves frames, so a slow job never blocks another client or a node's heartbeat.
`GET /status` (HTML) and `GET /status.json` are served on the same port.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Iterator

import torch
import websockets

from slowllm.node import Checkpoint, default_max_ram
from slowllm.node._checkpoint import EMBEDDING
from slowllm.node._units import format_ranges
from slowllm.protocol import (
    PROTOCOL_VERSION, Auth, BusyError, Challenge, Error, Event, Heartbeat, Hello, InputError,
    Job, JobResult, Limits, ProtocolError, Register, Result, SlowllmError, UnavailableError, Welcome,
    WireTensor, decode_tensor, encode_tensor, error_from_reply, new_nonce, pack, unpack, verify,
)

from ._ends import ModelEnds
from ._jobs import Sampling
from ._remote import RemoteChain
from ._runner import Runner
from ._softprompt import check_soft_prompt
from ._status_page import render_status
from ._tune import TuneOptions

log = logging.getLogger("slowllm.coordinator")


@dataclass(eq=False)
class NodeLink:
    """A registered node and its in-flight requests."""

    ws: object
    name: str
    first: int
    last: int
    device: str
    dtype: str
    speed: float
    load: int = 0
    sessions: int = 0
    assigned: int = 0  # requests the coordinator has in flight on this node
    pending: dict = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    since: float = field(default_factory=time.time)
    failures: int = 0
    avoid_until: float = 0.0  # monotonic time until which the router prefers other nodes

    async def request(self, make, timeout: float | None = None):
        msg_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        self.assigned += 1
        async def exchange():
            await self.ws.send(pack(make(msg_id)))
            return await future

        try:  # the send is inside the timeout too: a hung node may have stopped reading
            return await asyncio.wait_for(exchange(), timeout)
        except websockets.ConnectionClosed:
            raise UnavailableError(f"node {self.name} disconnected during the request; retry the job.") from None
        finally:
            self.pending.pop(msg_id, None)
            self.assigned -= 1

    def resolve(self, msg) -> None:
        future = self.pending.get(msg.id)
        if future is None or future.done():
            return
        if isinstance(msg, Error):
            future.set_exception(error_from_reply(msg.code, f"node {self.name}: {msg.message}"))
        else:
            future.set_result(msg.tensor)

    def fail_all(self) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(UnavailableError(f"node {self.name} disconnected; retry the job."))


class Coordinator:
    def __init__(self, model: str, *, host: str = "127.0.0.1", port: int = 8765, secret: bytes | None = None,
                 wait_for_nodes: float = 60.0, limits: Limits = Limits(), ssl_context=None,
                 request_timeout: float = 120.0, max_jobs_per_client: int = 8, max_jobs: int = 32):
        self.checkpoint = Checkpoint(model)
        self.model = model
        self.fingerprint = self.checkpoint.fingerprint()
        resident = self.checkpoint.nbytes([EMBEDDING]) < default_max_ram() // 2
        self.ends = ModelEnds(self.checkpoint, resident_embedding=resident)
        self.host, self.port, self.secret = host, port, secret
        self.wait_for_nodes, self.limits, self.ssl = wait_for_nodes, limits, ssl_context
        self.request_timeout = request_timeout
        self.max_jobs_per_client, self.max_jobs = max_jobs_per_client, max_jobs
        self.jobs_by_client: dict[str, int] = {}
        self.failovers = 0  # hops retried on another node after a failure or timeout
        self.replayed_bytes = 0  # session inputs re-sent to rebuild replacement nodes' KV caches
        self.sessions: set = set()  # open RemoteSessions (their spans say which nodes hold their caches)
        self.nodes: list[NodeLink] = []
        self.jobs = ThreadPoolExecutor(max_workers=max_jobs, thread_name_prefix="slowllm-job")
        self.active_jobs = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._coverage_changed: asyncio.Event | None = None

    # ---- serving -------------------------------------------------------------------------------
    async def serve(self, ready=None) -> None:
        self.loop = asyncio.get_running_loop()
        self._coverage_changed = asyncio.Event()
        # no permessage-deflate: activations do not compress, and zlib on megabytes costs more than the wire
        async with websockets.serve(self._handler, self.host, self.port, max_size=self.limits.max_frame, compression=None,
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
            hello = unpack(await ws.recv(), self.limits)
            if not isinstance(hello, Hello):
                raise ProtocolError("the first message must be 'hello'.")
            if hello.version != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {hello.version} is not supported (this coordinator speaks "
                                    f"{PROTOCOL_VERSION}): upgrade slowllm on both sides.")
            nonce = new_nonce()
            await ws.send(pack(Challenge(version=PROTOCOL_VERSION, nonce=nonce, auth_required=self.secret is not None,
                                         model=self.model, fingerprint=self.fingerprint,
                                         n_layer=self.checkpoint.n_layer)))
            auth = unpack(await ws.recv(), self.limits)
            if not isinstance(auth, Auth):
                raise ProtocolError("expected 'auth' after the challenge.")
            verify(self.secret, nonce, hello.role, auth.mac)
            await ws.send(pack(Welcome(info={"fingerprint": self.fingerprint, "model": self.model})))
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
        except websockets.ConnectionClosed:
            pass

    async def _node(self, ws, hello: Hello) -> None:
        reg = unpack(await ws.recv(), self.limits)
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
        link = NodeLink(ws, reg.name or hello.name or f"node-{len(self.nodes)}", reg.first, reg.last, reg.device,
                        reg.dtype, reg.speed)
        await ws.send(pack(Welcome(info={"registered": [reg.first, reg.last]})))
        self.nodes.append(link)
        self._coverage_changed.set()
        log.info("node %s registered blocks %d-%d", link.name, link.first, link.last)
        try:
            async for frame in ws:
                try:
                    msg = unpack(frame, self.limits)
                except ProtocolError as e:
                    await ws.send(pack(Error(code=e.code, message=str(e))))
                    continue
                if isinstance(msg, Heartbeat):
                    link.load, link.sessions = msg.load, msg.sessions
                elif isinstance(msg, (Result, Error)) and msg.id is not None:
                    link.resolve(msg)
        finally:
            self.nodes.remove(link)
            link.fail_all()
            log.info("node %s left", link.name)

    async def _client(self, ws) -> None:
        lock = asyncio.Lock()

        async def send(msg) -> None:
            async with lock:
                await ws.send(pack(msg))

        tasks = set()
        async for frame in ws:
            try:
                msg = unpack(frame, self.limits)
                if not isinstance(msg, Job):
                    raise ProtocolError(f"a client may send 'job' messages only, not {msg.type!r}.")
            except ProtocolError as e:
                await send(Error(code=e.code, message=str(e)))
                continue
            task = asyncio.create_task(self._run_job(msg, send, _peer(ws)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _admit(self, client: str) -> None:
        """Admission control: a bounded number of jobs per client address and in all."""
        if self.active_jobs >= self.max_jobs:
            raise BusyError(f"the coordinator is busy with {self.active_jobs} jobs; retry in 5 s.")
        if self.jobs_by_client.get(client, 0) >= self.max_jobs_per_client:
            raise BusyError(f"busy: {self.max_jobs_per_client} of your jobs are already running; retry in 5 s "
                            "(or when one finishes).")

    async def _run_job(self, job: Job, send, client: str = "") -> None:
        loop = asyncio.get_running_loop()

        def emit(data: dict) -> None:
            asyncio.run_coroutine_threadsafe(send(Event(id=job.id, data=data)), loop)

        try:
            if job.job == "status":
                data = self.status()
            else:
                self._admit(client)
                self.active_jobs += 1
                self.jobs_by_client[client] = self.jobs_by_client.get(client, 0) + 1
                try:
                    data = await loop.run_in_executor(self.jobs, self._job_in_thread, job, emit)
                finally:
                    self.active_jobs -= 1
                    self.jobs_by_client[client] -= 1
                    if not self.jobs_by_client[client]:
                        del self.jobs_by_client[client]
            await send(JobResult(id=job.id, data=data))
        except SlowllmError as e:
            await send(Error(id=job.id, code=e.code, message=str(e)))
        except websockets.ConnectionClosed:
            pass
        except Exception as e:
            log.exception("job failed")
            await send(Error(id=job.id, code="internal", message=f"the job failed: {type(e).__name__}: {e}"))

    # ---- jobs (worker threads) -----------------------------------------------------------------
    def _job_in_thread(self, job: Job, emit) -> dict:
        p = job.params
        compression = p.get("compression", "raw")
        if compression not in ("raw", "fp16", "bf16", "int8"):
            raise InputError(f"unknown compression {compression!r}: use raw, fp16, bf16 or int8.")
        chain = RemoteChain(self, compression=compression, notify=lambda text: emit({"notice": text}))
        runner = Runner(self.checkpoint, self.ends, chain)
        try:
            soft = self._soft_prompt(p.get("soft_prompt"))
            if job.job == "generate":
                sampling = Sampling(**_pick(p, "max_new_tokens", "temperature", "top_k", "top_p", "seed"))
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
            options = TuneOptions(**_pick(p, "prompt_tokens", "steps", "lr", "batch_size", "seed"))
            data = p.get("data")
            if not isinstance(data, list):
                raise InputError("tune needs a list of {context, continuation} objects.")
            if p.get("send_prompt"):  # the client saves every N steps, and the latest on Ctrl-C
                losses: dict = {}
                prompt = runner.tune(data, options, on_step=lambda step, loss: losses.update({step: loss}),
                                     on_prompt=lambda step, t: emit({"step": step, "loss": losses.pop(step),
                                                                     "prompt": encode_tensor(t).model_dump(),
                                                                     "fingerprint": self.fingerprint}))
            else:
                prompt = runner.tune(data, options, on_step=lambda step, loss: emit({"step": step, "loss": loss}))
            return {"prompt": encode_tensor(prompt).model_dump(), "fingerprint": self.fingerprint}
        except TypeError as e:
            raise InputError(f"bad job parameters: {e}.") from None

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

    # ---- routing -------------------------------------------------------------------------------
    def missing(self, first: int = 0, last: int | None = None, exclude: set = frozenset()) -> list[int]:
        last = self.checkpoint.n_layer - 1 if last is None else last
        covered = set()
        for node in self.nodes:
            if node not in exclude:
                covered.update(range(node.first, node.last + 1))
        return [b for b in range(first, last + 1) if b not in covered]

    def route(self, first: int = 0, last: int | None = None,
              exclude: set = frozenset()) -> list[tuple[NodeLink, int, int]]:
        """Spans covering blocks first..last: healthy nodes, then fewest hops, less loaded, faster nodes.

        Greedy from `first`: among nodes holding the next needed block, prefer those that have not failed
        recently, then the one reaching furthest; ties go to the least busy, then the fastest, so sessions
        spread over redundant nodes. Nodes in `exclude` (failed during this operation) are never used.
        """
        last = self.checkpoint.n_layer - 1 if last is None else last
        spans, block, now = [], first, time.monotonic()
        while block <= last:
            holders = [x for x in self.nodes if x.first <= block <= x.last and x not in exclude]
            if not holders:
                raise UnavailableError(f"no node serves block {block}")
            best = max(holders, key=lambda x: (x.avoid_until <= now, min(x.last, last),
                                               -(x.assigned + x.load), x.speed))
            spans.append((best, block, min(best.last, last)))
            block = best.last + 1
        return spans

    async def wait_route(self, first: int = 0, last: int | None = None, exclude: set = frozenset(),
                         notify=None) -> list[tuple[NodeLink, int, int]]:
        """`route`, after waiting up to --wait-for-nodes for missing blocks; `notify(text)` tells the client
        what it is waiting for (at once, then every 15 s), so a waiting job is never silent."""
        deadline = time.monotonic() + self.wait_for_nodes
        told = None
        while True:
            missing = self.missing(first, last, exclude)
            if not missing:
                return self.route(first, last, exclude)
            left = deadline - time.monotonic()
            if notify is not None and left > 0 and (told is None or time.monotonic() - told >= 15):
                told = time.monotonic()
                notify(f"waiting up to {left:.0f} s for a node serving blocks {format_ranges(missing)}")
            if left <= 0:
                raise UnavailableError(f"no node serves blocks {format_ranges(missing)} (waited "
                                       f"{self.wait_for_nodes:.0f} s): start nodes covering them.")
            self._coverage_changed.clear()
            try:
                await asyncio.wait_for(self._coverage_changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def penalize(self, node: NodeLink) -> None:
        """A node that failed or timed out is avoided by the router for a while, longer each time."""
        node.failures += 1
        node.avoid_until = time.monotonic() + min(5.0 * 2 ** (node.failures - 1), 300.0)

    def status(self) -> dict:
        return {
            "model": self.model, "n_layer": self.checkpoint.n_layer, "fingerprint": self.fingerprint,
            "nodes": [{"name": x.name, "layers": [x.first, x.last], "device": x.device, "dtype": x.dtype,
                       "speed": round(x.speed, 1), "load": x.load + x.assigned,
                       "sessions": sum(any(s.node is x for s in session.spans) for session in list(self.sessions)),
                       "node_sessions": x.sessions, "failures": x.failures,
                       "connected_for_s": round(time.time() - x.since, 1)}
                      for x in sorted(self.nodes, key=lambda x: (x.first, x.last, x.name))],
            "missing": self.missing(), "active_jobs": self.active_jobs, "sessions": len(self.sessions),
            "failovers": self.failovers, "replayed_bytes": self.replayed_bytes,
        }


def _peer(ws) -> str:
    address = getattr(ws, "remote_address", None)
    return str(address[0]) if address else ""


def _pick(params: dict, *names: str) -> dict:
    return {k: params[k] for k in names if params.get(k) is not None}
