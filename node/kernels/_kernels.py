"""slowllm's decode kernels (`_kernels.cpp`), built once per machine and instruction set, or None.

Which build runs is the best the CPU has, unless SLOWLLM_ISA names one:
- `amx`: the `avx512bf16` build whose bf16-input products run on AMX tiles (Intel Sapphire Rapids and
  later): up to 16 input rows cost about what one does, and every row's numbers are the same whatever
  else is in the batch;
- `avx512bf16`: AVX512-BF16 dot products (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and
  later);
- `avx2vnni`: the avx2 build whose int8 products are integer dot products (AVX-VNNI: Intel Alder Lake and
  later, AMD Zen 5), as the two above do with AVX512-VNNI and AMX;
- `avx2`: AVX2 + FMA, bf16 weights widened to fp32 in registers, int8 ones multiplied as int16 integers
  (every x86 PC since 2013-2015); its int8 numbers are the other builds', bit for bit;
- `none`: PyTorch's own kernels (also what Arm CPUs get; SLOWLLM_KERNELS=0 means the same).
A build takes ~30-60 s once, into ~/.cache/slowllm/kernels (SLOWLLM_CACHE moves it), under a lock that
a dead builder cannot leave behind (`_build.py`). Without a compiler the callers use PyTorch's kernels:
slower decoding, the same results up to float rounding, and one sentence saying what to install.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

from ._build import BuildFailed, BuildUnavailable, build_extension, build_lock

log = logging.getLogger("slowllm")
_lock = threading.Lock()
_module = None
_tried = False
_why_not = ""
_builds: dict[str, object] = {}

# The CPU flags each build needs (Linux /proc/cpuinfo names), best first.
# (Every CPU with AVX512-BF16 has AVX512-VNNI, and every one with AMX-BF16 AMX-INT8: the int8 kernels' dot products.)
ISA_FLAGS = {
    "amx": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma", "amx_tile", "amx_bf16",
            "amx_int8"),
    "avx512bf16": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma"),
    "avx2vnni": ("avx2", "fma", "f16c", "avx_vnni"),  # Intel Alder Lake and later, AMD Zen 5: AVX2 + AVX-VNNI
    "avx2": ("avx2", "fma", "f16c"),
}
_AVX512BF16_CFLAGS = ["-DSLOWLLM_AVX512BF16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                      "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"]
ISA_CFLAGS = {
    "amx": ["-DSLOWLLM_AMX", "-mamx-tile", "-mamx-bf16", "-mamx-int8", *_AVX512BF16_CFLAGS],
    "avx512bf16": _AVX512BF16_CFLAGS,
    "avx2vnni": ["-DSLOWLLM_AVX2", "-DSLOWLLM_AVXVNNI", "-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx2": ["-DSLOWLLM_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
# Input rows up to which each kernel beats the alternative, per build. avx512bf16 (measured on bloom-1b7
# shapes, 2 cores, 600M weights, ms): bf16 tiles vs MKL's F.linear 19/35 at 1 row, 20/35 at 4, 29/41 at
# 8, 57/54 at 16; int8 (converting to bf16 then) with bf16 rows vs torch's `_weight_int8pack_mm` 10/19 at
# 1, 23/24 at 4, 26/49 at 8, and vs converting slices for a dense GEMM 47/101 at 16, 81/123 at 32. The bf16 limits are fixed, not measured against
# F.linear: they are also how many sessions' steps a node merges into one pass (each row's numbers only
# stay its own within the kernels), and a merged pass of 8 rows costs far less than 8 passes of one
# whatever F.linear does (a calibration that found F.linear faster at 2 rows, on a noisy moment, left a
# node merging nothing: 8 clients 1.8x one client instead of 3.4x). avx2 (emulated AVX2 PC, ms per 600M weights):
# bf16 kernel vs oneDNN's F.linear 48/63 at 1 row, 92/174 at 4, 144/268 at 8; int8 with bf16 rows vs
# torch's int8 kernel 40/43 at 1, 99/120 at 8. More than 8 rows run through the kernels 8 at a time.
# amx (2-core Sapphire Rapids, 1 thread, 4 blocks of hidden 1024, ms, vs F.linear): 4.95/8.9 at 1 row,
# 7.3/10.0 at 8, 9.6/10.3 at 16, 14.3/11.4 at 32. int8 on amx, avx512bf16 and avx2vnni is integer dot
# products (_int8.h), fp32 rows as well as bf16 ones: bloom-1b7's 24 blocks of linears, bf16 rows, amx 48 /
# 71 / 99 ms at 1 / 8 / 16 rows (converting to bf16 before: 109 / 113 / 116), avx512bf16 58 / 130 (91 /
# 151), avx2vnni 62 / 165 / 301; avx2's int16 multiply-adds 55 / 115 / 223 (its fp32 FMAs before: 80 / ~180
# / ~390), avx2vnni 53 / 133 / 256 the same day, both with the next tile's rows prefetched (avx2vnni's
# several rows since take VNNI's int16 dot products: 8 rows 0.63x the time, 16 rows 0.55x); "int8" is
# calibrated per machine on the avx512 builds, "int8_fp32" follows it. "bf16_fp32" (fp32 rows, bf16
# weights: a float32 block that keeps a bf16 checkpoint's weights) is the fp32 FMA loops on every build.
MAX_ROWS = {
    "amx": {"bf16": 16, "bf16_fp32": 8, "int8": 32, "int8_fp32": 32},
    "avx512bf16": {"bf16": 8, "bf16_fp32": 8, "int8": 32, "int8_fp32": 32},
    "avx2vnni": {"bf16": 8, "bf16_fp32": 8, "int8": 16, "int8_fp32": 16},
    "avx2": {"bf16": 8, "bf16_fp32": 8, "int8": 16, "int8_fp32": 16},
}
INT8_MAX_INPUTS = 65536  # the VNNI builds' int32 sums hold K products of 255 x 128 up to here (176B: 57344; kIntMaxK in _int8.h)


@functools.cache
def _cpuinfo_field(*names: str) -> str:
    """The first /proc/cpuinfo line's value whose key starts with one of `names`; "" elsewhere. Read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[-1].strip() for line in text.splitlines() if line.startswith(names)), "")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty elsewhere. Read once
    (a node asks before every pass)."""
    return frozenset(_cpuinfo_field("flags", "Features").split())


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), "" where there is none: what a calibration was measured on."""
    return _cpuinfo_field("model name")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16), and PyTorch may use
    it (ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 cap it, as bench/decode.py does to stand in
    for an AVX2 PC)."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default") \
            or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("AVX2", "SSE")):
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def runnable_isas(flags: frozenset[str] | None = None) -> list[str]:
    """The builds this CPU runs, best first (tests and bench/decode.py run each)."""
    flags = cpu_flags() if flags is None else flags
    return [isa for isa, need in ISA_FLAGS.items() if all(f in flags for f in need)]


