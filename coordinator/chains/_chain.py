"""The chain interface: what every job needs from "all the blocks, wherever they run".

Jobs (score, generate, tune) are written once against `Chain`. Two implementations exist: `LocalChain`
streams the blocks from disk in this process; `RemoteChain` sends activations through nodes over
WebSockets. Hidden states cross this interface in the chain's compute dtype, left-padded, with a 0/1
token mask.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from slowllm.node import Batch

__all__ = ["Batch", "Chain", "ChainSession"]

T, R = TypeVar("T"), TypeVar("R")
# A job on a chain of several stages is cut into about this many micro-batches per stage, so that while
# one is at the second node the next is at the first (GPipe-style): every stage busy but at the ends.
MICRO_BATCHES_PER_STAGE = 4
MIN_MICRO_BATCH_TOKENS = 64  # below this a micro-batch costs its round trip more than it gains


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

    def step_sessions(self, steps: Sequence[tuple[ChainSession, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """`session.step(hidden, mask)` for each; a chain that streams its weights does them in one pass."""
        return [session.step(hidden, mask) for session, hidden, mask in steps]

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
