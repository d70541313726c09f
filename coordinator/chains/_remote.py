"""The remote chain: activations hop through nodes, and a failed hop moves to another node.

A hop is one span of blocks on one node: `_exchange.py` sends it and checks the reply, `_verification.py`
has it checked (--verify, probation), and `_with_failover` here is the one retry loop: when a node dies,
disconnects, times out, answers `busy`/`internal` or sends a reply that is not what was asked (wrong shape
or dtype, non-finite values), the hop is retried on another node covering the same blocks (one node or
several), waiting up to `--wait-for-nodes` for one to register; the failed node is avoided by the router
for a while. Stateless forward/backward just re-run the span; generation sessions (`_session.py`) replay
a span's past inputs on its replacement, so greedy output is identical to an uninterrupted run.

Sizes come from the wire: every request is cut to fit `--max-message-size` from the hidden size, so a
long prompt is prefilled, and a session replayed, in as many frames as it takes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from slowllm.coordinator.swarm._links import merges
from slowllm.coordinator.swarm._verify import Referee
from slowllm.node import Batch
from slowllm.protocol import Backward, Forward, InputError, Limits, UnavailableError, WireTensor

from ._chain import Chain, ChainSession, with_heads
from ._exchange import FRAME_OVERHEAD, Exchanges, NodeFailed, current_wave, encode_mask
from ._gang import step_wave, together
from ._verification import Rerun, Verification

if TYPE_CHECKING:
    from slowllm.coordinator.scheduler._stepper import Stepper
    from slowllm.coordinator.swarm._links import NodeLink
    from slowllm.coordinator.swarm._router import Router

# micro-batches of pipelined jobs and the sessions of a merged step, each on its own thread while it runs
_PIPELINE = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="slowllm-pipeline")
_WAVES = itertools.count(1)
MAX_FAILOVERS = 8  # per span and operation: beyond this the job fails rather than loop forever
_SPLIT = object()  # a backward span that no single node holds any more


@dataclass
class Served:
    """A hop's outcome: who served blocks first..last, and what came of it."""

    node: "NodeLink"
    first: int
    last: int
    result: object


@dataclass
class _RemoteTape:
    spans: list[tuple[int, int, torch.Tensor]]  # (first, last, input) of each span as run
    mask: torch.Tensor


@dataclass
class _ForwardHop:
    chain: "RemoteChain"
    first: int
    last: int
    hidden: torch.Tensor
    mask: torch.Tensor
    wire_mask: WireTensor  # the mask as sent, encoded once for every span and failover of a forward

    def send(self, node: "NodeLink") -> torch.Tensor:
        c, h = self.chain, self.hidden
        return c.exchanges.exchange(node, lambda i: Forward(
            id=i, first=self.first, last=self.last, hidden=c.exchanges.wire(node, h, c.compression),
            mask=self.wire_mask, compression=c.compression, job=c.job), tuple(h.shape),
            self.last - self.first + 1)

    def again(self, avoid: set) -> Rerun:
        used: list = []
        return Rerun(self.chain._forward_range(self.first, self.last, self.hidden, self.mask, avoid, used)[0], used)

    def truth(self, dtype: str, int8: bool) -> torch.Tensor:
        return self.chain.verification.referee.forward(self.first, self.last, self.hidden, self.mask, dtype, int8)


@dataclass
class _BackwardHop:
    chain: "RemoteChain"
    first: int
    last: int
    hidden: torch.Tensor
    mask: torch.Tensor
    grad: torch.Tensor
    nodes: list | None  # collects the nodes that served

    def send(self, node: "NodeLink") -> torch.Tensor:
        x = self.chain.exchanges
        out = x.exchange(node, lambda i: Backward(
            id=i, first=self.first, last=self.last, hidden=x.wire(node, self.hidden), mask=encode_mask(self.mask),
            grad=x.wire(node, self.grad), job=self.chain.job), tuple(self.hidden.shape), self.last - self.first + 1,
            backward=True)
        if self.nodes is not None:
            self.nodes.append(node)
        return out

    def again(self, avoid: set) -> Rerun:
        used: list = []
        return Rerun(self.chain._backward_range(self.first, self.last, self.hidden, self.mask, self.grad, avoid,
                                                used), used)

    def truth(self, dtype: str, int8: bool) -> torch.Tensor:
        return self.chain.verification.referee.backward(self.first, self.last, self.hidden, self.mask, self.grad,
                                                        dtype, int8)


