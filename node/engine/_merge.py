"""Merged passes: the requests waiting at a node run through its blocks together, one weight read for all.

A decode step reads every weight of a block to compute one row: with 8 sessions stepping, a node that runs
them one by one reads its weights 8 times per token, while one pass with 8 rows costs about 1.5-2x one row.
So the node merges what is queued (Orca's iteration-level batching):

- Generation steps of different sessions (different past lengths, rows and new positions) run as ONE
  batch: the linear layers see every row at once, and attention sees each session's own keys and values
  through `MergedCache`, a padded view of the sessions' caches (left padding for shorter pasts, holes for
  fewer new positions, mask 0 on both: exactly how left padding and speculative holes already work).
  Positions and alibi count real tokens only, so every row gets the numbers it gets alone (to float
  rounding of a differently sized matrix product). Where slowllm's kernel multiplies a Bloom decode
  step's attention, the padded view is never filled: its two products read each session's cache where it
  lies (`merged_for_attention`), and each session gets exactly its numbers alone.
- Stateless forwards of the same blocks are left-padded to one length and run as one batch.

A merged pass is bounded by tokens, attention scores and the padded cache view (`plan_steps`; the view only
where it is filled), all from the node's limits and score budget; a step too large to merge (a long
prefill) runs alone, as before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from slowllm.node.kernels._kernels import cpu_supported, kernel_rows

from ._attention_products import MAX_QUERIES, for_attention, merged_for_attention
from ._attention_products import usable as kernel_products
from ._blocks import (SCORE_BYTES, BlockCache, KVLayout, attention_inputs, cache_layout, kv_buffer, kv_bucketed,
                      kv_view_length, run_block)
from ._families import family_of, kv_width

MAX_FORWARD_WASTE = 1.25  # merged forwards: padded tokens at most this many times the real ones
# Forwards merge only while small: a weight read is shared by many tokens already in a big batch (the pass
# is compute-bound), and merging big ones would only add to the pass's working memory.
MERGE_FORWARD_TOKENS = 2048


@dataclass
class StepPart:
    """One session's step inside a merged pass."""

    hidden: torch.Tensor  # [rows, new, H]
    mask: torch.Tensor  # [rows, past + new]
    caches: dict[int, BlockCache]
    session: str = ""

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def new(self) -> int:
        return self.hidden.shape[1]

    @property
    def past(self) -> int:
        return self.mask.shape[1] - self.hidden.shape[1]


def reads_in_place(parts: list[StepPart], products: bool) -> bool:
    """Whether a merged pass's attention reads the parts' caches where they lie (`MergedCache.update`):
    where slowllm's kernel multiplies its products (`products`: a Bloom block's, the kernels built, the
    dtype theirs) and the parts step a few new positions (decode steps, speculative checks: at most
    MAX_QUERIES). Its padded view is then never filled."""
    return products and max(p.new for p in parts) <= MAX_QUERIES


def merged_step_cost(parts: list[StepPart], config, itemsize: int, products: bool = False) -> tuple[int, int, int]:
    """(tokens, attention-score bytes, padded cache-view bytes of one block) of running `parts` as one batch;
    no view bytes where the pass reads the caches in place (`reads_in_place`)."""
    rows = sum(p.rows for p in parts)
    q = max(p.new for p in parts)
    length = kv_bucketed(max(p.past for p in parts) + q)  # (as padded at most)
    scores = rows * config.num_attention_heads * q * length * SCORE_BYTES
    view = 0 if reads_in_place(parts, products) else 2 * rows * length * kv_width(config) * itemsize
    return rows * q, scores, view