def best_isa(flags: frozenset[str] | None = None) -> str:
    """The best build this CPU runs: "amx", "avx512bf16", "avx2" or "none"."""
    return next(iter(runnable_isas(flags)), "none")


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
                _module = _build_or_next(isa)
        except (BuildUnavailable, ValueError) as e:
            _why_not = str(e)
            log.warning("slowllm: decode kernels unavailable: %s; using PyTorch's (slower decoding)", e)
            _module = None
        _tried = True
        return _module


def _build_or_next(isa: str):
    """The `isa` build; where the compiler cannot make it (a g++ older than 11 has no AMX intrinsics) and
    SLOWLLM_ISA did not ask for it, the next build this CPU runs, with a warning. What stops every build
    alike (no compiler, a cache that cannot be written) is raised at once."""
    runs = runnable_isas()
    candidates = [isa] if os.environ.get("SLOWLLM_ISA") else runs[runs.index(isa):]
    for candidate in candidates:
        try:
            return kernels_for(candidate)
        except BuildFailed as e:
            if candidate == candidates[-1]:
                raise
            log.warning("slowllm: the %s kernels did not build (%s); trying the next build", candidate, e)


def kernels_for(isa: str):
    """The `isa` build, built first if needed (BuildUnavailable if it cannot be): what `kernels()` returns
    for the chosen ISA, and how tests reach every build this CPU runs."""
    if isa not in _builds:
        here = Path(__file__).parent
        module, where = build_extension(f"slowllm_kernels_{isa}", [here / "_kernels.cpp"],
                                        ["-O3", *ISA_CFLAGS[isa], "-fopenmp"], ["-fopenmp"], kernel_root(),  # OpenMP: at::parallel_for
                                        headers=sorted(here.glob("*.h")))  # (every header _kernels.cpp includes)
        tuned = _calibrate(module, where / "tuning.json")
        if isa in ("amx", "avx512bf16"):
            MAX_ROWS[isa]["int8"] = MAX_ROWS[isa]["int8_fp32"] = tuned["int8_rows"]
        if not _prefetch_forced():  # (forced: the module read it)
            module.set_prefetch(tuned["prefetch"])
        _builds[isa] = module
    return _builds[isa]


