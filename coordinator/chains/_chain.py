"""The chain interface: what every job needs from "all the blocks, wherever they run".

Jobs (score, generate, tune) are written once against `Chain`. Two implementations exist: `LocalChain`
streams the blocks from disk in this process; `RemoteChain` sends activations through nodes over
WebSockets. Hidden states cross this interface in the chain's compute dtype, left-padded, with a 0/1
token mask.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from slowllm.node import Batch

__all__ = ["Batch", "Chain", "ChainSession", "Head", "with_heads"]

T, R = TypeVar("T"), TypeVar("R")
# A job on a chain of several stages is cut into about this many micro-batches per stage, so that while
# one is at the second node the next is at the first (GPipe-style): every stage busy but at the ends.
MICRO_BATCHES_PER_STAGE = 4
MIN_MICRO_BATCH_TOKENS = 64  # below this a micro-batch costs its round trip more than it gains


@dataclass(frozen=True, eq=False)
class Head:
    """What a generation wants of a step besides its hidden states: the logits of each row's last position
    (a prompt step) or of every new position (a decode step, drafted positions too). The steps that share a
    pass have their heads computed together (`with_heads`): one read of the LM head for many generations
    instead of one each (the coordinator's largest cost per step when many people generate at once)."""

    ends: Any  # the model's ends (`ModelEnds`): final_norm, logits, invariant_rows
    last: bool = False

    def rows(self, out: torch.Tensor) -> torch.Tensor:
        return out[:, -1] if self.last else out.reshape(-1, out.shape[-1])


def with_heads(outs: Sequence, heads: Sequence[Head | None] | None) -> list:
    """Each step's output paired with the logits its head asks for: (out, logits), or (out, None) without a
    head; an exception (a step that failed) stays as it is. Steps on the same ends share LM-head calls up to
    `ends.invariant_rows` positions, where every position gets exactly the numbers it gets alone; a bigger
    step, or ends without batch-invariant kernels (0), gets a call of its own, as it would alone."""
    if heads is None:
        return list(outs)
    result: list = [x if isinstance(x, BaseException) else (x, None) for x in outs]
    packs: dict[int, tuple[Any, list[tuple[int, torch.Tensor]]]] = {}  # id(ends) -> (ends, [(step, rows)])

    def flush(ends, pack: list[tuple[int, torch.Tensor]]) -> None:
        logits = ends.logits(ends.final_norm(torch.cat([rows for _, rows in pack])))
        for (i, rows), part in zip(pack, logits.split([rows.shape[0] for _, rows in pack])):
            result[i] = (outs[i], part)

    for i, (out, head) in enumerate(zip(outs, heads)):
        if head is None or isinstance(out, BaseException):
            continue
        rows, most = head.rows(out).float(), head.ends.invariant_rows
        if rows.shape[0] > most:  # alone, as without company
            flush(head.ends, [(i, rows)])
            continue
        ends, pack = packs.setdefault(id(head.ends), (head.ends, []))
        if sum(r.shape[0] for _, r in pack) + rows.shape[0] > most:
            flush(ends, pack)
            pack.clear()
        pack.append((i, rows))
    for ends, pack in packs.values():
        if pack:
            flush(ends, pack)
    return result


class ChainSession(ABC):
    """A generation session: the blocks keep keys/values of everything stepped so far."""

    @abstractmethod
    def step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run new positions `hidden` [B, q, H]; `mask` [B, past + q] covers past and new tokens."""

    @abstractmethod
    def rollback(self, n: int) -> None:
        """Forget the last `n` positions stepped (drafted tokens the big model rejected): the next step's
        mask covers what is left. Every implementation also drops them from what it keeps for later
        (spilled caches, node sessions, the replay record of failover)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Chain(ABC):
    n_layer: int
    dtype: torch.dtype
    max_batch_tokens: int  # padded tokens per batch: the batching target (memory plan, wire)
    max_request_tokens: int = 1 << 62  # the most one forward/backward can carry at all (the wire's limit)
    max_batch_rows: int = 1 << 30
    head_tokens: int = 1 << 16  # positions per LM-head pass (bounded by the chain's memory plan)
    pipeline_depth: int = 1  # stages that compute at once (a remote chain: the nodes of a route)

    @abstractmethod
    def forward(self, batches: Iterable[Batch]) -> Iterator[torch.Tensor]:
        """Outputs of the last block for each batch, in order. Batches may be consumed lazily."""

    @abstractmethod
    def forward_for_backward(self, batch: Batch) -> tuple[torch.Tensor, object]:
        """The output for one batch, and a tape: what `backward` needs of this forward (kept inputs)."""

    @abstractmethod
    def backward(self, tape, grad: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the input of the forward that made `tape` (which it consumes)."""

    @abstractmethod
    def open_session(self, batch_size: int, max_length: int) -> ChainSession: ...

    def pipelined(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """`fn(item)` for each item, in order. A chain of several stages runs up to `pipeline_depth` of them
        at once, so that each stage works on one while the next stage works on another."""
        for item in items:
            yield fn(item)

    def batch_tokens(self, lengths: Sequence[int]) -> int:
        """Padded tokens per batch for a job of items of these lengths: the chain's limit, or on a pipeline
        small enough to cut the job into `MICRO_BATCHES_PER_STAGE` micro-batches per stage."""
        if self.pipeline_depth <= 1 or not lengths:
            return self.max_batch_tokens
        want = -(-sum(lengths) // (MICRO_BATCHES_PER_STAGE * self.pipeline_depth))
        return min(self.max_batch_tokens, max(MIN_MICRO_BATCH_TOKENS, want, max(lengths)))

    def step_sessions(self, steps: Sequence[tuple[ChainSession, torch.Tensor, torch.Tensor]],
                      heads: Sequence[Head | None] | None = None) -> list:
        """`session.step(hidden, mask)` for each; a chain that streams its weights does them in one pass.
        With `heads` (one per step, or None), each output comes as (hidden, logits) (`with_heads`)."""
        return with_heads([session.step(hidden, mask) for session, hidden, mask in steps], heads)

    def stepping(self):
        """Around a generation's loop: a chain with a stepping loop counts it as running (see _scheduler)."""
        return contextlib.nullcontext()

    def set_progress(self, on: bool) -> None:
        """Chains that show progress bars (local streaming) turn them on or off."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plan_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Group item indices into batches, similar lengths together, each within max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and (longest * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