class RemoteChain(Chain):
    def __init__(self, router: "Router", limits: Limits, hidden_size: int, *, compression: str = "raw",
                 notify: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                 referee: Referee | None = None, job: str = "", stepper: "Stepper | None" = None):
        self.router, self.limits, self.hidden_size = router, limits, hidden_size
        self.job = job  # tags this chain's requests: nodes share their passes round robin between tags
        self.stepper = stepper  # the coordinator's stepping loop, which every generation's steps go through
        self.n_layer = router.n_layer
        self.dtype = torch.float32
        self.compression = compression
        self.notify = notify  # tells the client what a job waits for
        self.cancel = cancel or threading.Event()  # set when the client went away
        self.exchanges = Exchanges(router, limits, self.cancel)
        self.verification = Verification(router, referee)  # referee: decides disputes under --verify
        # forward: hidden [B, T, H] + mask [B, T]; backward carries hidden and grad: 8H + 8 bytes a token
        per_token = 8 * hidden_size + 8
        self.max_batch_tokens = min(limits.max_batch_tokens // 4, (limits.max_frame - FRAME_OVERHEAD) // per_token)
        self.max_request_tokens = self.max_batch_tokens
        if self.max_batch_tokens < 1:
            raise InputError(f"--max-message-size {limits.max_frame} bytes cannot carry one token of this model "
                             f"({per_token} bytes at hidden size {hidden_size}): raise it to at least 1MB.")

    @property
    def served_by(self) -> set:
        """Nodes whose answers this chain used (told when one is banned later)."""
        return self.exchanges.served_by

    def step_positions(self, rows: int, total: int) -> int:
        """New positions per step frame for `rows` rows whose mask covers `total` positions."""
        room = self.limits.max_frame - FRAME_OVERHEAD - rows * total
        return min(self.limits.max_batch_tokens // rows, max(0, room // (rows * self.hidden_size * 4)))

    def _with_failover(self, first: int, last: int, exclude: set, run) -> Served:
        """Route from block `first` towards `last` and `run(node, a, b)` on the first span; when its node
        fails, exclude it and route again. The one retry loop of this chain."""
        while True:
            # a verification re-run never waits for nodes: the hop's answer is there, only its check is not
            routes = self.exchanges.call(self.router.wait_route(first, last, exclude, self.notify, self.cancel,
                                                                wait=0 if self.verification.checking else None))
            node, a, b = routes[0]
            try:
                return Served(node, a, b, run(node, a, b))
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
            served = self._with_failover(block, last, exclude, lambda node, a, b, h=hidden: self.verification.verified(
                node, _ForwardHop(self, a, b, h, mask, wire_mask)))
            if nodes is not None:
                nodes.append(served.node)
            spans.append((served.first, served.last, hidden))
            hidden, block = served.result, served.last + 1
        return hidden, spans

    def _backward_range(self, first: int, last: int, hidden, mask, grad, avoid: set = frozenset(),
                        nodes: list | None = None) -> torch.Tensor:
        def run(node, a, b):
            if b < last:  # no single node holds the span any more
                return _SPLIT
            return self.verification.verified(node, _BackwardHop(self, a, b, hidden, mask, grad, nodes))

        served = self._with_failover(first, last, set(avoid), run)
        if served.result is not _SPLIT:
            return served.result
        # recompute the span's pieces forward, then backward through each in reverse
        _, pieces = self._forward_range(first, last, hidden, mask, avoid, nodes)
        for a, b, h in reversed(pieces):
            grad = self._backward_range(a, b, h, mask, grad, avoid, nodes)
        return grad

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

    def step_sessions(self, steps, heads=None):
        """Through the coordinator's stepping loop, in the next wave with every other generation's steps."""
        if self.stepper is not None:
            return self.stepper.run(self, steps, heads)
        if len(steps) <= 1:
            return super().step_sessions(steps, heads)
        outcomes = self.step_gang(steps)
        for x in outcomes:
            if isinstance(x, BaseException):
                raise x
        return with_heads(outcomes, heads)

    def step_gang(self, steps) -> list:
        """Every session's step at once; each step's output or exception. Decode steps hop together from
        this thread (`_gang.py`: one Steps message per node and hop); the others (prefills, steps cut into
        frames, --verify) each walk alone on a thread, each node told how many of them to expect so its
        outbox still sends them as one Steps message."""
        wave = [i for i, step in enumerate(steps) if together(*step)]
        alone = sorted(set(range(len(steps))) - set(wave))
        futures = self._step_threads([steps[i] for i in alone])  # (they run meanwhile)
        outcomes: list = [None] * len(steps)
        if wave:
            for i, out in zip(wave, step_wave(self.router, [steps[i] for i in wave], _PIPELINE)):
                outcomes[i] = out
        for i, future in zip(alone, futures):
            try:
                outcomes[i] = future.result()
            except BaseException as e:  # noqa: BLE001 - this step's job gets it
                outcomes[i] = e
        return outcomes

    def _step_threads(self, steps) -> list[concurrent.futures.Future]:
        """Each step walking alone on its own thread, in the same wave at every node it reaches."""
        if not steps:
            return []
        expected: collections.Counter = collections.Counter()
        for session, hidden, mask in steps:
            if merges(hidden):  # (bigger ones are sent alone)
                expected.update(span.node for span in session.spans)

        wave = next(_WAVES)

        def tell() -> None:
            for node, count in expected.items():
                node.expect(wave, count)
        self.router.loop.call_soon_threadsafe(tell)  # (runs before the steps' own callbacks: FIFO)

        def step(session, hidden, mask):
            current_wave.id = wave
            try:
                return session.step(hidden, mask)
            finally:
                current_wave.id = None
        return [_PIPELINE.submit(step, session, hidden, mask) for session, hidden, mask in steps]

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
        from ._session import RemoteSession

        return RemoteSession(self, max_length)