def kernel_root() -> Path:
    """Where the builds live, each with what its machine measured (tuning.json): SLOWLLM_CACHE/kernels."""
    return Path(os.environ.get("SLOWLLM_CACHE", Path.home() / ".cache" / "slowllm")) / "kernels"


def _prefetch_forced() -> bool:
    """Whether SLOWLLM_PREFETCH names a way (the module then reads it itself, and nothing is measured)."""
    return os.environ.get("SLOWLLM_PREFETCH") in ("ahead", "own")


def _calibrate(k, path: Path) -> dict:
    """What depends on the CPU rather than the build, measured once per machine (~2 s) and kept beside
    the build with the CPU's name (a cache shared by several machines measures again on each):
    - "prefetch" (every build): how the kernels' runs ask for their weights, "ahead" or "own" (_faster_fetch);
    - "int8_rows" (amx, avx512bf16): up to how many input rows (8, 16 or 32) the int8 kernel beats
      converting the weights to bf16 for PyTorch's GEMM (Sapphire Rapids, 600M weights at 32 rows: 298 ms
      vs 144 with AMX). fp32 rows follow it: their alternative, a fp32 GEMM, is slower still.
    Only speed: every choice gives each row the same numbers. SLOWLLM_PREFETCH forced skips measuring it.
    One process measures at a time (several starting at once would slow each other's turns)."""
    tuned = _read_tuning(path)
    if _missing(k, tuned):
        try:
            with build_lock(path.with_suffix(".lock"), 120):
                tuned = _read_tuning(path)  # (measured meanwhile by the process we waited for)
                if _missing(k, tuned):
                    tuned = {**tuned, "cpu": cpu_name()}
                    if "int8_rows" in _missing(k, tuned):
                        tuned["int8_rows"] = _int8_rows(k)
                    if "prefetch" in _missing(k, tuned):
                        tuned["prefetch"] = _faster_fetch(k)
                    tmp = path.with_suffix(f".tmp-{os.getpid()}")
                    tmp.write_text(json.dumps(tuned))
                    tmp.replace(path)  # (a reader never sees half a file)
        except (BuildUnavailable, OSError) as e:  # (nothing measured or kept: the defaults below)
            log.warning("slowllm: the kernels' per-machine choices were not measured (%s); using defaults", e)
    return {"int8_rows": 8, **tuned, "prefetch": tuned.get("prefetch", k.prefetch())}


def _read_tuning(path: Path) -> dict:
    """tuning.json's choices if they were measured on this CPU, else {}."""
    try:
        tuned = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return tuned if isinstance(tuned, dict) and tuned.get("cpu") == cpu_name() else {}


def _missing(k, tuned: dict) -> list[str]:
    """The choices this build needs that `tuned` lacks (the prefetch only where SLOWLLM_PREFETCH leaves it open)."""
    missing = []
    if k.isa in ("amx", "avx512bf16") and tuned.get("int8_rows") not in (8, 16, 32):
        missing.append("int8_rows")
    if tuned.get("prefetch") not in ("ahead", "own") and not _prefetch_forced():
        missing.append("prefetch")
    return missing


def _int8_rows(k) -> int:
    q, scale = torch.ones(65536, 2048, dtype=torch.int8), torch.ones(65536)
    int8_rows = 8
    wide = torch.empty(q.shape, dtype=torch.bfloat16)  # as int8_matmul's dense path: into a reused buffer
    for rows in (16, 32):
        xs = torch.ones(rows, 2048, dtype=torch.bfloat16)
        dense = _best_seconds(lambda: torch.nn.functional.linear(xs, wide.copy_(q)))
        if _best_seconds(lambda: k.int8_bf16_gemv(xs, q, scale)) > dense:
            break
        int8_rows = rows
    return int8_rows


