"""slowllm.node.kernels: the decode kernels and the linear layers that call them.

`_kernels.cpp` (the entry points; with `_walk.h`: how products walk their weights, `_float_rows.h`: bf16 and
fp32 weights, `_rows_avx2.h`, `_amx.h`, `_int8.h`, `_int16.h`, `_cores.h` and `_attention.h`: a decode step's
attention products) is one source built per instruction set (amx, avx512bf16, avx2vnni, avx2) by
`_build` (a lock that a dead builder cannot leave behind, a key over source, compiler and torch);
`_kernels` picks the build the CPU runs (SLOWLLM_ISA forces one) and says what bf16 costs here; `_linears` swaps a block's `nn.Linear`s for
ones that call the kernels (bf16 and int8 weights) and fall back to PyTorch where it is faster.
May import: torch and the standard library only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._kernels": ["chosen_isa", "cpu_flags", "cpu_supported", "describe", "kernel_rows", "kernels", "native_bf16", "usable"],
    "._build": ["BuildUnavailable", "build_extension"],
    "._linears": ["GemvLinear", "Int8Linear", "quantize_rows", "use_gemv_linears", "use_int8_linears"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._kernels import chosen_isa, cpu_flags, cpu_supported, describe, kernel_rows, kernels, native_bf16, usable  # noqa: F401
    from ._build import BuildUnavailable, build_extension  # noqa: F401
    from ._linears import GemvLinear, Int8Linear, quantize_rows, use_gemv_linears, use_int8_linears  # noqa: F401
