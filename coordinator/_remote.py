"""The remote chain: activations hop through nodes, and a failed hop moves to another node.

Every hop is a request from a job's worker thread to the coordinator's event loop. When a node dies,
disconnects or does not answer within the request timeout, the hop is retried on another node covering
the same blocks (one node or several), waiting up to `--wait-for-nodes` for one to register; the failed
node is avoided by the router for a while. Stateless forward/backward just re-run the span. Generation
sessions keep every step's input per span, so a replacement's KV cache is rebuilt by replaying them (in
one request): greedy output is identical to an uninterrupted run, the client sees only a delay.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from slowllm.node import Batch
from slowllm.protocol import (Backward, CloseSession, Forward, SlowllmError, Step, UnavailableError, decode_tensor,
                              encode_tensor)

from ._chain import Chain, ChainSession

if TYPE_CHECKING:
    from ._server import Coordinator, NodeLink

MAX_FAILOVERS = 8  # per span and operation: beyond this the job fails rather than loop forever


class NodeFailed(UnavailableError):
    def __init__(self, node: "NodeLink", message: str):
        super().__init__(message)
        self.node = node


class RemoteChain(Chain):
    def __init__(self, coordinator: "Coordinator", compression: str = "raw", notify=None):
        self.c = coordinator
        self.notify = notify  # tells the client what a job waits for
        self.n_layer = coordinator.checkpoint.n_layer
        self.dtype = torch.float32
        self.max_batch_tokens = coordinator.limits.max_batch_tokens // 4
        self.compression = compression
        self._kept: list[tuple[list[tuple[int, int, torch.Tensor]], torch.Tensor]] = []

    # ---- one hop -------------------------------------------------------------------------------
    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.c.loop).result()

    def _hop(self, node: "NodeLink", make) -> torch.Tensor | None:
        try:
            wire = self._call(node.request(make, timeout=self.c.request_timeout))
        except (UnavailableError, asyncio.TimeoutError, TimeoutError):
            self.c.penalize(node)
            self.c.failovers += 1
            raise NodeFailed(node, f"node {node.name} failed or timed out") from None
        return None if wire is None else decode_tensor(wire, self.c.limits)

    def _next_span(self, first: int, last: int, exclude: set) -> tuple["NodeLink", int, int]:
        return self._call(self.c.wait_route(first, last, exclude, self.notify))[0]

    # ---- stateless forward / backward ----------------------------------------------------------
    def _forward_range(self, first: int, last: int, hidden: torch.Tensor, mask: torch.Tensor):
        """Output of blocks first..last, and each span's (first, last, input) as actually run."""
        wire_mask, spans, exclude, block = encode_tensor(mask), [], set(), first
        while block <= last:
            node, a, b = self._next_span(block, last, exclude)
            try:
                out = self._hop(node, lambda i, h=hidden: Forward(
                    id=i, first=a, last=b, hidden=encode_tensor(h, self.compression), mask=wire_mask,
                    compression=self.compression))
            except NodeFailed:
                exclude.add(node)
                if len(exclude) > MAX_FAILOVERS:
                    raise
                continue
            spans.append((a, b, hidden))
            hidden, block = out, b + 1
        return hidden, spans

    def _backward_range(self, first: int, last: int, hidden, mask, grad) -> torch.Tensor:
        exclude: set = set()
        while True:
            node, a, b = self._next_span(first, last, exclude)
            if b < last:  # no single node holds the span any more: split it and recurse
                _, subspans = self._forward_range(first, last, hidden, mask)
                for sa, sb, sh in reversed(subspans):
                    grad = self._backward_range(sa, sb, sh, mask, grad)
                return grad
            try:
                return self._hop(node, lambda i: Backward(
                    id=i, first=a, last=b, hidden=encode_tensor(hidden), mask=encode_tensor(mask),
                    grad=encode_tensor(grad)))
            except NodeFailed:
                exclude.add(node)
                if len(exclude) > MAX_FAILOVERS:
                    raise

    def forward(self, batches: Iterable[Batch], keep_for_backward: bool = False) -> Iterator[torch.Tensor]:
        self._kept = []
        for batch in batches:
            out, spans = self._forward_range(0, self.n_layer - 1, batch.hidden.float(), batch.mask)
            if keep_for_backward:
                self._kept.append((spans, batch.mask))
            yield out

    def backward(self, grads: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(grads) != len(self._kept):
            raise RuntimeError("backward needs a preceding forward(keep_for_backward=True) of the same batches")
        out = []
        for grad, (spans, mask) in zip(grads, self._kept):
            grad = grad.float()
            for a, b, hidden in reversed(spans):
                grad = self._backward_range(a, b, hidden, mask, grad)
            out.append(grad)
        self._kept = []
        return out

    def open_session(self, batch_size: int, max_length: int) -> ChainSession:
        return RemoteSession(self, max_length)


@dataclass
class _Span:
    node: "NodeLink"
    first: int
    last: int
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # every step's input


class RemoteSession(ChainSession):
    """A generation session: nodes keep the KV caches; the coordinator keeps each span's past inputs."""

    def __init__(self, chain: RemoteChain, max_length: int):
        self.chain, self.max_length = chain, max_length
        self.spans = [_Span(node, a, b) for node, a, b in chain._call(chain.c.wait_route(notify=chain.notify))]
        chain.c.sessions.add(self)

    def _step(self, span: _Span, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.chain._hop(span.node, lambda i: Step(
            id=i, session=span.session, first=span.first, last=span.last, hidden=encode_tensor(hidden),
            mask=encode_tensor(mask), max_length=self.max_length))

    def _replace(self, index: int, exclude: set) -> torch.Tensor:
        """Rebuild span `index` on other nodes by replaying its inputs; returns the latest step's output."""
        old = self.spans[index]
        while True:
            fresh, block = [], old.first
            try:
                while block <= old.last:
                    node, a, b = self.chain._next_span(block, old.last, exclude)
                    fresh.append(_Span(node, a, b))
                    block = b + 1
                # All past steps in one request: the causal mask makes this the same keys and values as
                # step by step, for one round trip per span instead of one per generated token.
                hidden = torch.cat([h for h, _ in old.inputs], dim=1)
                mask, latest = old.inputs[-1][1], old.inputs[-1][0].shape[1]
                self.chain.c.replayed_bytes += hidden.numel() * 4
                for span in fresh:
                    span.inputs.append((hidden, mask))
                    hidden = self._step(span, hidden, mask)
                self.spans[index:index + 1] = fresh
                return hidden[:, -latest:]
            except NodeFailed as e:
                exclude.add(e.node)
                self._close(fresh)
                if len(exclude) > MAX_FAILOVERS:
                    raise

    def step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        index = 0
        while index < len(self.spans):
            span = self.spans[index]
            span.inputs.append((hidden, mask))
            try:
                hidden = self._step(span, hidden, mask)
                index += 1
            except NodeFailed as e:
                count = len(self.spans)
                hidden = self._replace(index, {e.node})
                index += len(self.spans) - count + 1
        return hidden

    def _close(self, spans: list[_Span]) -> None:
        for span in spans:
            try:
                self.chain._call(span.node.request(lambda i, s=span.session: CloseSession(id=i, session=s),
                                                   timeout=10))
            except (SlowllmError, asyncio.TimeoutError, TimeoutError):
                pass  # gone, expired or never opened there: nothing left to free

    def close(self) -> None:
        self.chain.c.sessions.discard(self)
        self._close(self.spans)