def _faster_fetch(k, turns: int = 3) -> str:
    """How runs should ask for their weights on this machine: "ahead" (2 KB ahead, into L1; tiles of
    several input rows take runs too) or "own" (each line its own, non-temporal; several rows' tiles
    adjacent rows). Intel's L2 streamer stops at every 4 KB page, and there ahead read 1.4-1.6x faster
    with one row and took 0.72-0.87x the time with several; Zen 4 measured its own line faster than the
    prefetchers alone but never measured ahead. So each machine measures: rows of 4 KB (bloom-1b7's bf16
    rows at hidden 2048) past the last-level cache, 256-512 MB, through the products decoding uses (the
    build's bf16 one, fp32 rows on the AVX2 builds; int8 on the same bytes), 1 input row and 8 (one
    prompt; a swarm's merged step), both ways in turns, the best turn each; the vendor's way (ahead on
    Intel, else own) unless the other takes under 0.97x its time. (AMX's tiles walk their own way
    whichever is chosen: on `amx` it reaches int8's one row and fp32 rows.)"""
    default = k.prefetch()
    w = torch.full((min(512 << 20, max(256 << 20, 2 * _last_level_cache_bytes())) // 4096, 2048), 0.5,
                   dtype=torch.bfloat16)
    q, scale = w.view(torch.int8), torch.ones(len(w), dtype=torch.bfloat16)  # (the same bytes, as int8 rows)
    dtype = torch.float32 if k.isa.startswith("avx2") else torch.bfloat16
    bf16 = k.bf16_fp32_gemv if dtype == torch.float32 else k.bf16_gemv
    steps = [lambda x=torch.ones(m, 2048, dtype=dtype): bf16(x, w) for m in (1, 8)]
    steps += [lambda x=torch.ones(m, 4096, dtype=dtype): k.int8_gemv(x, q, scale) for m in (1, 8)]
    best = {"ahead": float("inf"), "own": float("inf")}
    try:
        for turn in range(turns + 1):  # (turn 0 warms up: the outputs' pages, the code)
            for mode in ("ahead", "own") if turn % 2 else ("own", "ahead"):
                k.set_prefetch(mode)
                took = sum(_seconds(step) for step in steps)
                best[mode] = min(best[mode], took) if turn else best[mode]
    finally:
        k.set_prefetch(default)
    other = "own" if default == "ahead" else "ahead"
    choice = other if best[other] < 0.97 * best[default] else default
    log.info("slowllm: the kernels ask for weights %s: %d MB at 1 and 8 rows, bf16 and int8, %.1f ms ahead, "
             "%.1f ms own", choice, w.numel() * 2 >> 20, best["ahead"] * 1e3, best["own"] * 1e3)
    return choice


def _last_level_cache_bytes() -> int:
    """The largest cache the CPU reports (Linux sysfs, e.g. "32768K"), 0 where it reports none."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            pass
    return max(sizes, default=0)


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
    if k is None:
        return f"PyTorch's kernels ({_why_not})"
    # (how runs ask for weights: measured per machine, or SLOWLLM_PREFETCH)
    return f"slowllm's {k.isa} decode kernels" + (", weights asked 2 KB ahead" if k.prefetch() == "ahead" else "")


def kernel_rows(kind: str) -> int | None:
    """Up to how many rows inputs go through kernel `kind` (None: no kernels here). Within it a row's
    result does not depend on the others in the batch (each row sums in the same order alone or batched)."""
    k = kernels()
    return None if k is None else MAX_ROWS[k.isa][kind]


def usable(x: torch.Tensor, kind: str) -> bool:
    """Should this input go through kernel `kind` ("bf16", "bf16_fp32", "int8", "int8_fp32"): CPU, few
    rows, built?"""
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    k = kernels()
    if k is None or (kind.startswith("int8") and x.shape[-1] > INT8_MAX_INPUTS):
        return False
    return x.numel() // x.shape[-1] <= MAX_ROWS[k.isa][kind]
