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
"""

from __future__ import annotations

import torch

from slowllm.node.kernels._kernels import kernels

MAX_QUERIES = 8  # queries per head the kernel takes (attention::kMaxQueries): decode steps, speculative checks
_TYPES = (torch.bfloat16, torch.float32)


class DecodeKV(torch.Tensor):
    """A cache's keys or values as attention sees them in a decode step (the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # (everything inside as on plain tensors: each attribute read of a DecodeKV, `.dtype` or `.shape`,
        # would otherwise come back through here, ~3 us each; the checks made 1p's products 77 us, not 24)
        with torch._C.DisableTorchFunctionSubclass():
            product = _PRODUCTS.get(func)
            out = product(*args, **kwargs) if product is not None else None
            if out is None:
                out = func(*args, **kwargs)
        return out.as_subclass(cls) if func in _VIEWS else out


def _kernels_for(a, b, c=None):
    """The kernels if they compute this product (the module docstring's conditions), else None."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (c is None or isinstance(c, torch.Tensor))):
        return None
    if a.dim() != 3 or b.dim() != 3 or a.shape[1] > MAX_QUERIES or a.dtype not in _TYPES or b.dtype != a.dtype:
        return None
    if a.device.type != "cpu" or b.device.type != "cpu" or (c is not None and (c.dtype != a.dtype or c.device.type != "cpu")):
        return None
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or (c is not None and c.requires_grad)):
        return None
    return kernels()


def _baddbmm(input, batch1=None, batch2=None, *, beta=1, alpha=1, out=None):
    k = _kernels_for(batch1, batch2, input) if out is None else None
    return None if k is None else k.attention_bmm(batch1, batch2, input, float(alpha), float(beta))


def _bmm(input, mat2=None, *, out=None):
    k = _kernels_for(input, mat2) if out is None else None
    return None if k is None else k.attention_bmm(input, mat2)


_PRODUCTS = {torch.Tensor.baddbmm: _baddbmm, torch.baddbmm: _baddbmm, torch.Tensor.bmm: _bmm, torch.bmm: _bmm}
_VIEWS = frozenset({torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.transpose, torch.transpose, torch.reshape})


def usable(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether caches of this dtype on this device hand attention `DecodeKV` (CPU, bf16 or fp32, kernels built)."""
    return torch.device(device).type == "cpu" and dtype in _TYPES and kernels() is not None


def for_attention(keys: torch.Tensor, values: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values attention multiplies, as `DecodeKV` for a decode-sized step of `new` positions."""
    if new > MAX_QUERIES or not usable(keys.dtype, keys.device):
        return keys, values
    return keys.as_subclass(DecodeKV), values.as_subclass(DecodeKV)
