"""Bloom's attention products in decode steps through slowllm's kernel (`attention_bmm`, _attention.h).

transformers' `BloomAttention` multiplies `alibi.baddbmm(query, keys.transpose(-1, -2))` (the scores) and
`torch.bmm(probs, values)` (the weighted values). In a decode step each head's product is one query (a
few in a speculative check) against every cached position: a stream through the cache, which PyTorch's
library paths (oneDNN for bf16, MKL for fp32) read at a fraction of the memory's speed. Zen 4, 8
sessions of the bloom-1b7 shape (128 heads of 128), caches read from memory as in a step, us per block:

    positions            25      84     300    1,024
    bf16 scores   PyTorch 251    524   2,058   13,237   kernel  51  139  578  1,195
    bf16 values   PyTorch 188    510   1,215   11,624   kernel  59  156  369  1,071
    fp32 scores   PyTorch 176    535   1,446    2,807   kernel 122  281  762  2,494
    fp32 values   PyTorch  70    295   1,434    2,932   kernel  71  225  717  2,269  (values as rows)

At 1,024 positions the kernel reads at the memory's speed (~34 GB/s here); PyTorch's bf16 ops at 2.5.

How the ops get there without replacing anything of transformers': `BlockCache.update` (and a node's
`MergedCache`) hand attention its keys and values as `DecodeKV`, a `torch.Tensor` subclass that differs
only in `__torch_function__`: views of it (the `reshape` and `transpose` attention takes) stay `DecodeKV`,
and `baddbmm`/`bmm` with one among their operands go to the kernel when the call is one it computes (CPU,
bf16 or fp32, at most 8 queries, no autograd, no `out=`); every other op, and any call it does not
compute, is PyTorch's own, on plain tensors. Only Bloom's caches do this (`Family.bmm_attention`: the
rotary families' attention is transformers' sdpa or eager, `_attention.py`), and only where slowllm's kernels
are built (SLOWLLM_ISA=none: PyTorch's ops). The same numbers up to float rounding: fp32 sums, one
rounding to the inputs' dtype, each query's sums in the same order whatever else is in the batch.

A node's merged pass (_merge.py) hands attention its padded scratch the same way, with `MergedKV`: the
two products read each session's cache where it lies (`attention_bmm_pieces`), and the scratch is filled
with copies of them only if anything else reads it. 8 sessions of the bloom-1b7 shape, bf16, a merged
decode step: the copies were 58.7 of 201.1 ms at ~300 positions, 146.5 of 325.9 at ~1,000.
"""

from __future__ import annotations

import torch

from slowllm.node.kernels._kernels import kernels

MAX_QUERIES = 8  # queries per head the kernel takes (attention::kMaxQueries): decode steps, speculative checks
_TYPES = (torch.bfloat16, torch.float32)


class DecodeKV(torch.Tensor):
    """A cache's keys or values as attention sees them in a decode step (the module docstring). A merged
    pass's also carry `_merged` (its `MergedKV`), and so do their views."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # (everything inside as on plain tensors: each attribute read of a DecodeKV, `.dtype` or `.shape`,
        # would otherwise come back through here, ~3 us each; the checks made 1p's products 77 us, not 24)
        with torch._C.DisableTorchFunctionSubclass():
            product = _PRODUCTS.get(func)
            out = product(*args, **kwargs) if product is not None else None
            if out is None:
                if func not in _VIEWS and func not in _METADATA:
                    _fill_merged(args, kwargs)  # (a merged pass's scratch read as a tensor: as copied before)
                out = func(*args, **kwargs)
            if func not in _VIEWS:
                return out
            merged = getattr(args[0], "_merged", None)
            out = out.as_subclass(cls)
            if merged is not None:
                out._merged = merged
            return out


class MergedKV:
    """A merged pass's keys and values of one block (_merge.py's `MergedCache`): each session's as its cache
    stores them (`keys[j]`, `values[j]`: [rows, heads, positions, head_dim]), where they sit in the pass's
    rows (`placement[j]`: (tail, gap): its last `tail` positions end the row, the others end `gap` before
    them; gap 0: all of them end it), and the padded scratch [sessions' rows, heads, length, head_dim]
    attention is handed. Attention's two products, given the scratch viewed exactly as Bloom's attention
    views it, read the sessions' caches instead (`attention_bmm_pieces`); anything else reading the scratch
    has `fill` copy them in first (once). Only the block being run may fill: the next reuses the scratch."""

    def __init__(self, scratch_keys, scratch_values, keys: list, values: list, placement: list, fill):
        self.scratch_keys, self.scratch_values = scratch_keys, scratch_values
        self.keys, self.values, self._fill = keys, values, fill
        self.tails, self.gaps = [t for t, _ in placement], [g for _, g in placement]
        self.filled = False

    def fill(self) -> None:
        if not self.filled:
            self._fill()
            self.filled = True

    def _pieces_read(self, b: torch.Tensor, scratch: torch.Tensor, transposed: bool):
        """The kernels, if `b` is the scratch seen as Bloom's attention multiplies it (heads as batch,
        keys transposed) and nothing has filled it; else None."""
        if self.filled:
            return None
        seen = scratch.reshape(-1, scratch.shape[-2], scratch.shape[-1])
        if transposed:
            seen = seen.transpose(-1, -2)
        if b.data_ptr() != seen.data_ptr() or b.shape != seen.shape or b.stride() != seen.stride():
            return None
        return kernels()

    def scores(self, a, b, c, alpha, beta):
        """`c.baddbmm(a, b)` for b the scratch's keys, transposed (None where it is not)."""
        k = self._pieces_read(b, self.scratch_keys, True) if _kernels_for(a, b, c) is not None else None
        if k is None:
            return None
        pieces = [x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(-1, -2) for x in self.keys]
        return k.attention_bmm_pieces(a, pieces, True, b.shape[-1], c, float(alpha), float(beta), self.tails, self.gaps)

    def weighted(self, a, b):
        """`a.bmm(b)` for b the scratch's values (None where it is not)."""
        k = self._pieces_read(b, self.scratch_values, False) if _kernels_for(a, b) is not None else None
        if k is None:
            return None
        pieces = [x.reshape(-1, x.shape[-2], x.shape[-1]) for x in self.values]
        return k.attention_bmm_pieces(a, pieces, False, b.shape[-2], tails=self.tails, gaps=self.gaps)


