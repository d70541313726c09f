"""A generation session over the remote chain: nodes keep the KV caches, the coordinator keeps each span's
past inputs, so a failed node's span is rebuilt on another by replaying them (one round trip per frame,
not per token): the output is identical to an uninterrupted run, the client sees only a delay.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from slowllm.coordinator.swarm._links import merges
from slowllm.protocol import CloseSession, InputError, Step

from ._chain import ChainSession
from ._exchange import NodeFailed, encode_mask
from ._verification import Rerun

if TYPE_CHECKING:
    from slowllm.coordinator.swarm._links import NodeLink

    from ._remote import RemoteChain


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


@dataclass
class _StepHop:
    """New positions `hidden` through `span`, in as many frames as the wire needs. A second node has no KV
    cache of this session: it checks the step by running the span's whole history (kept for failover
    anyway) statelessly; the last `new` positions must agree."""

    session: "RemoteSession"
    span: _Span
    hidden: torch.Tensor
    mask: torch.Tensor

    @property
    def first(self) -> int:
        return self.span.first

    @property
    def last(self) -> int:
        return self.span.last

    def message(self, node: "NodeLink", msg_id: int, start: int, end: int) -> Step:
        """The Step carrying new positions start..end-1 to `node` (with the rollback the node has not heard of)."""
        chain, span = self.session.chain, self.span
        past = self.mask.shape[1] - self.hidden.shape[1]
        return Step(id=msg_id, session=span.session, first=span.first, last=span.last,
                    hidden=chain.exchanges.wire(node, self.hidden[:, start:end]),
                    mask=encode_mask(self.mask[:, : past + end]), max_length=self.session.max_length,
                    past=span.cut, job=chain.job)

    def send(self, node: "NodeLink") -> torch.Tensor:
        chain, span, hidden, mask = self.session.chain, self.span, self.hidden, self.mask
        rows, new, total = hidden.shape[0], hidden.shape[1], mask.shape[1]
        per_frame = chain.step_positions(rows, total)
        if per_frame < 1:
            raise InputError(f"a session of {total} positions x {rows} rows cannot be sent within the coordinator's "
                             f"--max-message-size ({chain.limits.max_frame} bytes): use fewer or shorter prompts.")
        outs = []
        for start in range(0, new, per_frame):
            end = min(new, start + per_frame)
            piece = hidden[:, start:end]
            outs.append(chain.exchanges.exchange(node, lambda i, a=start, b=end: self.message(node, i, a, b),
                                                 tuple(piece.shape), span.last - span.first + 1,
                                                 batched=merges(piece)))  # decode steps: merged with others'
            span.cut = None  # the node has cut its cache
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _history(self) -> torch.Tensor | None:
        inputs, total = self.span.inputs, self.mask.shape[1]
        past_inputs = torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]
        if past_inputs.shape[1] != total or self.hidden.shape[0] * total > self.session.chain.max_batch_tokens:
            return None
        return past_inputs

    def again(self, avoid: set) -> Rerun | None:
        full = self._history()
        if full is None:
            return None
        used: list = []
        check = self.session.chain._forward_range(self.first, self.last, full, self.mask, avoid, used)[0]
        return Rerun(check[:, -self.hidden.shape[1]:], used)

    def truth(self, dtype: str, int8: bool) -> torch.Tensor | None:
        full = self._history()
        if full is None:
            return None
        referee = self.session.chain.verification.referee
        return referee.forward(self.first, self.last, full, self.mask, dtype, int8)[:, -self.hidden.shape[1]:]


class RemoteSession(ChainSession):
    """A generation session: nodes keep the KV caches; the coordinator keeps each span's past inputs."""

    def __init__(self, chain: "RemoteChain", max_length: int):
        self.chain, self.max_length = chain, max_length
        routes = chain.exchanges.call(chain.router.wait_route(notify=chain.notify, cancel=chain.cancel))
        self.spans = [_Span(node, a, b) for node, a, b in routes]
        chain.router.open_session(self)

    def hop(self, span: _Span, hidden: torch.Tensor, mask: torch.Tensor) -> _StepHop:
        return _StepHop(self, span, hidden, mask)

    def _step_span(self, span: _Span, node: "NodeLink", hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.chain.verification.verified(node, self.hop(span, hidden, mask))

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
            served = self.chain._with_failover(block, old.last, exclude, run)
            span, hidden = served.result
            fresh.append(span)
            block = served.last + 1
        self.spans[index:index + 1] = fresh
        return hidden[:, -latest:]

    def step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.walk(hidden.float(), mask)

    def enter(self, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> _Span:
        """Span `index` takes the step's input `hidden` (kept for a replay)."""
        span = self.spans[index]
        span.inputs.append(hidden)
        span.mask = mask
        return span

    def walk(self, hidden: torch.Tensor, mask: torch.Tensor, index: int = 0,
             failed: "NodeLink | None" = None) -> torch.Tensor:
        """The step from span `index` to the last. `failed`: span `index` already took `hidden` and its node
        failed on it (a wave's hop, `_gang.py`), so it is rebuilt first."""
        while index < len(self.spans):
            if failed is None:
                span = self.enter(index, hidden, mask)
                try:
                    hidden = self._step_span(span, span.node, hidden, mask)
                    index += 1
                    continue
                except NodeFailed as e:
                    failed = e.node
            count = len(self.spans)
            hidden = self._replace(index, failed)
            index += len(self.spans) - count + 1
            failed = None
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
