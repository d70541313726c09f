"""Linear layers that replace a block's `nn.Linear` modules, as bitsandbytes and torchao do: the block
stays transformers' own layer (`BloomBlock`, `LlamaDecoderLayer`...; attention code untouched), only where
its matmuls read weights from changes.

- `Int8Linear`: weight-only int8 (symmetric, one scale per output row). Decode at batch 1 reads half the
  bytes of bf16: slowllm's GEMV kernel (`_kernels.cpp`) or torch's `aten._weight_int8pack_mm` convert
  int8 to float inside the kernel; prompts convert row slices into a reused buffer. No float copy of a
  whole weight ever exists in memory.
- `GemvLinear`: a bf16 `nn.Linear` whose decode steps (a few rows) run slowllm's kernel; larger inputs and
  backward are `F.linear` itself, except where PyTorch's bf16 GEMM is slow (CPUs without native bf16: an
  AVX2 PC, 256 rows x a 2048x8192 weight: 298 ms in bf16, 66 ms widening 64 MB slices of the weight into
  a reused fp32 buffer, 46 ms for a resident fp32 weight): there prompts widen slices (`bf16_linear`).
Both differentiate w.r.t. their input (soft-prompt tuning runs backward through frozen blocks).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ._kernels import kernels, usable

# `_weight_int8pack_mm` needs the input dimension to be a multiple of 16 (others crash or return garbage
# in torch 2.13; measured). Every real model has it; tiny test models may not.
_KERNEL_K_MULTIPLE = 16
# torch's int8 kernel, measured on a 2048x8192 weight in bf16, costs ~0.33 ms per input row on top of
# reading the weight (1.2 ms at 1 row, 3.1 at 8, 6.0 at 16, 21.6 at 64), while converting the int8 weight
# into a reused bf16 buffer and running a dense GEMM costs 1.4 ms + the GEMM (4.8 ms at 16 rows, 9.5 at
# 64). For fp32 activations it is 10-20x slower than the dense path at every size. slowllm's own kernels
# (`_kernels.py`) come first where they apply.
KERNEL_MAX_ROWS = 8
_DEQUANT_BYTES = 64 << 20  # the reused float buffer one conversion slice takes
_buffers = threading.local()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 [out, in], scale bf16 [out]) with weight ~= q * scale[:, None].

    The scale is rounded UP to a bf16 value before dividing, so the kernel (which takes its scales in the
    activations' dtype) multiplies by exactly the scale the rounding used, and |w| / scale <= 127 holds.
    Deterministic: anyone holding the original reproduces the int8 copy bit for bit."""
    w = weight.float()
    exact = w.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    scale = exact.to(torch.bfloat16)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ (q * scale).T (+ bias), never materialising the whole float weight.

    A few rows (decoding): slowllm's GEMV kernel (the bias added in it, before its one rounding), else
    torch's weight-only int8 kernel; both read the int8 bytes once. Many rows (prompts, scoring), or fp32
    without the kernels: slices of rows converted into a reused float buffer (int8 values are exact in
    bf16) and a dense GEMM, the scale on the output."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x.dtype == torch.bfloat16 and usable(x2, "int8"):
        return kernels().int8_bf16_gemv(x2, q, scale, bias).reshape(*lead, q.shape[0])
    if x.dtype == torch.float32 and usable(x2, "int8_fp32"):  # (16-bit input grid: see int8_gemv)
        return kernels().int8_gemv(x2, q, scale, bias, bits=16).reshape(*lead, q.shape[0])
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and 0 < x2.shape[0] <= KERNEL_MAX_ROWS
            and k % _KERNEL_K_MULTIPLE == 0):
        out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
    else:  # in fp32 where PyTorch's bf16 GEMM is slow (see bf16_linear)
        dtype = torch.float32 if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _native_bf16() else x.dtype
        xc = x2.to(dtype)
        out = torch.empty(x2.shape[0], q.shape[0], dtype=dtype, device=x.device)
        rows = max(1, _DEQUANT_BYTES // (k * xc.element_size()))
        buffer = _buffer(min(rows, q.shape[0]) * k, dtype, x.device)
        for start in range(0, q.shape[0], rows):
            part = q[start:start + rows]
            weight = buffer[: part.numel()].view(part.shape)
            weight.copy_(part)
            out[:, start:start + part.shape[0]] = F.linear(xc, weight)
        out = out.mul_(scale.to(dtype)).to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*lead, q.shape[0])


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a bf16 weight and many rows. Where PyTorch's bf16 GEMM is slow (no native bf16), the
    weight is widened 64 MB at a time into a reused fp32 buffer for fp32 GEMMs: 4.5x faster at 256 rows
    on an AVX2 PC, and no fp32 copy of the whole weight. Not for autograd (the buffer is reused)."""
    if x.device.type != "cpu" or _native_bf16() or (torch.is_grad_enabled() and x.requires_grad):
        return F.linear(x, weight, bias)
    return _widened_linear(x, weight, bias).to(x.dtype)


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x [..., in] @ bf16 weight [out, in].T (+ bias) in fp32, each weight exact in fp32: the numbers
    of a float32 block, reading half its bytes. A few rows (decoding) run the kernel, which widens the
    weights in registers, each row summed in one order whatever the batch; more rows widen slices of the
    weight for fp32 GEMMs (`_widened_linear`). Not for autograd (`GemvLinear` wraps it)."""
    x2 = x.reshape(-1, x.shape[-1])
    if usable(x2, "bf16_fp32") and weight.is_contiguous():
        return kernels().bf16_fp32_gemv(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return _widened_linear(x, weight, bias)


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) in fp32, the weight widened 64 MB of fp32 at a time into a reused buffer."""
    lead, k = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, k).float()
    out = torch.empty(xf.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    rows = max(1, _DEQUANT_BYTES // (k * 4))
    buffer = _buffer(min(rows, weight.shape[0]) * k, torch.float32, x.device)
    for start in range(0, weight.shape[0], rows):
        part = weight[start:start + rows]
        wide = buffer[: part.numel()].view(part.shape)
        wide.copy_(part)
        out[:, start:start + part.shape[0]] = F.linear(xf, wide)
    if bias is not None:
        out += bias.float()
    return out.reshape(*lead, weight.shape[0])


def _native_bf16() -> bool:
    global _NATIVE
    if _NATIVE is None:
        from ._kernels import native_bf16
        _NATIVE = native_bf16()
    return _NATIVE


_NATIVE: bool | None = None


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread float buffer, grown when needed and reused (fresh allocations cost page faults)."""
    key = (dtype, str(device))
    store = getattr(_buffers, "by_kind", None)
    if store is None:
        store = _buffers.by_kind = {}
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, whichever pass (session's or not) made it first
            buf = store[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


class _FrozenWeight(torch.autograd.Function):
    """x @ W.T for a frozen weight stored narrower than x (int8 rows and scales, or bf16 under fp32
    activations); d/dx = grad @ W, the weight widened a slice at a time (never a whole float copy)."""

    @staticmethod
    def forward(ctx, x, weight, scale):
        ctx.save_for_backward(weight, scale)
        return wide_linear(x, weight) if scale is None else int8_matmul(x, weight, scale)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        g = (grad if scale is None else grad * scale.to(grad.dtype)).reshape(-1, weight.shape[0])
        out = torch.zeros(g.shape[0], weight.shape[1], dtype=grad.dtype, device=grad.device)
        rows = max(1, _DEQUANT_BYTES // max(1, weight.shape[1] * grad.element_size()))
        for start in range(0, weight.shape[0], rows):
            out += g[:, start:start + rows] @ weight[start:start + rows].to(grad.dtype)
        return out.reshape(*grad.shape[:-1], weight.shape[1]), None, None


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight [out, in], a per-row scale [out] and a float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out = _FrozenWeight.apply(x, self.weight, self.weight_scale)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        return int8_matmul(x, self.weight, self.weight_scale, self.bias)


class GemvLinear(nn.Linear):
    """`nn.Linear` with a bf16 weight whose few-row products (decoding) run the GEMV kernel; the same
    parameters. Under fp32 activations (a float32 block that keeps a bf16 checkpoint's weights as they
    are) it computes in fp32 from the bf16 weight (`wide_linear`)."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "GemvLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (parameters read once: each `self.weight` is a call into nn.Module.__getattr__, and a decode step
        # makes 96 of these calls; the module call 16.4 -> 13.9 us on Zen 4 in turns, the kernel's own 7.7)
        weight, bias = self.weight, self.bias
        grad = x.requires_grad and torch.is_grad_enabled()
        if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
            if not grad and usable(x, "bf16") and weight.is_contiguous():
                out = kernels().bf16_gemv(x.reshape(-1, x.shape[-1]), weight, bias)
                return out.view(*x.shape[:-1], out.shape[-1])
            return bf16_linear(x, weight, bias)
        if x.dtype == torch.float32 and weight.dtype == torch.bfloat16:
            if grad:
                out = _FrozenWeight.apply(x, weight, None)
                return out if bias is None else out + bias
            return wide_linear(x, weight, bias)
        return F.linear(x, weight, bias)


def _swap(block: nn.Module, make) -> None:
    """Replace every `nn.Linear` of the block (Bloom's four, Llama's seven...) by `make(linear)`."""
    for name, linear in [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]:
        block.set_submodule(name, make(linear))


def use_int8_linears(block: nn.Module) -> None:
    """Replace the block's linears by empty `Int8Linear`s (on the meta device, before `to_empty`)."""
    _swap(block, lambda lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None))


def use_gemv_linears(block: nn.Module) -> None:
    """Let the bf16 block's linears decode with the GEMV kernel (a no-op where it is unavailable)."""
    _swap(block, lambda lin: GemvLinear.wrap(lin) if type(lin) is nn.Linear else lin)
