"""Local mode: the chain is the disk-streaming executor in this process, within a RAM budget
(or, with --keep-in-ram, every block resident: `ResidentChain`, which steps several generations at once in
merged passes, as a node does).

`plan_memory` splits `--max-ram` (the whole process, interpreter included) between what is already
used, the blocks in flight, the model's ends and activations, and refuses up front, saying how much is
needed, when one block cannot fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from slowllm.node import (BlockCache, Checkpoint, ResidentBlocks, StreamingExecutor, block_nbytes, format_size,
                          process_rss)
from slowllm.node.engine._blocks import work_width
from slowllm.node.engine._merge import StepPart, plan_block_steps, run_merged_steps
from slowllm.node.engine._memory import linear_dtype
from slowllm.protocol import MemoryBudgetError

from ._chain import Batch, Chain, ChainSession, with_heads


@dataclass
class MemoryPlan:
    max_ram: int
    baseline: int  # the process before any model memory (interpreter, torch, libraries)
    blocks: int  # weights in flight
    prefetch: bool
    resident_embedding: bool
    ends: int
    activations: int  # SpillStore budget
    work: int  # transient memory inside a block / LM-head chunk
    max_batch_tokens: int
    head_chunk_bytes: int


def _work_per_token(checkpoint: Checkpoint, dtype: torch.dtype, length: int) -> int:
    # Inside one block, per token: projections, context, the MLP's inner width, norms and residuals
    # (`work_width`: ~16 hidden vectors for Bloom), attention scores in fp32 (x3 copies), doubled for the
    # recompute graph of backward.
    c = checkpoint.config
    return 2 * (work_width(c) * dtype.itemsize + 3 * c.num_attention_heads * length * 4)


def plan_memory(checkpoint: Checkpoint, dtype: torch.dtype, max_ram: int, *, prefetch: bool = True,
                max_length: int = 2048, device: str = "cpu") -> MemoryPlan:
    baseline = process_rss()
    raw_block = checkpoint.block_nbytes()
    linears = linear_dtype(checkpoint.storage_dtype(), dtype, device, checkpoint.int8)  # as BlockStream decides
    zero_copy = checkpoint.storage_dtype() == linears
    compute_block = block_nbytes(checkpoint.config, dtype, checkpoint.int8, linears)

    def blocks_bytes(pre: bool) -> int:
        return raw_block * (2 if pre else 1) if zero_copy else compute_block + raw_block

    embedding = sum(checkpoint.nbytes(checkpoint.matrix_keys(k)) for k in {checkpoint.embedding_key, checkpoint.head_key})
    per_token = _work_per_token(checkpoint, dtype, max_length)
    min_work = per_token * 16 + 16 * checkpoint.hidden_size * 256 * 4
    # Headroom for what grows beside the model: tokenizer, Python objects of the job, allocator slack.
    reserve = max(96 << 20, max_ram // 20)
    free = max_ram - baseline - reserve
    if free < blocks_bytes(prefetch) + min_work:
        prefetch = False
    need = baseline + reserve + blocks_bytes(prefetch) + min_work
    if max_ram < need:
        raise MemoryBudgetError(
            f"--max-ram {format_size(max_ram)} is too small: streaming this model needs at least "
            f"{format_size(need)} (one block is {format_size(compute_block)} in {str(dtype).removeprefix('torch.')}, "
            f"and this process already uses {format_size(baseline)}); raise --max-ram"
            + (" or use --dtype bfloat16." if dtype == torch.float32 else ".")
        )
    rest = free - blocks_bytes(prefetch)
    resident = embedding <= rest // 4  # the head is re-read per pass otherwise: keep it if it is cheap
    rest -= embedding if resident else 0
    work = max(min_work, rest * 2 // 5)
    activations = max(0, rest - work)
    head_chunk = max(16 * checkpoint.hidden_size * 256, min(256 << 20, work // 4))
    return MemoryPlan(max_ram=max_ram, baseline=baseline, blocks=blocks_bytes(prefetch), prefetch=prefetch,
                      resident_embedding=resident, ends=embedding if resident else 0, activations=activations,
                      work=work, max_batch_tokens=max(16, (work - head_chunk) // per_token),
                      head_chunk_bytes=head_chunk)


class LocalChain(Chain):
    """All blocks streamed from the checkpoint in this process."""

    def __init__(self, checkpoint: Checkpoint, plan: MemoryPlan, *, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", spill_dir: str | None = None, progress: bool | None = None):
        self.checkpoint = checkpoint
        self.plan = plan
        self.n_layer = checkpoint.n_layer
        self.dtype = dtype
        self.max_batch_tokens = plan.max_batch_tokens
        self.head_tokens = max(64, plan.work // 2 // (checkpoint.hidden_size * 8 + 1))
        self.executor = StreamingExecutor(checkpoint, dtype=dtype, device=device,
                                          activation_budget=plan.activations, prefetch=plan.prefetch,
                                          spill_dir=spill_dir, progress=progress, score_budget=plan.work)

    def forward(self, batches: Iterable[Batch]) -> Iterator[torch.Tensor]:
        return self.executor.forward(batches)

    def forward_for_backward(self, batch: Batch):
        return self.executor.forward_for_backward(batch)

    def backward(self, tape, grad: torch.Tensor) -> torch.Tensor:
        return self.executor.backward(tape, grad)

    def open_session(self, batch_size: int, max_length: int) -> ChainSession:
        return _LocalSession(self.executor.session(max_length))

    def step_sessions(self, steps, heads=None):
        return with_heads(self.executor.step_sessions([(session._session, h, m) for session, h, m in steps]), heads)

    def set_progress(self, on: bool) -> None:
        self.executor.progress = None if on else False


class _LocalSession(ChainSession):
    def __init__(self, session):
        self._session = session

    def step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._session.step(hidden, mask)

    def rollback(self, n: int) -> None:
        self._session.rollback(n)

    def close(self) -> None:
        self._session.close()


class ResidentChain(Chain):
    """Every block kept in memory in this process: no disk in the loop once loaded.

    For models that fit (bloom-560m ... bloom-7b1 on a large PC), and the in-process baseline that the
    network is measured against.
    """

    def __init__(self, checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.n_layer = checkpoint.n_layer
        self.dtype = dtype
        self.max_batch_tokens = 1 << 14
        self.blocks = ResidentBlocks(checkpoint, 0, self.n_layer - 1, dtype, device)

    def forward(self, batches: Iterable[Batch]) -> Iterator[torch.Tensor]:
        for batch in batches:
            yield self.blocks.forward(batch.hidden, batch.mask, 0, self.n_layer - 1)

    def forward_for_backward(self, batch: Batch):
        (out,) = list(self.forward([batch]))
        return out, batch  # the tape: the input itself (backward recomputes the blocks from it)

    def backward(self, tape: Batch, grad: torch.Tensor) -> torch.Tensor:
        return self.blocks.backward(tape.hidden, tape.mask, grad, 0, self.n_layer - 1)

    def open_session(self, batch_size: int, max_length: int) -> ChainSession:
        return _ResidentSession(self.blocks, max_length)

    def step_sessions(self, steps, heads=None):
        """Every session's step in merged passes over the blocks, as a node runs its sessions' steps
        (`plan_block_steps`, `run_merged_steps`): with several sessions (the HTTP API's users, a job's groups)
        each block's weights are read once per pass, not once per session, and each session gets its
        tokens as alone (the kernels' rows are batch invariant; `merge_rows` bounds a pass)."""
        sessions = [session for session, _, _ in steps]
        if len(steps) < 2 or len({id(s) for s in sessions}) < len(sessions):  # (a session twice: in turn)
            return super().step_sessions(steps, heads)
        parts = []
        for session, hidden, mask in steps:
            session.check(hidden, mask)
            parts.append(StepPart(hidden, mask, session.caches, str(id(session))))
        blocks = self.blocks
        outs: list = [None] * len(parts)
        for group in plan_block_steps(blocks, parts, self.dtype, blocks.score_budget, self.max_batch_tokens):
            for i, out in zip(group, run_merged_steps(blocks, [parts[i] for i in group], blocks.first, blocks.last)):
                outs[i] = out
                sessions[i].length = parts[i].mask.shape[1]
        return with_heads(outs, heads)


class _ResidentSession(ChainSession):
    def __init__(self, blocks: ResidentBlocks, max_length: int):
        self.blocks = blocks
        self.caches = {layer: BlockCache(limit=max_length) for layer in blocks.blocks}
        self.length = 0

    def check(self, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        if mask.shape[1] - hidden.shape[1] != self.length:
            raise ValueError(f"mask covers {mask.shape[1] - hidden.shape[1]} past positions, the session holds {self.length}")

    def step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.check(hidden, mask)
        out = self.blocks.forward(hidden, mask, self.blocks.first, self.blocks.last, self.caches)
        self.length = mask.shape[1]
        return out

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} positions")
        self.length -= n
        for cache in self.caches.values():
            cache.truncate(self.length)

    def close(self) -> None:
        self.caches.clear()
