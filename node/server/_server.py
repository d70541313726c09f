"""`slowllm-node`: keep blocks first..last in memory and serve them to a coordinator over WebSockets.

The node dials out (so it works behind NAT), authenticates, registers its range and then answers
forward, backward and generation-step requests. Compute runs in one worker thread so the connection
keeps answering heartbeats and other sessions' messages; requests queue for it and each pass runs what
is waiting, merged (`_passes.py`). KV caches live here, per session, under a memory budget
(`_sessions.py`). When the coordinator goes away, the node reconnects with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from dataclasses import dataclass, field

import psutil
import torch
import websockets

from slowllm.node.engine._blocks import DEFAULT_SCORE_BUDGET, block_nbytes
from slowllm.node.engine._checkpoint import Checkpoint
from slowllm.node.engine._digests import block_digests
from slowllm.node.engine._memory import (NODE_RUNTIME_BYTES, blocks_that_fit, format_size, linear_dtype, node_dtype,
                                         node_memory_need, page_note, steady_allocator, weights_note)
from slowllm.node.engine._resident import ResidentBlocks
from slowllm.node.kernels._kernels import cpu_supported, describe, kernels
from slowllm.protocol import (HANDSHAKE_LIMITS, AuthError, Channel, CheckpointError, Error, Heartbeat, InputError,
                              Limits, MemoryBudgetError, PeerHandshake, ProtocolError, Register, SlowllmError, peek,
                              printable)
from slowllm.utils._aio import why_connection_failed
from slowllm.utils._openmp import ComputeThread

from ._passes import HANG, ComputePasses, _Queue
from ._sessions import Sessions

log = logging.getLogger("slowllm.node")
HANDSHAKE_TIMEOUT = 30.0  # seconds for each handshake reply (model loading is not part of it)


@dataclass(eq=False)
class _Link:
    """The node's link to one coordinator: its own secret, message limits, sealed channel and state."""

    url: str
    secret: bytes | None
    limits: Limits
    tag: str  # namespaces this coordinator's session ids in the node's one KV budget
    channel: Channel = field(default_factory=Channel)
    queue: _Queue | None = None
    registered: bool = False
    banned: str = ""
    ended: str = ""  # why this link stopped for good (refused, banned), once it has


