"""`slowllm-node`: keep blocks first..last in memory and serve them to a coordinator over WebSockets.

The node dials out (so it works behind NAT), authenticates, registers its range and then answers
forward, backward and generation-step requests. Compute runs in one worker thread so the connection
keeps answering heartbeats and other sessions' messages. Requests queue for it, and each pass takes
what is waiting when the previous one ends (an idle node never waits for company): every generation
step queued, of any session, merged into one pass over the blocks (`_merge.py`), then one forward
batch (with others of the same blocks merged in), chosen round robin by the coordinator's job tags so
a bulk scoring job cannot starve a prompt. Each request's failure is an error reply for that request
alone (a failure of a merged pass answers each request in it). KV caches live here, per session, under a memory budget: a step beyond it gets a
"busy" error, never an out-of-memory crash. When the coordinator goes away, the node reconnects with
jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import ssl
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch
import websockets

from slowllm.node.engine._blocks import DEFAULT_SCORE_BUDGET, BlockCache, block_nbytes
from slowllm.node.engine._checkpoint import Checkpoint
from slowllm.node.engine._digests import block_digests
from slowllm.node.engine._families import family_of, kv_width
from slowllm.node.engine._memory import (NODE_RUNTIME_BYTES, blocks_that_fit, format_size, node_dtype, node_memory_need,
                                         steady_allocator)
from slowllm.node.engine._merge import StepPart, plan_forwards, plan_steps, run_merged_forwards, run_merged_steps
from slowllm.node.engine._resident import ResidentBlocks
from slowllm.node.kernels._kernels import cpu_supported, describe, kernel_rows, kernels
from slowllm.protocol import (HANDSHAKE_LIMITS, AuthError, Backward, BusyError, Channel, CheckpointError, CloseSession,
                              Error, Forward, Heartbeat, InputError, Limits, MemoryBudgetError, PeerHandshake,
                              ProtocolError, Register, Result, Results, SlowllmError, Step, Steps, decode_tensor,
                              encode_tensor, peek, printable)
from slowllm.utils._aio import why_connection_failed
from slowllm.utils._openmp import ComputeThread

log = logging.getLogger("slowllm.node")
HANDSHAKE_TIMEOUT = 30.0  # seconds for each handshake reply (model loading is not part of it)
_HANG = object()  # failure injection: the request is never answered
_PENDING = object()  # a request not run yet


@dataclass(eq=False)
class _Frame:
    """A received request frame: its message and what runs of it (one item, or each step of a Steps)."""

    future: asyncio.Future  # resolved on the event loop with (message, reply frame) or an exception
    msg: object
    works: list = field(default_factory=list)


@dataclass(eq=False)
class _Work:
    """One request the compute thread runs: a message, or one step of a Steps message."""

    msg: object
    frame: _Frame
    outcome: object = _PENDING  # the output tensor, None, or the exception that answers it
    inputs: tuple | None = None  # decoded (hidden, mask), once it runs


@dataclass(eq=False)
class _Queue:
    """One connection's requests: frames the event loop received, and what the compute thread has opened
    and not yet run (`backlog`, touched by the compute thread only, between passes by nobody else)."""

    channel: Channel
    waiting: list = field(default_factory=list)  # (frame, future), appended by the event loop
    backlog: list = field(default_factory=list)
    worker: asyncio.Task | None = None
    served: dict = field(default_factory=dict)  # job tag -> the pass that last ran one of its forwards
    passes: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))  # (requests, rows)

    def depth(self) -> int:
        return len(self.waiting) + len(self.backlog)


class Sessions:
    """Per-session KV caches with a byte budget, an idle timeout and explicit close.

    Used from the compute thread (steps, closes) and the event loop (heartbeat expiry, counts): every
    method holds the lock.
    """

    def __init__(self, budget: int, idle_timeout: float = 600.0):
        self.budget, self.idle_timeout = budget, idle_timeout
        self._caches: dict[str, dict[int, BlockCache]] = {}
        self._used: dict[str, float] = {}
        self._lock = threading.RLock()

    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes() for caches in self._caches.values() for c in caches.values())

    def get(self, session: str, layers: range, position_bytes: int, new: int, max_length: int) -> dict[int, BlockCache]:
        """The session's caches, with room for `new` more positions. Counts what is allocated: each
        block's buffers with their spare room, and while a buffer grows, the new one beside the old
        (`position_bytes`: keys and values of one position of one block, every row)."""
        return self.reserve(session, layers, position_bytes, new, max_length)[0]

    def reserve(self, session: str, layers: range, position_bytes: int, new: int, max_length: int,
                reserved: int = 0) -> tuple[dict[int, BlockCache], int]:
        """`get`, counting `reserved` bytes that steps merged into the same pass will add first; returns the
        caches and the bytes this step adds."""
        with self._lock:
            self.expire()
            caches = self._caches.get(session, {})
            need = (max((c.length for c in caches.values()), default=0) + new) * position_bytes * len(layers)
            if need > self.budget:
                raise InputError(f"a session of that length needs {format_size(need)} of KV cache on this node, "
                                 f"more than its --session-memory of {format_size(self.budget)}: use shorter or "
                                 "fewer prompts (or nodes with more memory).")
            # The blocks run one after another: while block i grows, its old and new buffers both exist,
            # blocks before it hold their new size and blocks after it their old one.
            held, peak = self.nbytes() + reserved, 0
            start = held
            for layer in layers:
                cache = caches.get(layer) or BlockCache(limit=max_length)
                before, after = cache.capacity * position_bytes, cache.capacity_for(new) * position_bytes
                if after != before:
                    peak = max(peak, held + after)
                    held += after - before
            if max(peak, held) > self.budget:
                raise BusyError(f"node is busy: its KV-cache budget of {format_size(self.budget)} is full; "
                                "retry in 10 s.")
            caches = self._caches.setdefault(session, {})
            for layer in layers:
                caches.setdefault(layer, BlockCache(limit=max_length)).limit = max_length
            self._used[session] = time.monotonic()
            return caches, held - start

    def past_length(self, session: str, layer: int) -> int:
        with self._lock:
            cache = self._caches.get(session, {}).get(layer)
            return 0 if cache is None else cache.length

    def truncate(self, session: str, layers: range, past: int) -> None:
        """Cut the session's caches of `layers` back to `past` positions (never forward)."""
        with self._lock:
            caches = self._caches.get(session, {})
            have = min((caches[layer].length if layer in caches else 0) for layer in layers)
            if past > have:
                raise InputError(f"session {session!r} holds {have} positions here, it cannot be rolled back to {past}.")
            for layer in layers:
                if layer in caches:
                    caches[layer].truncate(past)

    def close(self, session: str) -> bool:
        with self._lock:
            self._used.pop(session, None)
            return self._caches.pop(session, None) is not None

    def expire(self) -> None:
        with self._lock:
            now = time.monotonic()
            for s in [s for s, t in self._used.items() if now - t > self.idle_timeout]:
                self.close(s)

    def __len__(self) -> int:
        with self._lock:
            return len(self._caches)


