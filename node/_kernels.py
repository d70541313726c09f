"""slowllm's decode kernels (`_kernels.cpp`), compiled on first use, or None where they cannot be.

They need an x86 CPU with AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and
later) and a C++ compiler (g++, as torch's extension builder uses it). They build once per machine
(~30 s) into ~/.cache/slowllm/kernels; when anything is missing, or SLOWLLM_KERNELS=0, callers use
PyTorch's own kernels: slower decoding, the same results up to float rounding.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("slowllm")
_lock = threading.Lock()
_module = None
_tried = False
# Input rows up to which each kernel beats the alternative (measured on bloom-1b7 shapes, 2 cores, 600M
# weights, ms): bf16 tiles vs MKL's F.linear 19/35 at 1 row, 20/35 at 4, 29/41 at 8, 57/54 at 16; int8
# with bf16 rows vs torch's `_weight_int8pack_mm` 10/19 at 1, 23/24 at 4, 26/49 at 8, and vs converting
# slices for a dense GEMM 47/101 at 16, 81/123 at 32; int8 with fp32 rows only at 1 row (the fp32 FMAs
# make it compute-bound beyond). More than 8 rows run through the kernels 8 at a time.
MAX_ROWS = {"bf16": 8, "int8": 32, "int8_fp32": 1}
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2", "fma")


def cpu_supported() -> bool:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    have = set(flags.split(":", 1)[-1].split())
    return all(f in have for f in REQUIRED_FLAGS)


def kernels():
    """The compiled module (bf16_gemv, int8_bf16_gemv, int8_gemv, bf16_fp32_gemv), or None."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("SLOWLLM_KERNELS", "1") != "0" and cpu_supported():
            try:
                from torch.utils.cpp_extension import load

                build = Path(os.environ.get("SLOWLLM_CACHE", Path.home() / ".cache" / "slowllm")) / "kernels"
                build = build / f"torch-{torch.__version__.split('+')[0]}"
                build.mkdir(parents=True, exist_ok=True)
                _module = load("slowllm_kernels", [str(Path(__file__).with_name("_kernels.cpp"))],
                               extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx2",
                                             "-mfma", "-fopenmp"],  # at::parallel_for is OpenMP in torch's CPU builds
                               extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
            except Exception as e:  # no compiler, no ninja, headers missing: fall back, say so once
                log.warning("slowllm: decode kernels unavailable (%s); using PyTorch's (slower decoding)",
                            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                _module = None
        _tried = True
        return _module


def usable(x: torch.Tensor, kind: str) -> bool:
    """Should this input go through kernel `kind` ("bf16" or "int8"): CPU, few enough rows, compiled?"""
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return rows <= MAX_ROWS[kind] and kernels() is not None