def plan_steps(parts: list[StepPart], config, itemsize: int, budget: int, max_tokens: int,
               window: int | None = None, max_rows: int = 1 << 30, products: bool = False) -> list[list[int]]:
    """Group step indices into merged passes within the bounds; similar past lengths together (less padding).
    One session never appears twice in a group (its second step needs the first one's keys). With a
    sliding window (Mistral counts slots), parts with fewer new positions than others would see their past
    one padding slot further away per missing position: beyond the window they merge only with equals.
    `max_rows`: the rows (rows x new positions) up to which the node's linear kernels give each row what
    it gets alone (bf16 and int8 decode kernels); a bigger batch would switch to PyTorch's GEMM, whose
    rounding depends on the batch, and greedy tokens could differ from the request alone. So decode steps
    merge up to that many rows and prefills run alone. `products`: slowllm's kernel multiplies the blocks'
    attention (`products_in_place`): passes that read caches in place need no memory for a padded view."""
    order = sorted(range(len(parts)), key=lambda i: (parts[i].past, parts[i].new))
    groups: list[list[int]] = []
    for i in order:
        for group in groups:
            trial = [parts[j] for j in group] + [parts[i]]
            tokens, scores, view = merged_step_cost(trial, config, itemsize, products)
            longest = max(p.past for p in trial) + max(p.new for p in trial)
            shifted = window is not None and longest > window and len({p.new for p in trial}) > 1
            # (the kernels see rows x new positions as rows: a merged prefill would go to PyTorch's GEMM)
            if (parts[i].session not in {parts[j].session for j in group} and not shifted and tokens <= max_rows
                    and tokens <= max_tokens and scores <= budget and view <= budget):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


class MergedCache:
    """The cache that one merged pass hands to a block's attention: each session's new keys and values go
    into that session's own `BlockCache`; attention gets the padded view of all of them.

    Layout of a row of length L = max past + Q (Q: the most new positions of any part): left padding,
    the session's past, padding for the new positions it lacks, its new positions. The pass's mask has 0
    on every padding slot, so their (zero) keys get no weight.

    Filling that view copies every session's whole cache, every block, every step: 8 sessions of the
    bloom-1b7 shape in bf16, a merged decode step, 58.7 of 201.1 ms at ~300 cached positions, 146.5 of
    325.9 at ~1,000. So where slowllm's kernel multiplies the step's attention (a Bloom block, at most 8
    new positions) the view goes to attention unfilled, and its two products read the parts' caches where
    they lie, at their places in the view (`merged_for_attention`, `attention_bmm_pieces`):
    in alternating turns 0.83x the step's time at ~300 positions, 0.61x at ~1,000 (fp32: 0.79x, 0.54x),
    the same outputs. Anything else that reads the view fills it first.
    """

    def __init__(self, parts: list[StepPart], layer: int, length: int, scratch: "_Scratch", layout: KVLayout):
        self.parts, self.layer, self.scratch = parts, layer, scratch
        self.q = max(p.new for p in parts)
        self.past = length - self.q  # (at least the longest past: more where the view is padded)
        self.layout = layout  # stored as the sessions' `BlockCache`s store them (`cache_layout`)
        self.products = False  # as `BlockCache.products` (`run_block` sets it)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        out_k, out_v = self.scratch.pair((*keys.shape[:-2], self.past + self.q, keys.shape[-1]), keys.dtype,
                                         keys.device, self.layout)
        stored = []  # each part's keys and values as its cache stores them, its real positions only
        start = 0
        for p in self.parts:
            k, v = keys.narrow(0, start, p.rows), values.narrow(0, start, p.rows)
            start += p.rows
            if p.new < self.q:
                k, v = k.narrow(-2, self.q - p.new, p.new), v.narrow(-2, self.q - p.new, p.new)
            cache = p.caches[self.layer]
            cache.lay_out(self.layout)
            k, v = cache.append(k, v)
            stored.append((k.narrow(-2, 0, p.past + p.new), v.narrow(-2, 0, p.past + p.new)))
        self.scratch.turn = turn = object()
        fill = lambda: self._fill(out_k, out_v, stored, turn)  # noqa: E731
        if reads_in_place(self.parts, self.products):
            placement = [(p.new, self.q - p.new) for p in self.parts]  # (`_slots`: new positions last, holes before)
            return merged_for_attention(out_k, out_v, self.q, [k for k, _ in stored], [v for _, v in stored],
                                        placement, fill)
        fill()
        return for_attention(out_k, out_v, self.q) if self.products else (out_k, out_v)

    def _fill(self, out_k: torch.Tensor, out_v: torch.Tensor, stored: list, turn: object) -> None:
        """Copy each part's stored keys and values into the padded views (`_slots`)."""
        if self.scratch.turn is not turn:
            raise RuntimeError("a merged pass's keys and values were read after the next block had reused "
                               "their scratch; read them while their block runs")
        if self.scratch.slots is None:
            self.scratch.slots = self._slots(out_k, out_v)
        for (k, v), segments in zip(stored, self.scratch.slots):
            for offset, n, to_k, to_v in segments:
                to_k.copy_(k.narrow(-2, offset, n))
                to_v.copy_(v.narrow(-2, offset, n))

    def _slots(self, out_k: torch.Tensor, out_v: torch.Tensor) -> list:
        """Where each part's cached positions go in the padded views: [(offset in its cache, positions, keys
        view, values view)] per part, the same in every block of the pass, so worked out (and the padding
        zeroed) at its first fill only. A decode step's past and new positions are side by side: one copy
        each."""
        slots, start, length = [], 0, self.past + self.q
        for p in self.parts:
            lead = self.past - p.past  # left padding
            rows_k, rows_v = out_k.narrow(0, start, p.rows), out_v.narrow(0, start, p.rows)
            for out in (rows_k, rows_v):
                out.narrow(-2, 0, lead).zero_()
                out.narrow(-2, self.past, self.q - p.new).zero_()
            if p.new == self.q:
                places = [(0, p.past + p.new, lead)]
            else:
                places = [(0, p.past, lead), (p.past, p.new, length - p.new)]
            slots.append([(offset, n, rows_k.narrow(-2, at, n), rows_v.narrow(-2, at, n))
                          for offset, n, at in places if n])
            start += p.rows
        return slots