def _fill_merged(*nested) -> None:
    """Fill the scratch of every merged pass's keys or values among an op's arguments (`MergedKV.fill`)."""
    for x in nested:
        if isinstance(x, (list, tuple)):
            _fill_merged(*x)
        elif isinstance(x, dict):
            _fill_merged(*x.values())
        elif isinstance(x, DecodeKV) and getattr(x, "_merged", None) is not None:
            x._merged.fill()


def _kernels_for(a, b, c=None):
    """The kernels if they compute this product (the module docstring's conditions), else None."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (c is None or isinstance(c, torch.Tensor))):
        return None
    if a.dim() != 3 or b.dim() != 3 or a.shape[1] > MAX_QUERIES or a.dtype not in _TYPES or b.dtype != a.dtype:
        return None
    if a.device.type != "cpu" or b.device.type != "cpu" or (
            c is not None and (c.dtype != a.dtype or c.device.type != "cpu")):
        return None
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or (c is not None and c.requires_grad)):
        return None
    return kernels()


def _baddbmm(input, batch1=None, batch2=None, *, beta=1, alpha=1, out=None):
    merged = getattr(batch2, "_merged", None)
    if merged is not None and out is None:
        done = merged.scores(batch1, batch2, input, alpha, beta)
        if done is not None:
            return done
    _fill_merged(input, batch1, batch2)
    k = _kernels_for(batch1, batch2, input) if out is None else None
    return None if k is None else k.attention_bmm(batch1, batch2, input, float(alpha), float(beta))


def _bmm(input, mat2=None, *, out=None):
    merged = getattr(mat2, "_merged", None)
    if merged is not None and out is None:
        done = merged.weighted(input, mat2)
        if done is not None:
            return done
    _fill_merged(input, mat2)
    k = _kernels_for(input, mat2) if out is None else None
    return None if k is None else k.attention_bmm(input, mat2)


_PRODUCTS = {torch.Tensor.baddbmm: _baddbmm, torch.baddbmm: _baddbmm, torch.Tensor.bmm: _bmm, torch.bmm: _bmm}
_VIEWS = frozenset({torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.transpose, torch.transpose, torch.reshape})
# (what reads a tensor's description, not its numbers: no need to fill a merged pass's scratch)
_METADATA = frozenset({torch.Tensor.size, torch.Tensor.stride, torch.Tensor.dim, torch.Tensor.data_ptr,
                       torch.Tensor.numel, torch.Tensor.element_size, torch.Tensor.storage_offset,
                       torch.Tensor.is_contiguous, torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__,
                       torch.Tensor.device.__get__, torch.Tensor.ndim.__get__, torch.Tensor.requires_grad.__get__,
                       torch.Tensor.is_cuda.__get__, torch.Tensor.layout.__get__})


def usable(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether caches of this dtype on this device hand attention `DecodeKV` (CPU, bf16 or fp32, kernels built)."""
    return torch.device(device).type == "cpu" and dtype in _TYPES and kernels() is not None


def for_attention(keys: torch.Tensor, values: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values attention multiplies, as `DecodeKV` for a decode-sized step of `new` positions."""
    if new > MAX_QUERIES or not usable(keys.dtype, keys.device):
        return keys, values
    return keys.as_subclass(DecodeKV), values.as_subclass(DecodeKV)


def merged_for_attention(keys: torch.Tensor, values: torch.Tensor, new: int, stored_keys: list, stored_values: list,
                         placement: list, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """A merged pass's padded scratch `keys`, `values` for attention, its products reading each session's
    `stored_keys`/`stored_values` instead, placed as `placement` says (`MergedKV`); `fill` copies them into
    the scratch. Where the kernels do not take the step, the scratch filled, as `for_attention`."""
    if new > MAX_QUERIES or not usable(keys.dtype, keys.device):
        fill()
        return keys, values
    merged = MergedKV(keys, values, stored_keys, stored_values, placement, fill)
    keys, values = keys.as_subclass(DecodeKV), values.as_subclass(DecodeKV)
    keys._merged = values._merged = merged
    return keys, values
