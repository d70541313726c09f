"""The remote chain: activations hop through nodes, and a failed hop moves to another node.

Every hop is a request from a job's worker thread: the thread packs the frame, the event loop only sends
it and routes the reply's raw frame back by id, and the thread unpacks and checks it. When a node dies,
disconnects, times out, answers `busy`/`internal` or sends a reply that is not what was asked (wrong
shape or dtype, non-finite values), the hop is retried on another node covering the same blocks (one
node or several), waiting up to `--wait-for-nodes` for one to register; the failed node is avoided by
the router for a while. Stateless forward/backward just re-run the span. Generation sessions keep each
span's past inputs (and the latest mask), so a replacement's KV cache is rebuilt by replaying them:
greedy output is identical to an uninterrupted run, the client sees only a delay.

Sizes come from the wire: every request is cut to fit `--max-message-size` from the hidden size, so a
long prompt is prefilled, and a session replayed, in as many frames as it takes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from slowllm.coordinator.swarm._router import OUTBOX_STEP_BYTES
from slowllm.coordinator.swarm._verify import Referee, agree, referee_tolerance, tolerance
from slowllm.node import Batch
from slowllm.protocol import (AuthError, Backward, CloseSession, Error, Forward, InputError, Limits, ProtocolError,
                              Result, Results, SlowllmError, Step, UnavailableError, WireTensor, decode_tensor,
                              encode_tensor, printable)

from ._chain import Chain, ChainSession

if TYPE_CHECKING:
    from slowllm.coordinator.scheduler._stepper import Stepper
    from slowllm.coordinator.swarm._router import NodeLink, Router

log = logging.getLogger("slowllm")

# verification re-runs run beside the hop they check (one thread each while it lasts; jobs are <= 32)
_CHECKS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="slowllm-verify")
# micro-batches of pipelined jobs and the sessions of a merged step, each on its own thread while it runs
_PIPELINE = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="slowllm-pipeline")
_WAVE = threading.local()  # the stepping loop's wave a pipeline thread's step belongs to (its node outboxes wait for it)
_WAVES = itertools.count(1)
MAX_FAILOVERS = 8  # per span and operation: beyond this the job fails rather than loop forever
FRAME_OVERHEAD = 64 << 10  # msgpack keys, ids, shapes: generous, so a cut request always fits
FAILOVER_CODES = ("busy", "internal", "protocol", "unavailable")  # the node's trouble, not the request's
_HALF = {"bfloat16": (torch.bfloat16, "bf16"), "float16": (torch.float16, "fp16")}  # a node's dtype, its codec


def encode_mask(mask: torch.Tensor):
    """The 0/1 token mask on the wire as uint8: a step re-sends the whole session's mask, which at 2,000
    positions was 16 KB per hop as int64, more than half a Bloom-176B token's hidden state in bf16."""
    return encode_tensor(mask.to(torch.uint8))


class NodeFailed(UnavailableError):
    def __init__(self, node: "NodeLink", message: str):
        super().__init__(message)
        self.node = node


class Cancelled(SlowllmError):
    code = "cancelled"


@dataclass
class _RemoteTape:
    spans: list[tuple[int, int, torch.Tensor]]  # (first, last, input) of each span as run
    mask: torch.Tensor


