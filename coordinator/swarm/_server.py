"""`slowllm-coordinator`: one WebSocket port for nodes and clients, and the remote chain over the nodes.

The coordinator owns the model's ends (tokenizer, embeddings, final norm, LM head) and runs every client
job with the same job code as local mode, over `RemoteChain`: activations go to each node of a route in
turn (nodes dial in, so the coordinator is the hub) and come back. Jobs run in worker threads; the
event loop only moves frames, so a slow job never blocks another client or a node's heartbeat.
`GET /status` (HTML) and `GET /status.json` are served on the same port.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import websockets

from slowllm.coordinator.jobs._ends import ModelEnds
from slowllm.coordinator.jobs._speculative import load_draft
from slowllm.coordinator.scheduler._stepper import Stepper
from slowllm.node import Checkpoint, default_max_ram
from slowllm.protocol import (AuthError, CoordinatorHandshake, Error, Event, Heartbeat, InputError, Job, JobResult,
                              Limits, ProtocolError, Register, SlowllmError, Welcome, pack, peek, printable)
from slowllm.utils._units import format_span

from ._admission import Admission
from ._jobs import CoordinatorJobs
from ._keys import KeyRing, is_loopback
from ._links import NodeLink
from ._router import Router
from ._status_page import render_status
from ._verify import Referee

log = logging.getLogger("slowllm.coordinator")
# Nodes joining, leaving, refused and banned: what an operator watches, logged without -v (_server_cli.py)
nodes_log = logging.getLogger("slowllm.nodes")
HANDSHAKE_TIMEOUT = 10.0  # seconds a peer has for each handshake message
HANDSHAKE_FRAME = 1 << 20  # bytes a frame may have before authentication


class Coordinator(CoordinatorJobs):
    def __init__(self, model: str, *, host: str = "127.0.0.1", port: int = 8765, secret: bytes | None = None,
                 wait_for_nodes: float = 60.0, limits: Limits = Limits(), ssl_context=None,
                 request_timeout: float = 120.0, max_jobs_per_client: int = 8, max_jobs: int = 32,
                 max_new_tokens: int = 4096, client_keys: str | None = None, public_status: bool = False,
                 verify: float = 0.05, draft_model: str | None = None, draft_tokens: int = 4,
                 http_port: int | None = None, soft_prompts: str | None = None, chat_template: str | None = None,
                 max_prompt_tokens: int = 16384, max_request_bytes: int | None = None):
        self.checkpoint = Checkpoint(model)
        self.model = model
        self.fingerprint = self.checkpoint.fingerprint()
        resident = self.checkpoint.nbytes([self.checkpoint.embedding_key, self.checkpoint.head_key]) < default_max_ram() // 2
        self.ends = ModelEnds(self.checkpoint, resident_embedding=resident)
        # the draft runs here, in RAM beside the ends: its tokens cost no network hop
        self.draft_model = draft_model
        self.draft = None if draft_model is None else load_draft(draft_model, self.checkpoint, dtype=None,
                                                                 tokens=draft_tokens)
        self.host, self.port, self.secret = host, port, secret
        self.keys = KeyRing(secret, client_keys)
        self.public_status = public_status or is_loopback(host) or self.keys.open
        self.limits, self.ssl = limits, ssl_context
        self.max_jobs_per_client, self.max_jobs, self.max_new_tokens = max_jobs_per_client, max_jobs, max_new_tokens
        self.router = Router(self.checkpoint.n_layer, wait_for_nodes=wait_for_nodes, request_timeout=request_timeout)
        self.stepper = Stepper()  # every generation's steps, from every client, advance in its waves
        self._job_numbers = itertools.count(1)
        self.router.verify = verify
        self.referee = Referee(self.checkpoint)
        if verify > 0:  # the referee checks each node's first hop: import its blocks' code (~3 s) now, aside
            threading.Thread(target=_import_blocks, daemon=True, name="slowllm-import").start()
        self.jobs = ThreadPoolExecutor(max_workers=max_jobs, thread_name_prefix="slowllm-job")
        # hashing blocks to check nodes' weight digests: one at a time (each reads a block from disk)
        self.digests = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowllm-digests")
        # admission state: the event loop's alone (changed only in `_run_job`)
        self.admission = Admission(max_jobs, max_jobs_per_client)  # the WebSocket jobs' and the HTTP API's
        self.clients: dict = {}  # client connection -> (user, key), to close those whose key is revoked
        self.loop: asyncio.AbstractEventLoop | None = None
        self.http_port = http_port
        self.http_options = {"soft_prompts": soft_prompts, "chat_template": chat_template,
                             "max_prompt_tokens": max_prompt_tokens, "max_request_bytes": max_request_bytes}

    # ---- serving -------------------------------------------------------------------------------
    async def serve(self, ready=None) -> None:
        self.loop = asyncio.get_running_loop()
        self.router.start(self.loop)
        try:  # `kill -HUP` reloads --client-keys (the file is also re-read when it changes)
            self.loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            pass  # not the main thread, or no SIGHUP (Windows): the file-change check still works
        # no permessage-deflate: activations do not compress, and zlib on megabytes costs more than the wire
        # Before authentication a peer may send only small frames (a stranger cannot pin hundreds of MB);
        # after it, the --max-message-size limit applies.
        async with websockets.serve(self._handler, self.host, self.port, max_size=HANDSHAKE_FRAME, compression=None,
                                    process_request=self._http, ssl=self.ssl) as server:
            port = server.sockets[0].getsockname()[1]
            self.port = port
            if self.http_port is not None:  # listening before "ready": whoever waits for that line may use it
                await self._serve_http()
            self._key_watcher = asyncio.ensure_future(self._watch_keys())  # (referenced: never collected)
            scheme = "wss" if self.ssl else "ws"
            http = "https" if self.ssl else "http"
            print(f"slowllm coordinator ready at {scheme}://{self.host}:{port} (model {self.model}, "
                  f"{self.checkpoint.n_layer} blocks); status page: {http}://{self.host}:{port}/status", flush=True)
            if ready is not None:
                ready(port)
            await asyncio.Future()

    async def _serve_http(self) -> None:
        """The OpenAI-compatible API on --http-port, in this event loop, over the same nodes."""
        from slowllm.coordinator.api._app import make_app, server
        from slowllm.coordinator.api._backends import SwarmBackend

        http = server(make_app(SwarmBackend(self), **self.http_options), self.host, self.http_port, embedded=True)
        self._http_task = asyncio.ensure_future(http.serve())
        while not http.started:
            if self._http_task.done():
                self._http_task.result()  # raises why it could not start (port taken...)
                raise SlowllmError(f"the HTTP API could not listen on {self.host}:{self.http_port}.")
            await asyncio.sleep(0.02)
        port = http.servers[0].sockets[0].getsockname()[1]
        print(f"slowllm coordinator: OpenAI-compatible API at http://{self.host}:{port}/v1", flush=True)

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
        if not self.public_status and not self._status_allowed(request.headers.get("Authorization", "")):
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "this coordinator's status needs a key: send "
                                          "`Authorization: Bearer KEY` (a client key or the node secret), or log "
                                          "in with any user name and the key as password\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="slowllm", charset="UTF-8"'
            return response
        status = self.status()
        if path == "/status.json":
            response = connection.respond(HTTPStatus.OK, json.dumps(status))
            response.headers["Content-Type"] = "application/json"
        else:
            response = connection.respond(HTTPStatus.OK, render_status(status))
            response.headers["Content-Type"] = "text/html; charset=utf-8"
        return response

    def _keys_for(self, role: str):
        if self.keys.maybe_reload():  # the file changed: revoke what it no longer lists
            self._close_revoked()
        return self.keys.keys(role)

    async def _watch_keys(self, every: float = 2.0) -> None:
        """Re-read --client-keys when the file changes (a `stat` every 2 s), not only at the next handshake:
        a revoked user's open connection is closed within seconds of the edit."""
        while self.keys.path is not None:
            await asyncio.sleep(every)
            try:
                if self.keys.maybe_reload():
                    self._close_revoked()
            except Exception as e:  # a file being rewritten: the next look will do
                log.warning("--client-keys could not be re-read: %s", e)

    def reload_keys(self) -> None:
        """SIGHUP: read --client-keys again and close the connections of revoked keys."""
        self.keys.reload()
        self._close_revoked()

    def _close_revoked(self) -> None:
        for ws, (user, key) in list(self.clients.items()):
            if not self.keys.valid("client", user, key):
                log.warning("client key of %s revoked: closing its connection", user)
                asyncio.ensure_future(ws.close(1008, "key revoked"))

    def _welcome_info(self) -> dict:
        # A hub id is public and a node without --model may fetch it; a local path is this machine's
        # business (a node never opens a local path it was not given, so it is not even sent).
        return {"fingerprint": self.fingerprint, "model": self.model if self.checkpoint.is_hub else None,
                "max_message_size": self.limits.max_frame, "max_new_tokens": self.max_new_tokens}

    async def _handler(self, ws) -> None:
        hs = CoordinatorHandshake(None if self.keys.open else self._keys_for, self.fingerprint,
                                  self.checkpoint.n_layer)
        channel = None
        try:
            await ws.send(hs.on_hello(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT)))
            welcome = hs.on_auth(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT), self._welcome_info())
            channel = hs.channel
            ws.protocol.max_message_size = self.limits.max_frame  # authenticated: the big limit applies
            await ws.send(welcome)
            if hs.role == "node":
                await self._node(ws, hs)
            else:
                self.clients[ws] = (hs.user, hs.key)
                try:
                    await self._client(ws, hs)
                finally:
                    self.clients.pop(ws, None)
        except SlowllmError as e:
            if hs.role == "node":
                nodes_log.info("refused a node from %s: %s", _peer(ws), e)
            try:
                frame = pack(Error(code=e.code, message=str(e)))
                await ws.send(channel.seal(frame) if channel is not None else frame)
                await ws.close(1008 if e.code in ("auth", "protocol", "banned") else 1000, close_reason(str(e)))
            except websockets.ConnectionClosed:
                pass
        except (websockets.ConnectionClosed, asyncio.TimeoutError):
            pass

    async def _check_digests(self, name: str, reg: Register) -> bool:
        """The node's per-block weight digests against this checkpoint's (`node/engine/_digests.py`, cached; hashed
        off the event loop the first time). A differing block is refused; False when some block cannot be
        checked here (its files are not local: a hub id this coordinator never downloaded)."""
        from slowllm.node.engine._digests import block_digests

        layers = range(reg.first, reg.last + 1)
        if len(reg.digests) != len(layers):
            raise SlowllmError(f"node {name} sent {len(reg.digests)} weight digests for {len(layers)} blocks: "
                               "upgrade slowllm on the node.", code="bad_checkpoint")
        refs = await asyncio.get_running_loop().run_in_executor(
            self.digests, lambda: block_digests(self.checkpoint, layers, reg.quantization == "int8", local_only=True))
        for layer, theirs, ours in zip(layers, reg.digests, refs):
            if ours is not None and theirs != ours:
                what = "an int8 copy made by `slowllm quantize` from" if reg.quantization == "int8" else "a copy of"
                raise SlowllmError(f"node {name}'s weights differ from the coordinator's from block {layer} on (another "
                                   f"fine-tune, seed or a damaged copy): start it with {what} the coordinator's "
                                   "model.", code="bad_checkpoint")
        return None not in refs

    async def _node(self, ws, hs) -> None:
        channel, address = hs.channel, _peer(ws)
        reg = channel.unpack(await asyncio.wait_for(ws.recv(), 600), self.limits)  # a node may first load its blocks
        if not isinstance(reg, Register):
            raise ProtocolError("a node must send 'register' after authenticating.")
        name = printable(reg.name or hs.hello.name or f"node-{reg.first}-{reg.last}", 64)
        taken = {x.name for x in self.router.nodes}
        if name in taken:  # two nodes must be told apart (status, bans): the newcomer gets a suffix
            name = next(f"{name[:60]}#{i}" for i in range(2, 10_000) if f"{name[:60]}#{i}" not in taken)
        n = self.checkpoint.n_layer
        if not 0 <= reg.first <= reg.last < n:
            raise InputError(f"node {name} claims blocks {reg.first}-{reg.last}, outside this "
                             f"model's 0-{n - 1}: pick a range inside it.")
        if reg.fingerprint != self.fingerprint:
            raise SlowllmError(f"node {name} has a different checkpoint than the coordinator's "
                               f"(fingerprint {printable(reg.fingerprint, 64)} != {self.fingerprint}): use the same "
                               "model.", code="bad_checkpoint")
        if self.router.is_banned(name, address):
            raise SlowllmError(f"node {name} was banned by this coordinator (it returned wrong results); fix or "
                               "replace it, and ask the coordinator's operator to restart it.", code="banned")
        proven = await self._check_digests(name, reg)
        link = NodeLink(ws, name, reg.first, reg.last, printable(reg.device, 32), printable(reg.dtype, 32),
                        reg.speed, channel=channel, address=address, quantization=reg.quantization,
                        weights_proven=proven)
        await ws.send(channel.pack(Welcome(info={"registered": [reg.first, reg.last]})))
        self.router.add(link)
        nodes_log.info("node %s joined from %s: blocks %s, %s/%s%s", link.name, address, format_span(link.first, link.last),
                       link.device, link.dtype, "+int8" if reg.quantization == "int8" else "")
        try:
            async for frame in ws:
                try:  # replies are routed by id; the waiting job's thread authenticates, unpacks and checks them
                    kind, msg_id = peek(channel.body(frame))
                    if kind in ("result", "results", "error") and msg_id is not None:
                        link.resolve(msg_id, frame)
                        continue
                    msg = channel.unpack(frame, self.limits)
                except AuthError:  # altered on the way: nothing more from this link can be trusted
                    await ws.close(1008, "frame authentication failed")
                    break
                except ProtocolError as e:
                    await ws.send(channel.pack(Error(code=e.code, message=str(e))))
                    continue
                if isinstance(msg, Heartbeat):
                    link.load, link.sessions = msg.load, msg.sessions
                    link.queue, link.batch, link.rows = msg.queue, msg.batch, msg.rows
        finally:
            self.router.remove(link)
            if not link.banned:
                nodes_log.info("node %s left (blocks %s)", link.name, format_span(link.first, link.last))

    async def _client(self, ws, hs) -> None:
        channel = hs.channel
        # with client keys, admission and the status page count jobs per user; otherwise per address
        who = hs.user if hs.key is not None and self.keys.path is not None else _peer(ws)
        send = _Sender(ws, channel)
        cancels: set[threading.Event] = set()
        try:
            async for frame in ws:
                try:
                    msg = channel.unpack(frame, self.limits)
                    if not isinstance(msg, Job):
                        raise ProtocolError(f"a client may send 'job' messages only, not {msg.type!r}.")
                except AuthError:
                    await ws.close(1008, "frame authentication failed")
                    break
                except ProtocolError as e:
                    await send(Error(code=e.code, message=str(e)))
                    continue
                cancel = threading.Event()
                cancels.add(cancel)
                task = asyncio.create_task(self._run_job(msg, send, who, cancel))
                task.add_done_callback(lambda _, c=cancel: cancels.discard(c))
        finally:
            # The client went away: its jobs stop at their next hop (within a fraction of a second), close
            # their node sessions and give back their admission slots.
            for cancel in cancels:
                cancel.set()
            send.close()

    async def _run_job(self, job: Job, send: "_Sender", client: str = "",
                       cancel: threading.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        cancel = cancel or threading.Event()

        def emit(data: dict) -> None:
            if not cancel.is_set():
                send.post(Event(id=job.id, data=data))

        try:
            if job.job == "status":
                data = self.status()
            else:
                with self.admission.job(client, job.job):
                    log.info("%s job by %s", job.job, client)
                    data = await loop.run_in_executor(self.jobs, self._job_in_thread, job, emit, cancel, client)
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

    def _status_allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return self.keys.check_bearer(value.strip()) is not None
        if scheme.lower() == "basic":
            try:
                password = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
            return self.keys.check_bearer(password) is not None
        return False

    def status(self) -> dict:
        return {
            "model": self.model, "family": self.checkpoint.family.name, "n_layer": self.checkpoint.n_layer,
            "draft_model": self.draft_model,
            "fingerprint": self.fingerprint,
            "nodes": self.router.node_status(), "missing": self.router.missing(),
            "sessions": len(self.router.sessions()), "failovers": self.router.failovers,
            "replayed_bytes": self.router.replayed_bytes, "max_message_size": self.limits.max_frame,
            "verify": self.router.verify, "verified_hops": self.router.verified_hops,
            "disagreements": self.router.disagreements, "unverifiable_hops": self.router.unverifiable_hops,
            "unverified_spans": self.router.unverified_spans(),
            "refereed_hops": self.router.refereed_hops, "collusion_checks": self.router.collusion_checks,
            "unrefereed_spans": self.router.unrefereed_spans(),
            "tainted_jobs": list(self.router.tainted),  # jobs that a node banned afterwards had served
            **self.admission.snapshot(),  # active_jobs, jobs (who runs what, and through which door), jobs_done
        }


def close_reason(text: str, limit: int = 120) -> str:
    """A WebSocket close reason: at most 123 bytes of UTF-8 (cut by bytes, not characters)."""
    return text.encode()[:limit].decode(errors="ignore")


class _Sender:
    """A client connection's outgoing messages, written in order by one task. A job's thread packs (seals)
    its own events and hands the frame over (`post`): per generated token the event loop only writes it,
    instead of starting a task that packs it under a lock (on 2 cores that was a fifth of the loop's time,
    and the loop also relays every node's steps)."""

    def __init__(self, ws, channel):
        self.ws, self.channel = ws, channel
        self.loop = asyncio.get_running_loop()
        self.frames: asyncio.Queue = asyncio.Queue()
        self.writer = asyncio.ensure_future(self._write())

    async def __call__(self, msg) -> None:
        """Send `msg` (from the event loop) after everything sent before it."""
        self.frames.put_nowait(self.channel.pack(msg))

    def post(self, msg) -> None:
        """Send `msg` from any thread, after everything sent or posted before it."""
        self.loop.call_soon_threadsafe(self.frames.put_nowait, self.channel.pack(msg))

    async def _write(self) -> None:
        try:
            while True:
                await self.ws.send(await self.frames.get())
        except websockets.ConnectionClosed:
            pass  # the client went away: its jobs are cancelled by `_client`

    def close(self) -> None:
        self.writer.cancel()


def _peer(ws) -> str:
    address = getattr(ws, "remote_address", None)
    return str(address[0]) if address else ""


def _import_blocks() -> None:
    import slowllm.node.engine._blocks  # noqa: F401 - transformers' modeling code, for the referee
    import slowllm.node.engine._streaming  # noqa: F401