class NodeServer:
    def __init__(self, *, first: int, last: int, coordinator: str, model: str | None = None,
                 secret: bytes | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
                 name: str = "", cafile: str | None = None, session_budget: int = 2 << 30,
                 limits: Limits = Limits(), heartbeat: float = 5.0, fault: tuple[str, int] | None = None,
                 memory: int | None = None):
        steady_allocator()  # before any request frame: 4 MB frames must go back to the OS when answered
        self.first, self.last = first, last
        self.url, self.model, self.secret = coordinator, model, secret
        self.dtype, self.device, self.name = dtype, device, name or f"node-{first}-{last}"
        self.cafile, self.limits, self.heartbeat = cafile, limits, heartbeat
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
        self.registered = False
        self.channel = Channel()  # the current connection's (seals replies, opens requests)
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
        self._check_memory(checkpoint)
        threads = torch.get_num_threads()
        kind = f", {describe()}, {threads} thread{'s' * (threads > 1)}" if self.device == "cpu" else ""
        print(f"node {self.name}: loading blocks {self.first}-{self.last} of {model} in "
              f"{str(self.dtype).removeprefix('torch.')}{' with int8 weights' if checkpoint.int8 else ''} ({why}{kind})",
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
        block = block_nbytes(checkpoint.config, self.dtype, checkpoint.int8)
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

    def _ssl(self):
        if not self.url.startswith("wss://"):
            return None
        return ssl.create_default_context(cafile=self.cafile)

    async def run_forever(self) -> None:
        delay, last, repeats = 0.5, "", 0
        while True:
            self.registered = False
            try:
                await self._session()
            except ssl.SSLCertVerificationError as e:
                raise SlowllmError(f"the coordinator's TLS certificate is not trusted ({e.verify_message}): "
                                   "pass --cafile with the CA that signed it.") from None
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError, ProtocolError, AuthError) as e:
                # Every failure to reach or talk to the coordinator is retried: a reverse proxy answering
                # 502 while the coordinator restarts, a wrong port, a dropped link, and every handshake
                # failure (a wrong secret, or an impostor that cannot prove it) must not kill the node.
                if self.registered:  # it served until now: the coordinator restarts, come back at once
                    delay = 0.5
                why = why_connection_failed(e, self.url)
                repeats = repeats + 1 if why == last else 1
                last = why
                if isinstance(e, AuthError) and repeats > 1:
                    # The same refusal again (a wrong secret): said once, then quiet, retried every minute
                    # in case the operator fixes the secret or the key file on either side.
                    if repeats == 2:
                        log.warning("coordinator %s keeps refusing this node (%s): check --secret-file against the "
                                    "coordinator's node secret; retrying quietly every minute", self.url, why)
                    delay = max(delay, 30.0)
                else:
                    log.warning("coordinator %s: %s; retrying in %.1f s", self.url, why, delay)
            else:
                delay, last, repeats = 0.5, "", 0
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            # a volunteer node should be back within seconds of the coordinator (a minute after refusals)
            delay = min(delay * 2, 60.0 if repeats > 1 and delay >= 30.0 else 4.0)

    async def _session(self) -> None:
        async with websockets.connect(self.url, max_size=HANDSHAKE_LIMITS.max_frame, compression=None,
                                      ssl=self._ssl(), open_timeout=10) as ws:
            hs = PeerHandshake("node", self.secret, self.name)
            await ws.send(hs.hello())
            await ws.send(hs.on_challenge(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT)))
            info = hs.on_welcome(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT))
            # From here the coordinator is authenticated (it proved the secret) and every frame is sealed.
            channel = self.channel = hs.channel
            limit = info.get("max_message_size", self.limits.max_frame)
            if not isinstance(limit, int) or not 1 << 20 <= limit <= 1 << 30:
                raise ProtocolError(f"the coordinator announced a message size of {printable(limit, 40)}")
            self.limits = Limits(max_frame=limit, max_tensor_elements=self.limits.max_tensor_elements,
                                 max_batch_tokens=self.limits.max_batch_tokens)
            ws.protocol.max_message_size = limit  # the handshake ran under a small limit
            if self.blocks is None:
                await asyncio.get_running_loop().run_in_executor(self.pool, self._load_named, info.get("model"))
            fingerprint = self.blocks.checkpoint.fingerprint()
            await ws.send(channel.pack(Register(
                first=self.first, last=self.last, fingerprint=fingerprint, device=self.device,
                dtype=str(self.dtype).removeprefix("torch."), speed=self.speed, name=self.name[:64],
                quantization="int8" if self.blocks.checkpoint.int8 else "none", digests=self.digests)))
            reply = channel.unpack(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT), self.limits)
            if isinstance(reply, Error):  # the authenticated coordinator refuses this node: retrying is no use
                cls = CheckpointError if reply.code in ("bad_checkpoint", "banned") else InputError
                raise cls(printable(reply.message, 400))
            self.registered = True
            log.info("registered blocks %d-%d with %s", self.first, self.last, self.url)
            print(f"node {self.name} serving blocks {self.first}-{self.last} for {self.url}", flush=True)
            await self._serve(ws)

    def _load_named(self, model) -> None:
        """Load the model the (authenticated) coordinator names: a hub id only, never a local path."""
        if not isinstance(model, str) or not model:
            raise CheckpointError("the coordinator serves a local checkpoint, which a node never opens by the "
                                  "coordinator's word: start this node with --model PATH (its own copy).")
        self.model = model
        self._load(model, hub_only=True)

    async def _serve(self, ws) -> None:
        lock, channel = asyncio.Lock(), self.channel
        queue = self.queue = _Queue(channel)

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
                await send(channel.pack(Heartbeat(load=self.load, sessions=len(self.sessions), queue=queue.depth(),
                                                  batch=round(batch, 2), rows=round(rows, 2))))

        tasks: set[asyncio.Task] = set()
        beater = asyncio.create_task(beat())
        self.banned = ""
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
                    task = asyncio.create_task(self._handle(frame, send, ws, size, queue))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            beater.cancel()
            for t in tasks:
                t.cancel()
            if queue.worker is not None:
                queue.worker.cancel()
        if self.banned:  # the coordinator proved this node's results wrong: coming back would not help
            raise CheckpointError(f"{self.banned}; check this PC's hardware and slowllm version, then ask the "
                                  "coordinator's operator to lift the ban (restart it).")

    async def _handle(self, frame, send, ws, size: int, queue: _Queue) -> None:
        """One request; `size` bytes of the in-flight budget were reserved for it and are given back here."""
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
                log.warning("coordinator %s: %s", self.url, e)
                await ws.close(1008, "frame authentication failed")
                return
            finally:
                self.load -= 1
            if reply is _HANG:
                await asyncio.Future()  # the request was accepted and is never answered
            if reply is None:
                if msg.code == "banned":
                    self.banned = printable(msg.message, 300)
                    print(f"node {self.name}: {self.banned}", flush=True)
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

    # ---- on the compute thread -------------------------------------------------------------------
    def _pass(self, queue: _Queue, frames: list) -> list[tuple[asyncio.Future, object]]:
        """Open the new frames, run one pass over what is waiting, and return each answered frame's
        outcome: (request, reply frame), (notice, None), (request, _HANG), or the exception to answer."""
        done: list[tuple[asyncio.Future, object]] = []
        frames.reverse()
        while frames:  # each raw frame is dropped once opened: a flood of 4 MB frames is held once, not twice
            frame, future = frames.pop()
            try:
                msg = queue.channel.unpack(frame, self.limits)
            except BaseException as e:  # noqa: BLE001 - a malformed or forged frame answers itself
                done.append((future, e))
                continue
            finally:
                del frame
            if isinstance(msg, Error) and msg.id is None:
                done.append((future, (msg, None)))
                continue
            if not isinstance(msg, (Forward, Backward, Step, Steps, CloseSession)):
                done.append((future, ProtocolError(f"a node does not accept {msg.type!r} messages.")))
                continue
            self.requests += 1
            if self.fault and self.requests >= self.fault[1]:
                if self.fault[0] == "exit":
                    os._exit(137)
                done.append((future, (msg, _HANG)))
                continue
            record = _Frame(future, msg)
            record.works = [_Work(m, record) for m in (msg.items if isinstance(msg, Steps) else [msg])]
            if not record.works:
                done.append((future, (msg, queue.channel.pack(Results(id=msg.id, items=[])))))
            queue.backlog.extend(record.works)
        chosen = self._choose(queue)
        if chosen:
            queue.passes += 1
            self._run(chosen)
            rows = sum(w.inputs[0].shape[0] for w in chosen if w.inputs is not None)
            queue.recent.append((len(chosen), rows))
        answered = {id(w.frame): w.frame for w in chosen}
        queue.backlog = [w for w in queue.backlog if w.outcome is _PENDING]
        for record in answered.values():
            if all(w.outcome is not _PENDING for w in record.works):
                done.append((record.future, self._reply(queue.channel, record)))
        return done

    def _choose(self, queue: _Queue) -> list[_Work]:
        """What this pass runs: every close and every generation step waiting (interactive work goes first,
        merged), then one forward or backward (the job served longest ago first, round robin) with the
        waiting forwards of the same blocks that merge with it."""
        chosen = [w for w in queue.backlog if isinstance(w.msg, (Step, CloseSession))]
        bulk = [w for w in queue.backlog if isinstance(w.msg, (Forward, Backward))]
        if not bulk:
            return chosen
        first = min(bulk, key=lambda w: queue.served.get(w.msg.job, -1))  # (min keeps arrival order on ties)
        queue.served[first.msg.job] = queue.passes
        if len(queue.served) > 1024:  # tags are the coordinator's word: keep the recent ones, bounded
            queue.served = dict(sorted(queue.served.items(), key=lambda kv: kv[1])[-512:])
        if not isinstance(first.msg, Forward) or len(first.msg.mask.shape) != 2:
            return chosen + [first]
        # merged with waiting forwards of the same blocks, planned from the shapes their headers declare
        # (decoded only once they run: a flood of queued forwards is never held decoded)
        candidates = [first] + [w for w in bulk if w is not first and isinstance(w.msg, Forward)
                                and (w.msg.first, w.msg.last) == (first.msg.first, first.msg.last)
                                and len(w.msg.mask.shape) == 2]
        group = plan_forwards([tuple(w.msg.mask.shape) for w in candidates], self.limits.max_batch_tokens)[0]
        return chosen + [candidates[i] for i in group]

    def _run(self, chosen: list[_Work]) -> None:
        """Give every chosen request its outcome."""
        steps: dict[tuple[int, int], list[tuple[_Work, StepPart]]] = {}
        forwards: list[_Work] = []
        reserved, stepping = 0, set()
        for w in chosen:
            if isinstance(w.msg, Step):
                if w.msg.session in stepping:  # its second step needs the first one's keys: next pass
                    continue
                stepping.add(w.msg.session)
            try:
                if isinstance(w.msg, CloseSession):
                    if not self.sessions.close(w.msg.session):
                        raise InputError(f"unknown session {w.msg.session!r}: it was closed or expired.")
                    w.outcome = None
                elif isinstance(w.msg, Step):
                    part, grows = self._step_part(w.msg, reserved)
                    reserved += grows
                    w.inputs = (part.hidden, part.mask)
                    steps.setdefault((w.msg.first, w.msg.last), []).append((w, part))
                elif isinstance(w.msg, Forward):
                    w.inputs = self._tensors(w.msg)
                    forwards.append(w)
                else:
                    hidden, mask = w.inputs = self._tensors(w.msg)
                    grad = decode_tensor(w.msg.grad, self.limits)
                    if grad.shape != hidden.shape:
                        raise InputError(f"gradient shape {list(grad.shape)} differs from hidden shape "
                                         f"{list(hidden.shape)}.")
                    w.outcome = self.blocks.backward(hidden, mask, grad, w.msg.first, w.msg.last)
            except BaseException as e:  # noqa: BLE001 - this request's answer; the others run
                w.outcome = e
        window = family_of(self.blocks.config).window(self.blocks.config)
        for (first, last), entries in steps.items():
            parts = [p for _, p in entries]
            for group in plan_steps(parts, self.blocks.config, self.dtype.itemsize, self.score_budget,
                                    self.limits.max_batch_tokens, window, self._merge_rows()):
                self._answer_together([entries[i][0] for i in group],
                                      lambda g=group: run_merged_steps(self.blocks, [parts[i] for i in g], first, last))
        if forwards:
            self._answer_together(forwards, lambda: run_merged_forwards(
                self.blocks, [w.inputs for w in forwards], forwards[0].msg.first, forwards[0].msg.last))

    def _merge_rows(self) -> int:
        """The most rows one merged decode pass may hold: where the node's CPU kernels run the linears
        (bf16, int8), as many as they take (batch invariant: every session gets its tokens as alone);
        otherwise no limit beyond tokens and memory (fp32 through MKL differs in the last bits only)."""
        if self.device != "cpu" or not cpu_supported():
            return 1 << 30
        if self.blocks.checkpoint.int8:
            kind = "int8" if self.dtype == torch.bfloat16 else "int8_fp32"
        elif self.dtype == torch.bfloat16:
            kind = "bf16"
        else:
            return 1 << 30
        return kernel_rows(kind) or 1 << 30

    @staticmethod
    def _answer_together(works: list[_Work], run) -> None:
        """Run a merged pass; its failure answers every request in it."""
        try:
            outs = run()
        except BaseException as e:  # noqa: BLE001
            if not isinstance(e, SlowllmError):
                log.exception("a merged pass of %d requests failed", len(works))
            for w in works:
                w.outcome = e
            return
        for w, out in zip(works, outs):
            w.outcome = out

    def _reply(self, channel: Channel, record: _Frame):
        """The reply to an answered frame: (request, frame), or the exception that answers a single request."""
        if isinstance(record.msg, Steps):
            items = []
            for w in record.works:
                if isinstance(w.outcome, BaseException):
                    items.append(_error(w.msg.id, w.outcome))
                else:
                    items.append(Result(id=w.msg.id, tensor=encode_tensor(w.outcome)))
            return record.msg, channel.pack(Results(id=record.msg.id, items=items))
        outcome = record.works[0].outcome
        if isinstance(outcome, BaseException):
            return outcome
        codec = record.msg.compression if isinstance(record.msg, Forward) else "raw"
        return record.msg, channel.pack(Result(id=record.msg.id,
                                               tensor=None if outcome is None else encode_tensor(outcome, codec)))

    def _tensors(self, msg, past: int = 0):
        hidden = decode_tensor(msg.hidden, self.limits)
        mask = decode_tensor(msg.mask, self.limits)
        self.blocks.check_range(msg.first, msg.last)
        self.blocks.check_inputs(hidden, mask, past)
        if hidden.shape[0] * mask.shape[1] > self.limits.max_batch_tokens:
            raise InputError(f"batch x length {hidden.shape[0] * mask.shape[1]} exceeds this node's limit of "
                             f"{self.limits.max_batch_tokens}: send smaller batches.")
        return hidden, mask

    def _step_part(self, msg: Step, reserved: int) -> tuple[StepPart, int]:
        """A step checked and its caches reserved (the mask covers the session's past tokens plus the new
        ones); and the KV bytes it will add."""
        layers = range(msg.first, msg.last + 1)
        self.blocks.check_range(msg.first, msg.last)
        if msg.past is not None:
            self.sessions.truncate(msg.session, layers, msg.past)
        lengths = {self.sessions.past_length(msg.session, layer) for layer in layers}
        if len(lengths) > 1:  # stepped over other blocks before: its caches cannot serve one pass
            raise InputError(f"session {msg.session!r} holds {min(lengths)}-{max(lengths)} positions in blocks "
                             f"{msg.first}-{msg.last}: step a session over the same blocks every time.")
        past = lengths.pop()
        hidden, mask = self._tensors(msg, past)
        if mask.shape[1] > msg.max_length:
            raise InputError(f"session {msg.session!r} reached its max length of {msg.max_length} tokens.")
        # keys and values of one position of one block, every row (GQA: fewer numbers than hidden)
        position_bytes = 2 * kv_width(self.blocks.config) * self.dtype.itemsize * hidden.shape[0]
        caches, grows = self.sessions.reserve(msg.session, layers, position_bytes, hidden.shape[1], msg.max_length,
                                              reserved)
        return StepPart(hidden, mask, caches, msg.session), grows


def _error(msg_id: int, e: BaseException) -> Error:
    """One step's failure as an item of a Results reply."""
    if isinstance(e, SlowllmError):
        return Error(id=msg_id, code=e.code, message=str(e)[:4000])
    log.error("request failed: %r", e)
    return Error(id=msg_id, code="internal", message=f"node failed on this request: {type(e).__name__}")


def _peek_id(channel: Channel, frame) -> int | None:
    """The request id of a frame (for the error reply), or None when it has none we can read."""
    try:
        return peek(channel.body(frame))[1]
    except ProtocolError:
        return None