class NodeServer(ComputePasses):
    """A node: one range of blocks in memory, served to every coordinator it was given (one link each; one
    compute thread, one KV budget and one in-flight budget shared between them)."""

    def __init__(self, *, first: int, last: int, coordinator: str | list[str], model: str | None = None,
                 secret: bytes | None | list[bytes | None] = None, dtype: torch.dtype | None = None, device: str = "cpu",
                 name: str = "", cafile: str | None = None, session_budget: int = 2 << 30,
                 limits: Limits = Limits(), heartbeat: float = 5.0, fault: tuple[str, int] | None = None,
                 memory: int | None = None):
        steady_allocator()  # before any request frame: 4 MB frames must go back to the OS when answered
        self.first, self.last = first, last
        urls = [coordinator] if isinstance(coordinator, str) else list(coordinator)
        secrets = secret if isinstance(secret, list) else [secret] * len(urls)
        self.links = [_Link(url, key, limits, tag=f"{i}:" if len(urls) > 1 else "")
                      for i, (url, key) in enumerate(zip(urls, secrets))]
        self.model = model
        self.dtype, self.device, self.name = dtype, device, name or f"node-{first}-{last}"
        self.cafile, self.heartbeat = cafile, heartbeat
        self.blocks: ResidentBlocks | None = None
        self.sessions = Sessions(session_budget)
        self.memory = memory  # bytes this node may use; None: what the OS reports available at load time
        # Every torch operation of this process runs on this one thread (one OpenMP team, see _openmp.py):
        # loading, decoding frames, the blocks, encoding replies; never on the event loop, which keeps
        # heartbeats going.
        self.pool = ComputeThread()
        self.inflight = 0  # bytes of request frames accepted and not yet answered (the event loop's)
        self.inflight_budget = 256 << 20  # raised from the node's spare memory once the blocks are loaded
        self.score_budget = DEFAULT_SCORE_BUDGET
        self.load = 0
        self.speed = 0.0
        # Failure injection for resilience tests and benchmarks: ("exit", n) dies like `kill -9` on the
        # n-th compute request; ("hang", n) accepts it and every later one and never answers.
        self.fault = fault
        self.requests = 0
        if model is not None:
            self.pool.submit(self._load, model).result()

    def _load(self, model: str, hub_only: bool = False) -> None:
        checkpoint = Checkpoint(model, hub_only=hub_only)
        if not 0 <= self.first <= self.last < checkpoint.n_layer:
            raise InputError(f"--layers {self.first}-{self.last} is outside the model's blocks "
                             f"0-{checkpoint.n_layer - 1}: pick a range inside it.")
        if self.device == "cpu" and cpu_supported():
            # built now (once per machine, ~30 s) rather than inside the first user's token; the dtype
            # choice below also depends on whether they run
            print(f"node {self.name}: preparing the decode kernels", flush=True)
            kernels()
        self.dtype, why = node_dtype(checkpoint.storage_dtype(), self.device, self.dtype, checkpoint.int8)
        self.linears = linear_dtype(checkpoint.storage_dtype(), self.dtype, self.device, checkpoint.int8)
        self._check_memory(checkpoint)
        threads = torch.get_num_threads()
        kind = f", {describe()}, {threads} thread{'s' * (threads > 1)}, {page_note()}" if self.device == "cpu" else ""
        print(f"node {self.name}: loading blocks {self.first}-{self.last} of {model} in "
              f"{str(self.dtype).removeprefix('torch.')}{weights_note(self.dtype, self.linears, checkpoint.int8)} ({why}{kind})",
              flush=True)
        self.blocks = ResidentBlocks(checkpoint, self.first, self.last, self.dtype, self.device,
                                     score_budget=self.score_budget)
        self.speed = self.blocks.measure_speed()
        # proof of the weights for the coordinator (hashed once per copy, then cached: node/engine/_digests.py)
        self.digests = block_digests(checkpoint, range(self.first, self.last + 1), progress=lambda i, n: print(
            f"node {self.name}: hashing its weights for the coordinator: block {i}/{n}", flush=True))

    def _check_memory(self, checkpoint: Checkpoint) -> None:
        """Refuse, before loading anything, a range that does not fit: one sentence with one that does."""
        if self.device == "cuda":
            available = torch.cuda.mem_get_info()[0] if self.memory is None else self.memory
        else:
            available = psutil.virtual_memory().available if self.memory is None else self.memory
        block = block_nbytes(checkpoint.config, self.dtype, checkpoint.int8, self.linears)
        count = self.last - self.first + 1
        need = node_memory_need(block, count, self.sessions.budget)
        if need <= available:
            # What is left over holds requests waiting for the compute thread (beyond it: "busy") and,
            # within the runtime share, one request's attention scores.
            spare = available - need
            self.inflight_budget = min(2 << 30, max(256 << 20, spare // 2))
            # Bigger query chunks for long prompts where memory allows: each chunk re-reads the blocks'
            # weights, so at Bloom-176B width (112 heads) 256 MB would mean chunks of ~15 positions.
            self.score_budget = min(8 << 30, max(DEFAULT_SCORE_BUDGET, spare // 4))
            return
        fits = blocks_that_fit(block, available, self.sessions.budget)
        dtype = str(self.dtype).removeprefix("torch.")
        advice = (f"use --layers {self.first}-{self.first + fits - 1} ({fits} blocks) or fewer" if fits else
                  "not even one block fits: lower --session-memory or use a PC with more memory")
        if self.dtype == torch.float32:
            advice += ", or --dtype bfloat16 (half the memory)"
        raise MemoryBudgetError(
            f"blocks {self.first}-{self.last} need {format_size(need)} ({count} x {format_size(block)} in {dtype} "
            f"+ {format_size(self.sessions.budget)} KV budget + {format_size(NODE_RUNTIME_BYTES)} runtime), but "
            f"{format_size(available)} is available: {advice}.")

    def _ssl(self, url: str):
        if not url.startswith("wss://"):
            return None
        return ssl.create_default_context(cafile=self.cafile)

    async def run_forever(self) -> None:
        """Serve every coordinator until each link has ended (only an authenticated coordinator's refusal or
        ban, or an untrusted certificate, ends one); then raise why the first one ended."""
        outcomes = await asyncio.gather(*(self._link_forever(link) for link in self.links), return_exceptions=True)
        raise next(e for e in outcomes if isinstance(e, BaseException))

    async def _link_forever(self, link: _Link) -> None:
        try:
            await self._serve_link(link)
        except (SlowllmError, ssl.SSLError) as e:
            link.ended = str(e)
            if len(self.links) > 1:
                print(f"node {self.name}: stopped serving {link.url}: {e}", flush=True)
            raise

    async def _serve_link(self, link: _Link) -> None:
        delay, last, repeats = 0.5, "", 0
        while True:
            link.registered = False
            try:
                await self._session(link)
            except ssl.SSLCertVerificationError as e:
                raise SlowllmError(f"the coordinator's TLS certificate is not trusted ({e.verify_message}): "
                                   "pass --cafile with the CA that signed it.") from None
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError, ProtocolError, AuthError) as e:
                # Every failure to reach or talk to the coordinator is retried: a reverse proxy answering
                # 502 while the coordinator restarts, a wrong port, a dropped link, and every handshake
                # failure (a wrong secret, or an impostor that cannot prove it) must not kill the node.
                if link.registered:  # it served until now: the coordinator restarts, come back at once
                    delay = 0.5
                why = why_connection_failed(e, link.url)
                repeats = repeats + 1 if why == last else 1
                last = why
                if isinstance(e, AuthError) and repeats > 1:
                    # The same refusal again (a wrong secret): said once, then quiet, retried every minute
                    # in case the operator fixes the secret or the key file on either side.
                    if repeats == 2:
                        log.warning("coordinator %s keeps refusing this node (%s): check --secret-file against the "
                                    "coordinator's node secret; retrying quietly every minute", link.url, why)
                    delay = max(delay, 30.0)
                else:
                    log.warning("coordinator %s: %s; retrying in %.1f s", link.url, why, delay)
            else:
                delay, last, repeats = 0.5, "", 0
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            # a volunteer node should be back within seconds of the coordinator (a minute after refusals)
            delay = min(delay * 2, 60.0 if repeats > 1 and delay >= 30.0 else 4.0)

    async def _session(self, link: _Link) -> None:
        async with websockets.connect(link.url, max_size=HANDSHAKE_LIMITS.max_frame, compression=None,
                                      ssl=self._ssl(link.url), open_timeout=10) as ws:
            hs = PeerHandshake("node", link.secret, self.name)
            await ws.send(hs.hello())
            await ws.send(hs.on_challenge(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT)))
            info = hs.on_welcome(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT))
            # From here the coordinator is authenticated (it proved the secret) and every frame is sealed.
            channel = link.channel = hs.channel
            limit = info.get("max_message_size", link.limits.max_frame)
            if not isinstance(limit, int) or not 1 << 20 <= limit <= 1 << 30:
                raise ProtocolError(f"the coordinator announced a message size of {printable(limit, 40)}")
            link.limits = Limits(max_frame=limit, max_tensor_elements=link.limits.max_tensor_elements,
                                 max_batch_tokens=link.limits.max_batch_tokens)
            ws.protocol.max_message_size = limit  # the handshake ran under a small limit
            if self.blocks is None:
                await asyncio.get_running_loop().run_in_executor(self.pool, self._load_named, info.get("model"))
            fingerprint = self.blocks.checkpoint.fingerprint()
            await ws.send(channel.pack(Register(
                first=self.first, last=self.last, fingerprint=fingerprint, device=self.device,
                dtype=str(self.dtype).removeprefix("torch."), speed=self.speed, name=self.name[:64],
                quantization="int8" if self.blocks.checkpoint.int8 else "none", digests=self.digests)))
            reply = channel.unpack(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT), link.limits)
            if isinstance(reply, Error):  # the authenticated coordinator refuses this node: retrying is no use
                cls = CheckpointError if reply.code in ("bad_checkpoint", "banned") else InputError
                raise cls(printable(reply.message, 400))
            link.registered = True
            log.info("registered blocks %d-%d with %s", self.first, self.last, link.url)
            print(f"node {self.name} serving blocks {self.first}-{self.last} for {link.url}", flush=True)
            await self._serve(ws, link)

    def _load_named(self, model) -> None:
        """Load the model the (authenticated) coordinator names: a hub id only, never a local path."""
        if self.blocks is not None:  # another coordinator's link loaded it first: the fingerprint decides
            return
        if not isinstance(model, str) or not model:
            raise CheckpointError("the coordinator serves a local checkpoint, which a node never opens by the "
                                  "coordinator's word: start this node with --model PATH (its own copy).")
        self.model = model
        self._load(model, hub_only=True)

    async def _serve(self, ws, link: _Link) -> None:
        lock, channel = asyncio.Lock(), link.channel
        queue = link.queue = _Queue(channel, link.limits, link.tag)

        async def send(frame: bytes) -> None:
            async with lock:
                await ws.send(frame)

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat)
                self.sessions.expire()
                recent = list(queue.recent)
                batch = sum(n for n, _ in recent) / len(recent) if recent else 0.0
                rows = sum(r for _, r in recent) / len(recent) if recent else 0.0
                # the whole node's load, whichever coordinator sent it: every coordinator routes by it
                depth = sum(x.queue.depth() for x in self.links if x.queue is not None)
                await send(channel.pack(Heartbeat(load=self.load, sessions=len(self.sessions), queue=depth,
                                                  batch=round(batch, 2), rows=round(rows, 2))))

        tasks: set[asyncio.Task] = set()
        beater = asyncio.create_task(beat())
        link.banned = ""
        try:
            async for frame in ws:
                # The budget is checked here, before a task holds the frame: requests arrive faster than
                # tasks run, and a refused 4 MB frame must be dropped now, not when its task gets a turn.
                # A queued request costs its frame and, once decoded, a copy of its tensors: count both.
                size = 2 * len(frame)
                if self.inflight and self.inflight + size > self.inflight_budget:
                    msg_id = _peek_id(channel, frame)
                    del frame
                    reply = channel.pack(Error(id=msg_id, code="busy", message=(
                        f"node is busy: {format_size(self.inflight)} of requests are waiting; retry in 5 s.")))
                    task = asyncio.create_task(send(reply))
                else:
                    self.inflight += size
                    task = asyncio.create_task(self._handle(frame, send, ws, size, link))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            beater.cancel()
            for t in tasks:
                t.cancel()
            if queue.worker is not None:
                queue.worker.cancel()
            link.queue = None
        if link.banned:  # the coordinator proved this node's results wrong: coming back would not help
            raise CheckpointError(f"{link.banned}; check this PC's hardware and slowllm version, then ask the "
                                  "coordinator's operator to lift the ban (restart it).")

    async def _handle(self, frame, send, ws, size: int, link: _Link) -> None:
        """One request; `size` bytes of the in-flight budget were reserved for it and are given back here."""
        queue = link.queue
        channel = queue.channel
        msg_id = _peek_id(channel, frame)
        self.load += 1  # queued or running: what heartbeats report
        try:
            try:
                future = asyncio.get_running_loop().create_future()
                queue.waiting.append((frame, future))
                del frame
                if queue.worker is None or queue.worker.done():
                    queue.worker = asyncio.create_task(self._work(queue))
                msg, reply = await future
            except AuthError as e:  # altered or injected on the way: nothing more on this link can be trusted
                log.warning("coordinator %s: %s", link.url, e)
                await ws.close(1008, "frame authentication failed")
                return
            finally:
                self.load -= 1
            if reply is HANG:
                await asyncio.Future()  # the request was accepted and is never answered
            if reply is None:
                if msg.code == "banned":
                    link.banned = printable(msg.message, 300)
                    print(f"node {self.name}: {link.banned}", flush=True)
                    await ws.close()
                return  # other notices from the coordinator need no answer
            await send(reply)
        except SlowllmError as e:
            await send(channel.pack(Error(id=msg_id, code=e.code, message=str(e))))
        except websockets.ConnectionClosed:
            pass
        except Exception as e:  # a bug must not take the node down: report it for this request only
            log.exception("request failed")
            await send(channel.pack(Error(id=msg_id, code="internal",
                                          message=f"node failed on this request: {type(e).__name__}")))
        finally:
            self.inflight -= size

    async def _work(self, queue: _Queue) -> None:
        """Run passes while anything waits: each takes every frame received so far (one hand-off to the
        compute thread and back per pass, not per request: each costs ~0.2 ms of wake-ups)."""
        loop = asyncio.get_running_loop()
        while queue.waiting or queue.backlog:
            frames, queue.waiting = queue.waiting, []
            done = await loop.run_in_executor(self.pool, self._pass, queue, frames)
            for future, outcome in done:
                if future.done():
                    continue  # its task was cancelled (the connection closed)
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


def _peek_id(channel: Channel, frame) -> int | None:
    """The request id of a frame (for the error reply), or None when it has none we can read."""
    try:
        return peek(channel.body(frame))[1]
    except ProtocolError:
        return None