class _Scratch:
    """The padded key and value views of a merged pass, one pair of buffers for all its blocks (attention
    is done with a block's view before the next block asks), and kept for the next pass of the same shape
    while small: fresh buffers every block cost page faults (~0.3 ms per MB here), more than the copies."""

    KEEP_BYTES = 32 << 20  # kept between passes up to this size each (bigger passes allocate per pass)
    _kept = threading.local()

    def __init__(self):
        self._pair = None
        self.slots = None  # `MergedCache._slots` of this pass in the pair
        self.turn = None  # the block whose keys and values the pair holds or may be filled with

    def pair(self, shape: tuple, dtype: torch.dtype, device, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value views of `shape` [..., positions, head_dim], stored as `layout` says."""
        key = (tuple(shape), dtype, str(device), layout)
        if self._pair is None or self._pair[0] != key:
            self.slots = None
            kept = getattr(self._kept, "pair", None)
            if kept is not None and kept[0] == key:
                self._pair = kept
            else:
                self._pair = (key, kv_buffer(shape, dtype, device, layout.keys_transposed),
                              kv_buffer(shape, dtype, device, layout.values_transposed))
                small = self._pair[1].numel() * self._pair[1].element_size() <= self.KEEP_BYTES
                self._kept.pair = self._pair if small else None
        return self._pair[1], self._pair[2]


def merge_rows(blocks) -> int:
    """The most rows (rows x new positions) one merged decode pass over `blocks` (a `ResidentBlocks`) may
    hold: where slowllm's CPU kernels run the linears (bf16, int8), as many as they take (batch invariant:
    every session gets its tokens as alone); otherwise no limit beyond tokens and memory (fp32 through MKL
    differs in the last bits only)."""
    if blocks.device.type != "cpu" or not cpu_supported():
        return 1 << 30
    if blocks.checkpoint.int8:
        kind = "int8" if blocks.dtype == torch.bfloat16 else "int8_fp32"
    elif blocks.dtype == torch.bfloat16:
        kind = "bf16"
    elif blocks.linears == torch.bfloat16:  # fp32 activations on bf16 weights
        kind = "bf16_fp32"
    else:
        return 1 << 30
    return kernel_rows(kind) or 1 << 30


def products_in_place(family, dtype: torch.dtype, device) -> bool:
    """Whether slowllm's kernel multiplies this family's decode-step attention in `dtype` on `device`
    (Bloom's, where the kernels are built): its merged passes can read caches in place (`reads_in_place`)."""
    return family.bmm_attention and kernel_products(dtype, torch.device(device))


def plan_block_steps(blocks, parts: list[StepPart], dtype: torch.dtype, budget: int, max_tokens: int,
                     max_rows: int | None = None) -> list[list[int]]:
    """`plan_steps` for steps through `blocks` (a `ResidentBlocks`) in `dtype`, with what the blocks decide:
    their family's window, whether their attention reads caches in place, and `merge_rows` unless given.
    (A node's passes and a local runner's resident chain plan the same way.)"""
    family = family_of(blocks.config)
    return plan_steps(parts, blocks.config, dtype.itemsize, budget, max_tokens, family.window(blocks.config),
                      merge_rows(blocks) if max_rows is None else max_rows,
                      products_in_place(family, dtype, blocks.device))


def merged_length(parts: list[StepPart], dtype: torch.dtype, device, products: bool = False) -> int:
    """The key length of a merged pass: the longest past plus Q, padded as `kv_view_length` pads; exact
    where slowllm's kernel multiplies attention (`products`: a Bloom block's; it reads what it is shown)."""
    q = max(p.new for p in parts)
    length = max(p.past for p in parts) + q
    if products and q <= MAX_QUERIES and kernel_products(dtype, torch.device(device)):
        return length
    return kv_view_length(length, dtype, torch.device(device))


def merged_layout(parts: list[StepPart], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's hidden states [rows, Q, H] and 0/1 mask [rows, length] (`merged_length`: left padding
    beyond the longest past) in `MergedCache`'s layout."""
    q = max(p.new for p in parts)
    past = length - q
    first = parts[0].hidden
    hidden = first.new_zeros((sum(p.rows for p in parts), q, first.shape[-1]))
    mask = torch.zeros(hidden.shape[0], past + q, dtype=torch.long)
    start = 0
    for p in parts:
        rows = slice(start, start + p.rows)
        start += p.rows
        hidden[rows, q - p.new:] = p.hidden.to(hidden.dtype)
        mask[rows, past - p.past: past] = p.mask[:, : p.past]
        mask[rows, past + q - p.new:] = p.mask[:, p.past:]
    return hidden, mask


@torch.inference_mode()  # sessions' passes (see `BlockCache`)
def run_merged_steps(blocks, parts: list[StepPart], first: int, last: int) -> list[torch.Tensor]:
    """Each part's output [rows, new, H] of blocks first..last (`blocks`: a `ResidentBlocks`), in one pass."""
    if len(parts) == 1:  # alone: exactly today's path
        p = parts[0]
        return [blocks.forward(p.hidden, p.mask, first, last, p.caches)]
    family = blocks.blocks[first].slowllm_family
    length = merged_length(parts, blocks.dtype, blocks.device, family.bmm_attention)
    hidden, mask = merged_layout(parts, length)
    hidden = hidden.to(blocks.device, blocks.dtype)
    q = hidden.shape[1]
    attn = attention_inputs(blocks.config, mask.to(blocks.device), q, blocks.dtype, blocks.device)
    scratch = _Scratch()
    layout = cache_layout(family, blocks.dtype, torch.device(blocks.device))
    for layer in range(first, last + 1):
        hidden = run_block(blocks.blocks[layer], hidden, attn, MergedCache(parts, layer, length, scratch, layout))
    hidden = hidden.cpu()
    outs, start = [], 0
    for p in parts:
        outs.append(hidden[start: start + p.rows, q - p.new:])
        start += p.rows
    return outs


def plan_forwards(shapes: list[tuple[int, int]], max_tokens: int) -> list[list[int]]:
    """Group forwards (rows, length) of the same blocks into merged passes: in arrival order, each group
    within `max_tokens` padded tokens and `MAX_FORWARD_WASTE` padding."""
    groups: list[list[int]] = []
    for i, (rows, length) in enumerate(shapes):
        for group in groups:
            members = [shapes[j] for j in group] + [(rows, length)]
            padded = sum(r for r, _ in members) * max(t for _, t in members)
            real = sum(r * t for r, t in members)
            if padded <= min(max_tokens, MERGE_FORWARD_TOKENS) and padded <= MAX_FORWARD_WASTE * real:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def run_merged_forwards(blocks, inputs: list[tuple[torch.Tensor, torch.Tensor]], first: int,
                        last: int) -> list[torch.Tensor]:
    """Each (hidden [rows, T, H], mask [rows, T])'s output, left-padded to one length and run together."""
    if len(inputs) == 1:
        return [blocks.forward(*inputs[0], first, last)]
    length = max(h.shape[1] for h, _ in inputs)
    hidden = inputs[0][0].new_zeros((sum(h.shape[0] for h, _ in inputs), length, inputs[0][0].shape[-1]))
    mask = torch.zeros(hidden.shape[0], length, dtype=torch.long)
    start = 0
    for h, m in inputs:
        hidden[start: start + h.shape[0], length - h.shape[1]:] = h.to(hidden.dtype)
        mask[start: start + h.shape[0], length - h.shape[1]:] = m
        start += h.shape[0]
    out = blocks.forward(hidden, mask, first, last)
    outs, start = [], 0
    for h, _ in inputs:
        outs.append(out[start: start + h.shape[0], length - h.shape[1]:])
        start += h.shape[0]
    return outs
