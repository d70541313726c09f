"""slowllm's decode kernels (`_kernels.cpp`), built once per machine and instruction set, or None.

Which build runs is the best the CPU has, unless SLOWLLM_ISA names one:
- `amx`: the `avx512bf16` build whose bf16-input products run on AMX tiles (Intel Sapphire Rapids and
  later): up to 16 input rows cost about what one does, and every row's numbers are the same whatever
  else is in the batch;
- `avx512bf16`: AVX512-BF16 dot products (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and
  later);
- `avx2`: AVX2 + FMA, weights widened to fp32 in registers (every x86 PC since 2013-2015);
- `none`: PyTorch's own kernels (also what Arm CPUs get; SLOWLLM_KERNELS=0 means the same).
A build takes ~30-60 s once, into ~/.cache/slowllm/kernels (SLOWLLM_CACHE moves it), under a lock that
a dead builder cannot leave behind (`_build.py`). Without a compiler the callers use PyTorch's kernels:
slower decoding, the same results up to float rounding, and one sentence saying what to install.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

from ._build import BuildUnavailable, build_extension

log = logging.getLogger("slowllm")
_lock = threading.Lock()
_module = None
_tried = False
_why_not = ""
_builds: dict[str, object] = {}

# The CPU flags each build needs (Linux /proc/cpuinfo names), best first.
ISA_FLAGS = {
    "amx": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2", "fma", "amx_tile", "amx_bf16"),
    "avx512bf16": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2", "fma"),
    "avx2": ("avx2", "fma", "f16c"),
}
_AVX512BF16_CFLAGS = ["-DSLOWLLM_AVX512BF16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx2",
                      "-mfma", "-mf16c"]
ISA_CFLAGS = {
    "amx": ["-DSLOWLLM_AMX", "-mamx-tile", "-mamx-bf16", *_AVX512BF16_CFLAGS],
    "avx512bf16": _AVX512BF16_CFLAGS,
    "avx2": ["-DSLOWLLM_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
# Input rows up to which each kernel beats the alternative, per build. avx512bf16 (measured on bloom-1b7
# shapes, 2 cores, 600M weights, ms): bf16 tiles vs MKL's F.linear 19/35 at 1 row, 20/35 at 4, 29/41 at
# 8, 57/54 at 16; int8 with bf16 rows vs torch's `_weight_int8pack_mm` 10/19 at 1, 23/24 at 4, 26/49 at
# 8, and vs converting slices for a dense GEMM 47/101 at 16, 81/123 at 32; int8 with fp32 rows only at 1
# row (the fp32 FMAs make it compute-bound beyond). avx512bf16's bf16 limit is measured per machine
# (`_calibrate`: with AMX, F.linear wins from ~8 rows). avx2 (emulated AVX2 PC, ms per 600M weights):
# bf16 kernel vs oneDNN's F.linear 48/63 at 1 row, 92/174 at 4, 144/268 at 8; int8 with bf16 rows vs
# torch's int8 kernel 40/43 at 1, 99/120 at 8. More than 8 rows run through the kernels 8 at a time.
# amx (2-core Sapphire Rapids, 1 thread, 4 blocks of hidden 1024, ms, vs F.linear): 4.95/8.9 at 1 row,
# 7.3/10.0 at 8, 9.6/10.3 at 16, 14.3/11.4 at 32; int8 with bf16 rows, 600M weights: 43 / 45 / 49 ms at 1 /
# 8 / 16 rows (the conversions, as avx512bf16's 44 / 77 / 156).
MAX_ROWS = {
    "amx": {"bf16": 16, "int8": 32, "int8_fp32": 1},
    "avx512bf16": {"bf16": 8, "int8": 32, "int8_fp32": 1},
    "avx2": {"bf16": 8, "int8": 16, "int8_fp32": 1},
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.split(":", 1)[-1].split())


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16), and PyTorch may use
    it (ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 cap it, as bench/decode.py does to stand in
    for an AVX2 PC)."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default") \
            or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("AVX2", "SSE")):
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def fast_bf16() -> str | None:
    """Why bfloat16 computes at memory speed on this CPU (a clause for start-up lines), or None.

    Native bf16 (AVX512-BF16, AMX, Arm BF16), or slowllm's AVX2 kernels, which widen bf16 weights to fp32
    in registers and read them as fast as memory allows; without either, PyTorch's bf16 is slower than
    fp32 and the blocks are widened once at load."""
    if native_bf16():
        return "this CPU computes bfloat16 natively"
    k = kernels()
    return f"slowllm's {k.isa} kernels read bfloat16 at memory speed" if k is not None else None


def best_isa(flags: set[str] | None = None) -> str:
    """The best build this CPU runs: "amx", "avx512bf16", "avx2" or "none"."""
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa, need in ISA_FLAGS.items() if all(f in flags for f in need)), "none")


def chosen_isa() -> str:
    """SLOWLLM_ISA if set (refused in one sentence if this CPU cannot run it), else the best one."""
    if os.environ.get("SLOWLLM_KERNELS", "1") == "0":
        return "none"
    asked = os.environ.get("SLOWLLM_ISA", "").strip().lower()
    if not asked:
        return best_isa()
    if asked != "none" and asked not in ISA_FLAGS:
        raise ValueError(f"SLOWLLM_ISA={asked} is not one of {', '.join(ISA_FLAGS)}, none: pick one of those")
    if asked != "none":
        missing = [f for f in ISA_FLAGS[asked] if f not in cpu_flags()]
        if missing:
            raise ValueError(f"SLOWLLM_ISA={asked} needs CPU flags this CPU lacks ({', '.join(missing)}): "
                             f"use SLOWLLM_ISA={best_isa()}")
    return asked


def cpu_supported() -> bool:
    """Whether this CPU (and SLOWLLM_ISA) allows a kernel build, compiled or not yet."""
    try:
        return chosen_isa() != "none"
    except ValueError:
        return False


def kernels():
    """The compiled module for this CPU (bf16_gemv, int8_bf16_gemv, int8_gemv, bf16_fp32_gemv, isa, calls),
    or None (with the reason logged once and kept for `describe`)."""
    global _module, _tried, _why_not
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            isa = chosen_isa()
            if isa == "none":
                _why_not = "SLOWLLM_ISA=none" if os.environ.get("SLOWLLM_ISA") else "this CPU has no AVX2+FMA"
            else:
                _module = kernels_for(isa)
        except (BuildUnavailable, ValueError) as e:
            _why_not = str(e)
            log.warning("slowllm: decode kernels unavailable: %s; using PyTorch's (slower decoding)", e)
            _module = None
        _tried = True
        return _module


def kernels_for(isa: str):
    """The `isa` build, built first if needed (BuildUnavailable if it cannot be): what `kernels()` returns
    for the chosen ISA, and how tests reach every build this CPU runs."""
    if isa not in _builds:
        root = Path(os.environ.get("SLOWLLM_CACHE", Path.home() / ".cache" / "slowllm")) / "kernels"
        module, where = build_extension(f"slowllm_kernels_{isa}", [Path(__file__).with_name("_kernels.cpp")],
                                        ["-O3", *ISA_CFLAGS[isa], "-fopenmp"], ["-fopenmp"], root)  # OpenMP: at::parallel_for
        if isa in ("amx", "avx512bf16"):
            tuned = _calibrate(module, where / "tuning.json")
            module.set_single_row(*tuned["single_row"])
            MAX_ROWS[isa]["bf16"] = tuned["bf16_rows"]
            MAX_ROWS[isa]["int8"] = tuned["int8_rows"]
        _builds[isa] = module
    return _builds[isa]


def _calibrate(k, path: Path) -> dict:
    """avx512bf16 choices that depend on the CPU, measured once per machine at hidden 2048 on 128 MB
    matrices (~1 s) and kept beside the build:
    - "single_row": for one input row, per weight type (bf16, int8), the faster way (0: one weight row at
      a time, 1: four; both give the same numbers, `_kernels.cpp`);
    - "bf16_rows": up to how many input rows (1, 2, 4, 8 or 16) the bf16 kernel beats PyTorch's F.linear
      (which uses AMX where the CPU has it: there F.linear wins from ~8 rows, on Zen 4 it never does);
    - "int8_rows": up to how many rows (8, 16 or 32) the int8 kernel beats converting the weights to
      bf16 for PyTorch's GEMM (Sapphire Rapids, 600M weights at 32 rows: 298 ms vs 144 with AMX)."""
    try:
        tuned = json.loads(path.read_text())
        if (len(tuned["single_row"]) == 2 and set(tuned["single_row"]) <= {0, 1} and tuned["bf16_rows"] in (1, 2, 4, 8, 16)
                and tuned["int8_rows"] in (8, 16, 32)):
            return tuned
    except (OSError, ValueError, KeyError, TypeError):
        pass
    w = torch.ones(32768, 2048, dtype=torch.bfloat16)
    q, scale = torch.ones(65536, 2048, dtype=torch.int8), torch.ones(65536)
    x = torch.ones(1, 2048, dtype=torch.bfloat16)
    runs = [lambda: k.bf16_gemv(x, w), lambda: k.int8_bf16_gemv(x, q, scale)]
    single = []
    for kind, run in enumerate(runs):
        best = {}
        for way in (0, 1):
            k.set_single_row(*([way, 0] if kind == 0 else [0, way]))
            best[way] = _best_seconds(run)
        single.append(min(best, key=best.get))
    k.set_single_row(*single)
    bf16_rows = 1
    for rows in (2, 4, 8, 16):
        xs = torch.ones(rows, 2048, dtype=torch.bfloat16)
        if _best_seconds(lambda: k.bf16_gemv(xs, w)) > _best_seconds(lambda: torch.nn.functional.linear(xs, w)):
            break
        bf16_rows = rows
    int8_rows = 8
    wide = torch.empty(q.shape, dtype=torch.bfloat16)  # as int8_matmul's dense path: into a reused buffer
    for rows in (16, 32):
        xs = torch.ones(rows, 2048, dtype=torch.bfloat16)
        dense = _best_seconds(lambda: torch.nn.functional.linear(xs, wide.copy_(q)))
        if _best_seconds(lambda: k.int8_bf16_gemv(xs, q, scale)) > dense:
            break
        int8_rows = rows
    tuned = {"single_row": single, "bf16_rows": bf16_rows, "int8_rows": int8_rows}
    try:
        path.write_text(json.dumps(tuned))
    except OSError:
        pass
    return tuned


def _best_seconds(fn, repeat: int = 3) -> float:
    fn()
    return min(_seconds(fn) for _ in range(repeat))


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def describe() -> str:
    """What a start-up line says about the kernels: which build runs, or why none does."""
    k = kernels()
    return f"slowllm's {k.isa} decode kernels" if k is not None else f"PyTorch's kernels ({_why_not})"


def kernel_rows(kind: str) -> int | None:
    """Up to how many rows inputs go through kernel `kind` (None: no kernels here). Within it a row's
    result does not depend on the others in the batch (each row sums in the same order alone or batched)."""
    k = kernels()
    return None if k is None else MAX_ROWS[k.isa][kind]


def usable(x: torch.Tensor, kind: str) -> bool:
    """Should this input go through kernel `kind` ("bf16", "int8", "int8_fp32"): CPU, few rows, built?"""
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    k = kernels()
    return k is not None and x.numel() // x.shape[-1] <= MAX_ROWS[k.isa][kind]