class RemoteChain(Chain):
    def __init__(self, router: "Router", limits: Limits, hidden_size: int, *, compression: str = "raw",
                 notify: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                 referee: Referee | None = None, job: str = "", stepper: "Stepper | None" = None):
        self.router, self.limits, self.hidden_size = router, limits, hidden_size
        self.job = job  # tags this chain's requests: nodes share their passes round robin between tags
        self.stepper = stepper  # the coordinator's stepping loop, which every generation's steps go through
        self.served_by: set = set()  # nodes whose answers this chain used (told when one is banned later)
        self.referee = referee  # decides disputes under --verify (None: disputes ban nobody)
        self.rng = random.Random()
        self._local = threading.local()  # marks the threads that run verification re-runs
        self.n_layer = router.n_layer
        self.dtype = torch.float32
        self.compression = compression
        self.notify = notify  # tells the client what a job waits for
        self.cancel = cancel or threading.Event()  # set when the client went away
        # forward: hidden [B, T, H] + mask [B, T]; backward carries hidden and grad: 8H + 8 bytes a token
        per_token = 8 * hidden_size + 8
        self.max_batch_tokens = min(limits.max_batch_tokens // 4, (limits.max_frame - FRAME_OVERHEAD) // per_token)
        self.max_request_tokens = self.max_batch_tokens
        if self.max_batch_tokens < 1:
            raise InputError(f"--max-message-size {limits.max_frame} bytes cannot carry one token of this model "
                             f"({per_token} bytes at hidden size {hidden_size}): raise it to at least 1MB.")

    def step_positions(self, rows: int, total: int) -> int:
        """New positions per step frame for `rows` rows whose mask covers `total` positions."""
        room = self.limits.max_frame - FRAME_OVERHEAD - rows * total
        return min(self.limits.max_batch_tokens // rows, max(0, room // (rows * self.hidden_size * 4)))

    # ---- one hop -------------------------------------------------------------------------------
    @staticmethod
    def _wire(node: "NodeLink", t: torch.Tensor, codec: str = "raw") -> WireTensor:
        """`t` as sent to `node`. A node computing in bf16 (or fp16) rounds what it receives to that dtype
        first, so it gets it in that dtype: half the bytes of fp32 and the very numbers it would compute
        from (the rounding is the same either side). A lossy codec the job chose still applies otherwise."""
        compute, same = _HALF.get(node.dtype, (None, None))
        if compute is not None and codec in ("raw", same):
            return encode_tensor(t.to(compute))
        return encode_tensor(t, codec)

    def _call(self, coro):
        """Run `coro` on the event loop and wait for it here, giving up as soon as the job is cancelled."""
        future = asyncio.run_coroutine_threadsafe(coro, self.router.loop)
        # (not `future.result(timeout)` in a loop: its TimeoutError is also what a timed-out hop raises)
        while not concurrent.futures.wait([future], timeout=0.25).done:
            if self.cancel.is_set():
                future.cancel()
                raise Cancelled("the job was cancelled (its client went away).")
        return future.result()

    def _fail(self, node: "NodeLink", why: str) -> NodeFailed:
        """The node failed this hop (gone, slow, busy, a bug): fail over, and avoid it for a while."""
        self.router.loop.call_soon_threadsafe(self.router.penalize, node)
        self.router.record_failover()
        return NodeFailed(node, f"node {node.name} failed ({why})")

    def _lied(self, node: "NodeLink", why: str) -> NodeFailed:
        """The node answered what no honest node answers: banned, and the hop fails over."""
        self.router.loop.call_soon_threadsafe(self.router.ban, node, why)
        self.router.record_failover()
        return NodeFailed(node, f"node {node.name} was banned ({why})")

    def _timeout(self, node: "NodeLink", expect: tuple[int, ...] | None, blocks: int, backward: bool) -> float:
        """--request-timeout, plus 4x what the node's measured speed says this request takes: at Bloom-176B
        width one 256 MB message is 4,679 positions, minutes of work for a CPU node."""
        if expect is None or node.speed <= 0:
            return self.router.request_timeout
        work = expect[0] * expect[1] * blocks * (3 if backward else 1)
        return self.router.request_timeout + min(3600.0, 4 * work / node.speed)  # (the speed is the node's word)

    def _exchange(self, node: "NodeLink", make, expect: tuple[int, ...] | None, blocks: int = 1,
                  backward: bool = False, batched: bool = False) -> torch.Tensor | None:
        """One request to `node`, its reply checked: a tensor of shape `expect` (float, finite) or None.

        `batched` (small generation steps): the request goes through the node's outbox, merged with the
        steps other jobs send it in the same turn of the event loop, and its answer is its item of the reply.
        """
        if self.cancel.is_set():
            raise Cancelled("the job was cancelled (its client went away).")
        msg_id = node.next_id()
        timeout = self._timeout(node, expect, blocks, backward)
        try:
            if batched:
                shared, index = self._call(node.step(make(msg_id), timeout=timeout, wave=getattr(_WAVE, "id", None)))
            else:
                reply = self._call(node.request(msg_id, node.channel.pack(make(msg_id)), timeout=timeout))
        except (UnavailableError, asyncio.TimeoutError, TimeoutError):
            raise self._fail(node, "disconnected or timed out") from None
        try:
            msg = shared.open(node.channel, self.limits) if batched else node.channel.unpack(reply, self.limits)
        except AuthError:  # altered on the way, not necessarily by the node: drop the link, fail over
            self.router.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(node.ws.close(1008, "bad frame")))
            raise self._fail(node, "a reply failed authentication") from None
        except ProtocolError:
            raise self._lied(node, "sent a malformed reply") from None
        if batched:
            if not isinstance(msg, Results) or msg.id != shared.msg_id or len(msg.items) != shared.count:
                raise self._lied(node, f"answered {msg.type!r} with {len(getattr(msg, 'items', []))} items to "
                                       f"{shared.count} steps")
            msg = msg.items[index]
        if isinstance(msg, Error):
            if msg.code in FAILOVER_CODES:
                raise self._fail(node, f"answered {printable(msg.code, 32)}")
            # the request itself was refused (a limit, a bad session): tell the job, in the node's words
            raise SlowllmError(f"node {printable(node.name, 64)} refused the request: {printable(msg.message)}",
                               code="bad_input" if msg.code == "bad_input" else "error")
        if not isinstance(msg, Result) or msg.id != msg_id:
            raise self._lied(node, f"answered {msg.type!r} to a request")
        if msg.tensor is None:
            if expect is not None:
                raise self._lied(node, "answered no tensor")
            return None
        try:
            tensor = decode_tensor(msg.tensor, self.limits)
        except ProtocolError:
            raise self._lied(node, "sent an undecodable tensor") from None
        if expect is None or tuple(tensor.shape) != tuple(expect) or not tensor.is_floating_point():
            raise self._lied(node, f"sent a {msg.tensor.dtype} tensor of shape {list(tensor.shape)[:8]}, expected "
                                   f"{list(expect) if expect else 'none'}")
        if not torch.isfinite(tensor).all():
            raise self._lied(node, "sent non-finite values")
        self.served_by.add(node)
        return tensor.float()

    def _checking(self) -> bool:
        """Is this thread running a verification re-run (which is never verified again, nor waits)?"""
        return getattr(self._local, "checking", False)

    def _check(self, again, avoid: set):
        self._local.checking = True
        try:
            return again(avoid)
        finally:
            self._local.checking = False

    def _verified(self, node: "NodeLink", a: int, b: int, primary, mask: torch.Tensor, again,
                  truth) -> torch.Tensor:
        """`primary()`, the hop's answer from `node` for blocks a..b, checked:

        - a node the coordinator has never checked itself (on probation) has its hop recomputed by the
          referee (`truth(dtype, int8)`: the span computed at the coordinator with the arithmetic the node
          declares), once: a node that lies from its first hop is banned and its answer never used;
        - otherwise, with probability --verify, re-run elsewhere at the same time (`again(exclude)`: one
          node covering a..b or a route of several; the check costs compute, not latency). On a
          disagreement the referee decides and bans whoever is wrong; when they agree, the referee still
          recomputes a --verify fraction of those hops (and every hop where a checker is on probation),
          so two nodes that tell the same lie are caught too.
        The hop's result is an answer the referee confirmed when it judged (or, for a liar, its own fp32
        computation): a lying node never changes the output of a hop the referee judged.
        """
        judge = self.referee is not None and self.router.verify > 0 and not self._checking()
        if judge and node.refereed == 0:
            return self._judge(node, a, b, primary(), mask, truth)
        pending = None
        if not self._checking() and self.router.verify > 0 and self.rng.random() < self.router.verify:
            # checked by healthy nodes only: a node being avoided (it failed or timed out lately) would
            # make the job wait for its timeout just to check a hop
            now = time.monotonic()
            avoid = {node} | {x for x in self.router.nodes if x.avoid_until > now}
            if self.router.missing(a, b, exclude=avoid):  # no other node covers some of a..b
                self.router.record_verification(None, agreed=None)
            else:
                pending = _CHECKS.submit(self._check, again, avoid)
        out = primary()
        if pending is None:
            return out
        try:
            rerun = pending.result()
        except (SlowllmError, concurrent.futures.CancelledError) as e:
            # the check could not run (a checker failed, refused, was busy, or the job was cancelled): the
            # user's answer stands unchecked, as when no second node covers the span
            log.info("verification of blocks %d-%d could not run: %s", a, b, e)
            self.router.record_verification(None, agreed=None)
            return out
        if rerun is None:  # too large to re-send
            self.router.record_verification(None, agreed=None)
            return out
        check, others = rerun
        agreed = agree(out, check, mask, tolerance(node.precision, *(x.precision for x in others)))
        self.router.record_verification(node, agreed=agreed)
        if not judge:
            return out
        if agreed and all(x.refereed for x in others) and self.rng.random() >= self.router.verify:
            return out
        if agreed:
            self.router.record_collusion_check()
        answer = self._judge(node, a, b, out, mask, truth)
        if len(others) == 1:  # (a re-run over several nodes is wrong somewhere: each is judged as a primary)
            self._judge(others[0], a, b, check, mask, truth)
        return answer

    def _judge(self, node: "NodeLink", a: int, b: int, out: torch.Tensor, mask: torch.Tensor, truth) -> torch.Tensor:
        """The referee's verdict on `node`'s answer for blocks a..b: the answer when it is right (the node
        counts as checked), else the node is banned and the referee's own computation is the answer."""
        int8 = node.quantization == "int8"
        reference = truth(node.dtype, int8)
        if reference is None:  # (a session too long to recompute in one request: judged at a later hop)
            return out
        own = ["int8"] if self.referee.checkpoint.int8 and not int8 else []  # cannot reproduce its arithmetic
        if agree(out, reference, mask, referee_tolerance(node.dtype, *own)):
            self.router.record_refereed(node)
            return out
        why = f"its answer for blocks {a}-{b} disagreed with the coordinator's own computation"
        self.router.loop.call_soon_threadsafe(self.router.ban, node, why)
        # the hop's answer: the coordinator's own, in full precision from its weights (not the int8 or bf16
        # arithmetic the liar declared: nothing of the liar's choosing shapes the output)
        return reference if node.dtype == "float32" and not int8 else truth("float32", False)

    def _with_failover(self, first: int, last: int, exclude: set, run):
        """Route from block `first` towards `last` and `run(node, a, b)` on the first span; when its node
        fails, exclude it and route again. Returns (node, a, b, result). The one retry loop of this chain."""
        while True:
            # a verification re-run never waits for nodes: the hop's answer is there, only its check is not
            routes = self._call(self.router.wait_route(first, last, exclude, self.notify, self.cancel,
                                                       wait=0 if self._checking() else None))
            node, a, b = routes[0]
            try:
                return node, a, b, run(node, a, b)
            except NodeFailed as e:
                exclude.add(e.node)
                if len(exclude) > MAX_FAILOVERS:
                    raise UnavailableError(f"blocks {first}-{last} failed on {len(exclude)} nodes in a row: "
                                           "retry the job later.") from None

    # ---- stateless forward / backward ----------------------------------------------------------
    def _forward_range(self, first: int, last: int, hidden: torch.Tensor, mask: torch.Tensor,
                       avoid: set = frozenset(), nodes: list | None = None):
        """Output of blocks first..last, and each span's (first, last, input) as actually run.

        Nodes in `avoid` are not used; `nodes` collects the nodes that were."""
        wire_mask, spans, exclude, block = encode_mask(mask), [], set(avoid), first
        while block <= last:
            def run(node, a, b, h=hidden):
                def primary():
                    return self._exchange(node, lambda i: Forward(
                        id=i, first=a, last=b, hidden=self._wire(node, h, self.compression), mask=wire_mask,
                        compression=self.compression, job=self.job), tuple(h.shape), b - a + 1)
                return self._verified(node, a, b, primary, mask,
                                      lambda skip: self._rerun_forward(a, b, h, mask, skip),
                                      lambda dtype, int8: self.referee.forward(a, b, h, mask, dtype, int8))
            node, a, b, out = self._with_failover(block, last, exclude, run)
            if nodes is not None:
                nodes.append(node)
            spans.append((a, b, hidden))
            hidden, block = out, b + 1
        return hidden, spans

    def _rerun_forward(self, a: int, b: int, hidden: torch.Tensor, mask: torch.Tensor, avoid: set):
        used: list = []
        return self._forward_range(a, b, hidden, mask, avoid, used)[0], used

    def _backward_range(self, first: int, last: int, hidden, mask, grad, avoid: set = frozenset(),
                        nodes: list | None = None) -> torch.Tensor:
        class Split(Exception):
            pass

        def run(node, a, b):
            if b < last:  # no single node holds the span any more
                raise Split
            def primary():
                out = self._exchange(node, lambda i: Backward(
                    id=i, first=a, last=b, hidden=self._wire(node, hidden), mask=encode_mask(mask),
                    grad=self._wire(node, grad), job=self.job), tuple(hidden.shape), b - a + 1, backward=True)
                if nodes is not None:
                    nodes.append(node)
                return out
            return self._verified(node, a, b, primary, mask,
                                  lambda skip: self._rerun_backward(a, b, hidden, mask, grad, skip),
                                  lambda dtype, int8: self.referee.backward(a, b, hidden, mask, grad, dtype, int8))

        try:
            return self._with_failover(first, last, set(avoid), run)[3]
        except Split:  # recompute the span's pieces forward, then backward through each in reverse
            _, pieces = self._forward_range(first, last, hidden, mask, avoid, nodes)
            for a, b, h in reversed(pieces):
                grad = self._backward_range(a, b, h, mask, grad, avoid, nodes)
            return grad

    def _rerun_backward(self, a: int, b: int, hidden, mask, grad, avoid: set):
        used: list = []
        return self._backward_range(a, b, hidden, mask, grad, avoid, used), used

    # ---- many at once -----------------------------------------------------------------------------
    @property
    def pipeline_depth(self) -> int:
        return self.router.stages()

    def pipelined(self, fn, items):
        """Up to `pipeline_depth` items in flight, each in its own thread (its hops, failovers and checks as
        alone); results in order. A failure is raised when its item's turn comes."""
        depth = self.pipeline_depth
        if depth <= 1:
            yield from map(fn, items)
            return
        window: collections.deque = collections.deque()
        try:
            for item in items:
                window.append(_PIPELINE.submit(fn, item))
                if len(window) >= depth:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()

    def stepping(self):
        if self.stepper is None:
            return contextlib.nullcontext()
        return self.stepper.member()

    def step_sessions(self, steps):
        """Through the coordinator's stepping loop, in the next wave with every other generation's steps."""
        if self.stepper is not None:
            return self.stepper.run(self, steps)
        if len(steps) <= 1:
            return super().step_sessions(steps)
        outcomes = self.step_gang(steps)
        for x in outcomes:
            if isinstance(x, BaseException):
                raise x
        return outcomes

    def step_gang(self, steps) -> list:
        """Every session's step at once, each on its own thread; each node is told how many of them to
        expect, so its outbox sends them as one Steps message. Returns each step's output or exception."""
        expected: collections.Counter = collections.Counter()
        for session, hidden, mask in steps:
            if hidden.numel() * 4 <= OUTBOX_STEP_BYTES:  # (bigger ones are sent alone)
                expected.update(span.node for span in session.spans)

        wave = next(_WAVES)

        def tell() -> None:
            for node, count in expected.items():
                node.expect(wave, count)
        self.router.loop.call_soon_threadsafe(tell)  # (runs before the steps' own callbacks: FIFO)

        def step(session, hidden, mask):
            _WAVE.id = wave
            try:
                return session.step(hidden, mask)
            finally:
                _WAVE.id = None
        futures = [_PIPELINE.submit(step, session, hidden, mask) for session, hidden, mask in steps]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except BaseException as e:  # noqa: BLE001 - this step's job gets it
                outcomes.append(e)
        return outcomes

    def forward(self, batches: Iterable[Batch]) -> Iterator[torch.Tensor]:
        return self.pipelined(lambda b: self._forward_range(0, self.n_layer - 1, b.hidden.float(), b.mask)[0], batches)

    def forward_for_backward(self, batch: Batch):
        out, spans = self._forward_range(0, self.n_layer - 1, batch.hidden.float(), batch.mask)
        return out, _RemoteTape(spans, batch.mask)

    def backward(self, tape: _RemoteTape, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.float()
        for a, b, hidden in reversed(tape.spans):
            grad = self._backward_range(a, b, hidden, tape.mask, grad)
        return grad

    def open_session(self, batch_size: int, max_length: int) -> ChainSession:
        return RemoteSession(self, max_length)


@dataclass
class _Span:
    node: "NodeLink"
    first: int
    last: int
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    inputs: list[torch.Tensor] = field(default_factory=list)  # every step's new positions, for replay
    mask: torch.Tensor | None = None  # the latest mask (earlier ones are its prefixes)
    cut: int | None = None  # a rollback the node has not heard of yet: sent with the next step

    def rollback(self, n: int) -> None:
        """Drop the last `n` positions from the replay record; the node cuts its cache at the next step."""
        while n and self.inputs:
            last = self.inputs.pop()
            if last.shape[1] > n:
                self.inputs.append(last[:, : last.shape[1] - n])
                n = 0
            else:
                n -= last.shape[1]
        self.cut = sum(x.shape[1] for x in self.inputs)


class RemoteSession(ChainSession):
    """A generation session: nodes keep the KV caches; the coordinator keeps each span's past inputs."""

    def __init__(self, chain: RemoteChain, max_length: int):
        self.chain, self.max_length = chain, max_length
        routes = chain._call(chain.router.wait_route(notify=chain.notify, cancel=chain.cancel))
        self.spans = [_Span(node, a, b) for node, a, b in routes]
        chain.router.open_session(self)

    def _step_span(self, span: _Span, node: "NodeLink", hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """New positions `hidden` through `span` on `node`, in as many frames as the wire needs."""
        rows, new, total = hidden.shape[0], hidden.shape[1], mask.shape[1]
        per_frame = self.chain.step_positions(rows, total)
        if per_frame < 1:
            raise InputError(f"a session of {total} positions x {rows} rows cannot be sent within the coordinator's "
                             f"--max-message-size ({self.chain.limits.max_frame} bytes): use fewer or shorter prompts.")
        past = total - new

        def primary() -> torch.Tensor:
            outs = []
            for start in range(0, new, per_frame):
                end = min(new, start + per_frame)
                piece, piece_mask = hidden[:, start:end], mask[:, : past + end]
                small = piece.numel() * 4 <= OUTBOX_STEP_BYTES  # decode steps: merged with other sessions'
                outs.append(self.chain._exchange(node, lambda i, h=piece, m=piece_mask, cut=span.cut: Step(
                    id=i, session=span.session, first=span.first, last=span.last, hidden=self.chain._wire(node, h),
                    mask=encode_mask(m), max_length=self.max_length, past=cut, job=self.chain.job),
                    tuple(piece.shape), span.last - span.first + 1, batched=small))
                span.cut = None  # the node has cut its cache
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        # A second node has no KV cache of this session: it checks the step by running the span's whole
        # history (kept for failover anyway) statelessly; the last `new` positions must agree.
        a, b, chain = span.first, span.last, self.chain

        def history() -> torch.Tensor | None:
            past_inputs = torch.cat(span.inputs, dim=1) if len(span.inputs) > 1 else span.inputs[0]
            if past_inputs.shape[1] != total or rows * total > chain.max_batch_tokens:
                return None
            return past_inputs

        def again(avoid):
            full = history()
            if full is None:
                return None
            check, used = chain._rerun_forward(a, b, full, mask, avoid)
            return check[:, -new:], used

        return chain._verified(node, a, b, primary, mask, again,
                               lambda dtype, int8: None if (h := history()) is None else
                               chain.referee.forward(a, b, h, mask, dtype, int8)[:, -new:])

    def _replace(self, index: int, failed: "NodeLink") -> torch.Tensor:
        """Rebuild span `index` on other nodes by replaying its inputs; returns the latest step's output."""
        old = self.spans[index]
        self._close([old], wait=False)  # frees its KV cache if the node is still there
        # All past steps at once (in as few frames as fit): under the causal mask these are the same keys
        # and values as step by step, for one round trip per frame instead of one per generated token.
        hidden, mask, latest = torch.cat(old.inputs, dim=1), old.mask, old.inputs[-1].shape[1]
        fresh, block, exclude = [], old.first, {failed}
        while block <= old.last:
            def run(node, a, b, h=hidden):
                span = _Span(node, a, b, inputs=[h], mask=mask)
                self.chain.router.record_replay(h.numel() * 4)
                try:
                    return span, self._step_span(span, node, h, mask)
                except NodeFailed:
                    self._close([span], wait=False)
                    raise
            _, _, b, (span, hidden) = self.chain._with_failover(block, old.last, exclude, run)
            fresh.append(span)
            block = b + 1
        self.spans[index:index + 1] = fresh
        return hidden[:, -latest:]

    def step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        index = 0
        while index < len(self.spans):
            span = self.spans[index]
            span.inputs.append(hidden)
            span.mask = mask
            try:
                hidden = self._step_span(span, span.node, hidden, mask)
                index += 1
            except NodeFailed as e:
                count = len(self.spans)
                hidden = self._replace(index, e.node)
                index += len(self.spans) - count + 1
        return hidden

    def rollback(self, n: int) -> None:
        if n:
            for span in self.spans:
                span.rollback(n)

    def _close(self, spans: list[_Span], wait: bool = True) -> None:
        for span in spans:
            if not span.node.connected:
                continue  # gone: nothing left to free
            msg_id = span.node.next_id()
            frame = span.node.channel.pack(CloseSession(id=msg_id, session=span.session))
            future = asyncio.run_coroutine_threadsafe(span.node.request(msg_id, frame, timeout=10),
                                                      self.chain.router.loop)
            if wait:
                try:
                    future.result(timeout=11)
                except Exception:
                    pass  # expired, or never opened there (the node failed at its first step)
            else:
                future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def close(self) -> None:
        self.chain.router.close_session(self)
        self._close(self.spans)
