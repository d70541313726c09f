"""A kernel build that cannot hang or lie (node/kernels/_build.py), and how a machine picks and tunes its
build (node/kernels/_kernels.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernelutil import build, needs_toolchain, runnable
from slowllm.node.kernels._build import BuildFailed, BuildUnavailable, build_extension, build_lock
from slowllm.node.kernels._kernels import ISA_FLAGS, runnable_isas
from slowllm.node.kernels._linears import quantize_rows

TINY = """#include <pybind11/pybind11.h>
int answer() { return %d; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""
BUILD = ("import sys; from pathlib import Path; from slowllm.node.kernels._build import build_extension; "
         "m, d = build_extension('tinyext', [Path(sys.argv[1])], ['-O0'], [], Path(sys.argv[2]), timeout=120); "
         "print(m.answer(), d.name)")


@needs_toolchain
def test_a_builder_killed_mid_build_leaves_nothing_that_stops_the_next(tmp_path):
    """torch's builder waits forever on a lock file that a killed build leaves behind (Ctrl-C, docker stop,
    `cluster down` during the first start); ours releases it with the process, builds anew in a fresh
    directory, and rebuilds when the source changes."""
    src, root = tmp_path / "tiny.cpp", tmp_path / "cache"
    src.write_text(TINY % 41)
    first = subprocess.Popen([sys.executable, "-c", BUILD, str(src), str(root)], start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(root.glob("tinyext-*.tmp-*")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the build finished before it could be interrupted"
    os.killpg(first.pid, signal.SIGKILL)  # the builder and its compiler, as a stopped service is
    first.wait()
    assert (root / "tinyext.lock").exists() and list(root.glob("tinyext-*.tmp-*"))  # what it left behind

    again = subprocess.run([sys.executable, "-c", BUILD, str(src), str(root)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    answer, built = again.stdout.split()
    assert answer == "41" and not list(root.glob("tinyext-*.tmp-*"))

    src.write_text(TINY % 42)  # a new source: a new key, the old build removed
    newer = subprocess.run([sys.executable, "-c", BUILD, str(src), str(root)], capture_output=True, text=True,
                           timeout=300)
    answer, rebuilt = newer.stdout.split()
    assert answer == "42" and rebuilt != built and not (root / built).exists()


@needs_toolchain
def test_a_builder_that_holds_the_lock_too_long_is_given_up_on_in_one_sentence(tmp_path):
    src, root = tmp_path / "tiny.cpp", tmp_path / "cache"
    src.write_text(TINY % 1)
    with build_lock(root / "tinyext.lock", timeout=1):  # another builder, alive and slow
        with pytest.raises(BuildUnavailable, match=r"process \d+ has been building tinyext for over 1 s"):
            build_extension("tinyext", [src], [], [], root, timeout=1)  # gives up instead of waiting forever



@needs_toolchain
def test_a_cache_that_cannot_be_written_is_one_sentence_and_pytorchs_kernels_decode(tmp_path, monkeypatch):
    """SLOWLLM_CACHE on a path that is no directory (or read-only, or full): no traceback from the build,
    one sentence naming the cache and the variable, and decoding goes on with PyTorch's kernels."""
    from slowllm.node.kernels import _kernels

    src, not_a_dir = tmp_path / "tiny.cpp", tmp_path / "a-file"
    src.write_text(TINY % 1)
    not_a_dir.write_text("")
    with pytest.raises(BuildUnavailable, match=r"cannot write the kernel cache .*a-file.*: set SLOWLLM_CACHE"):
        build_extension("tinyext", [src], [], [], not_a_dir / "kernels", timeout=5)

    if not _kernels.runnable_isas():
        return  # (a CPU without AVX2: kernels() never builds)
    monkeypatch.setenv("SLOWLLM_CACHE", str(not_a_dir))
    for forced in ("SLOWLLM_ISA", "SLOWLLM_KERNELS"):  # (a suite run with the kernels forced off)
        monkeypatch.delenv(forced, raising=False)
    monkeypatch.setattr(_kernels, "_builds", {})
    monkeypatch.setattr(_kernels, "_tried", False)
    monkeypatch.setattr(_kernels, "_module", None)
    monkeypatch.setattr(_kernels, "_why_not", _kernels._why_not)  # (each restored after the test)
    assert _kernels.kernels() is None  # (logged once; the start-up line says why)
    assert "SLOWLLM_CACHE" in _kernels.describe() and "Traceback" not in _kernels.describe()


@needs_toolchain
def test_a_build_that_no_longer_loads_is_built_again(tmp_path):
    """A library in the cache that does not load (a disk error, a cache copied from another machine) is
    built again, as if it were not there, rather than failing every start."""
    src, root = tmp_path / "tiny.cpp", tmp_path / "cache"
    src.write_text(TINY % 7)
    run = [sys.executable, "-c", BUILD, str(src), str(root)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300)
    answer, built = first.stdout.split()
    (root / built / "tinyext.so").write_bytes(b"\x7fELF not a library")
    again = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["7", built] and "does not load" in again.stderr


@pytest.mark.parametrize("value", ["abc", "-5", "nan"])
def test_a_build_timeout_that_is_no_number_is_one_sentence(tmp_path, monkeypatch, value):
    """SLOWLLM_BUILD_TIMEOUT is read where a build waits: a bad value is one sentence there (and PyTorch's
    kernels decode), not a traceback out of every command that imports the kernels."""
    from slowllm.node.kernels._build import build_timeout

    monkeypatch.setenv("SLOWLLM_BUILD_TIMEOUT", value)
    with pytest.raises(BuildUnavailable, match=f"SLOWLLM_BUILD_TIMEOUT={value} is not a number of seconds"):
        build_extension("tinyext", [tmp_path / "tiny.cpp"], [], [], tmp_path / "cache")
    if value == "abc" and runnable_isas():  # a fresh process with it: imports, says why, decodes with PyTorch's
        env = {k: v for k, v in os.environ.items() if k not in ("SLOWLLM_ISA", "SLOWLLM_KERNELS")}
        run = subprocess.run([sys.executable, "-c", "from slowllm.node.kernels import _kernels as k; "
                              "print(k.kernels() is None, k.describe())"], capture_output=True, text=True,
                             timeout=120, env={**env, "SLOWLLM_BUILD_TIMEOUT": value})
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        assert run.stdout.startswith("True PyTorch's kernels (SLOWLLM_BUILD_TIMEOUT=abc is not a number")
    monkeypatch.setenv("SLOWLLM_BUILD_TIMEOUT", "2.5")
    assert build_timeout() == 2.5

def test_no_compiler_is_one_sentence_saying_what_to_install(tmp_path, monkeypatch):
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY % 1)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(BuildUnavailable, match=r"no C\+\+ compiler \(.*no-such-g\+\+\) was found: install one"):
        build_extension("tinyext", [src], [], [], tmp_path / "cache")
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))  # a compiler path given, ninja missing
    monkeypatch.setenv("CXX", sys.executable)  # runs, prints a version: stands in for the compiler
    with pytest.raises(BuildUnavailable, match=r"ninja was not found: install it \(pip install ninja"):
        build_extension("tinyext", [src], [], [], tmp_path / "cache")


def test_an_isa_this_cpu_cannot_run_or_does_not_know_is_refused(monkeypatch):
    from slowllm.node.kernels._kernels import chosen_isa

    monkeypatch.setenv("SLOWLLM_ISA", "sse9")
    with pytest.raises(ValueError, match="SLOWLLM_ISA=sse9 is not one of amx, avx512bf16, avx2vnni, avx2, none"):
        chosen_isa()
    monkeypatch.setenv("SLOWLLM_ISA", "avx512bf16")
    monkeypatch.setattr("slowllm.node.kernels._kernels.cpu_flags", lambda: {"avx2", "fma", "f16c"})
    with pytest.raises(ValueError, match="needs CPU flags this CPU lacks .*use SLOWLLM_ISA=avx2"):
        chosen_isa()


def test_without_native_bf16_many_rows_widen_the_weight_in_slices(monkeypatch):
    """An AVX2 PC keeps bf16 blocks; PyTorch's bf16 GEMM is slow there, so prompts widen 64 MB slices of
    the weight into fp32 (bf16 and int8 weights): the fp32 numbers up to bf16 rounding of the output."""
    from slowllm.node.kernels import _linears
    from slowllm.node.kernels._linears import GemvLinear, int8_matmul

    monkeypatch.setattr(_linears, "_NATIVE", False)
    monkeypatch.setattr(_linears, "_DEQUANT_BYTES", 64 * 40 * 4)  # several slices and a partial last one
    monkeypatch.setattr(_linears, "_buffers", __import__("threading").local())  # to see which buffer is made
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 100).bfloat16()
    gemv = GemvLinear.wrap(lin)
    x = torch.randn(2, 20, 64, generator=g).bfloat16()
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        got = gemv(x)
        assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
        assert _linears._buffers.by_kind[(torch.float32, "cpu")].numel() == 40 * 64  # fp32 slices ran
        q, scale = quantize_rows(torch.randn(100, 64, generator=g))
        ref = x.float() @ (q.float() * scale.float()[:, None]).T
        got = int8_matmul(x, q, scale)
        assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@runnable("avx512bf16")
def test_the_per_machine_choices_are_measured_once_and_kept(tmp_path, monkeypatch):
    """Measured on the first start (an older file, or one measured on another CPU, counts as none), kept
    beside the build, read back without measuring again; SLOWLLM_PREFETCH forced skips that measurement."""
    from slowllm.node.kernels import _kernels

    k = build("avx512bf16")
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"single_row": [2, 0], "bf16_rows": 8}))  # an older file: no cpu, no int8_rows
    monkeypatch.delenv("SLOWLLM_PREFETCH", raising=False)
    before = k.prefetch()
    tuned = _kernels._calibrate(k, path)
    assert set(tuned) == {"cpu", "int8_rows", "prefetch"} and tuned["int8_rows"] in (8, 16, 32)
    assert tuned["prefetch"] in ("ahead", "own") and tuned["cpu"] == _kernels.cpu_name()
    assert k.prefetch() == before  # (measured, not applied: kernels_for applies it)

    def measured_again(_k):
        raise AssertionError("measured again")
    monkeypatch.setattr(_kernels, "_faster_fetch", measured_again)
    monkeypatch.setattr(_kernels, "_int8_rows", measured_again)
    assert json.loads(path.read_text()) == tuned == _kernels._calibrate(k, path)  # kept, and read back as kept

    path.write_text(json.dumps({**tuned, "cpu": "another CPU", "prefetch": "ahead"}))
    monkeypatch.setattr(_kernels, "_faster_fetch", lambda _k: "own")
    monkeypatch.setattr(_kernels, "_int8_rows", lambda _k: 16)
    assert _kernels._calibrate(k, path) == {**tuned, "int8_rows": 16, "prefetch": "own"}  # measured on this one

    path.unlink()
    monkeypatch.setenv("SLOWLLM_PREFETCH", "ahead")
    monkeypatch.setattr(_kernels, "_faster_fetch", measured_again)
    assert _kernels._calibrate(k, path)["prefetch"] == k.prefetch()  # (what the module read from the variable)
    assert "prefetch" not in json.loads(path.read_text())  # (measured on a start that leaves it open)


def test_a_build_asks_for_weights_as_measured_on_its_machine(tmp_path, monkeypatch):
    """kernels_for applies what tuning.json beside the build says (SLOWLLM_PREFETCH forced beats it: the
    subprocess test below), and the start-up line says it."""
    from slowllm.node.kernels import _kernels

    k = _kernels.kernels()
    if k is None:
        pytest.skip("needs slowllm's kernels (a compiler, SLOWLLM_ISA not none)")
    before = k.prefetch()
    other = "own" if before == "ahead" else "ahead"
    (tmp_path / "tuning.json").write_text(json.dumps({"cpu": _kernels.cpu_name(), "int8_rows": 16, "prefetch": other}))
    monkeypatch.setattr(_kernels, "_builds", {})
    monkeypatch.setattr(_kernels, "build_extension", lambda *args, **kwargs: (k, tmp_path))
    monkeypatch.setitem(_kernels.MAX_ROWS, k.isa, dict(_kernels.MAX_ROWS[k.isa]))
    monkeypatch.delenv("SLOWLLM_PREFETCH", raising=False)
    try:
        assert _kernels.kernels_for(k.isa) is k and k.prefetch() == other
        assert ("2 KB ahead" in _kernels.describe()) == (other == "ahead")
        if k.isa in ("amx", "avx512bf16"):
            assert _kernels.MAX_ROWS[k.isa]["int8"] == _kernels.MAX_ROWS[k.isa]["int8_fp32"] == 16
    finally:
        k.set_prefetch(before)


class Timed:
    """A kernel module whose products take `slow` seconds when its runs ask for weights `slow_way`, else a
    tenth of that: what _faster_fetch must see through."""

    def __init__(self, isa: str, default: str, slow_way: str, slow: float = 0.004):
        self.isa, self.mode, self.slow_way, self.slow, self.calls = isa, default, slow_way, slow, []

    def prefetch(self):
        return self.mode

    def set_prefetch(self, mode):
        self.mode = mode

    def _product(self, x, w, *rest):
        self.calls.append((self.mode, tuple(x.shape), x.dtype, w.dtype))
        time.sleep(self.slow if self.mode == self.slow_way else self.slow / 10)

    bf16_gemv = bf16_fp32_gemv = int8_gemv = _product


def test_the_prefetch_is_measured_both_ways_and_the_faster_kept():
    """Each machine measures both ways the kernels' runs may ask for weights, with the products decoding
    uses (1 and 8 input rows, bf16 weights and int8 ones: bf16 rows, fp32 ones on the AVX2 builds), past
    the cache, and keeps the faster, the vendor's way unless the other is clearly faster; the module is
    left as it was found."""
    from slowllm.node.kernels._kernels import _faster_fetch

    for isa, default, slow_way, want in (("avx512bf16", "ahead", "ahead", "own"), ("avx2", "own", "own", "ahead"),
                                         ("amx", "ahead", "own", "ahead")):
        k = Timed(isa, default, slow_way)
        assert _faster_fetch(k) == want and k.mode == default, (isa, default, slow_way)
        rows = torch.float32 if isa == "avx2" else torch.bfloat16
        assert {(shape[0], dtype, w) for _, shape, dtype, w in k.calls} == \
            {(1, rows, torch.bfloat16), (8, rows, torch.bfloat16), (1, rows, torch.int8), (8, rows, torch.int8)}
        assert {mode for mode, *_ in k.calls} == {"ahead", "own"}


def test_a_build_the_compiler_cannot_make_falls_back_to_the_next_one(monkeypatch):
    """An old g++ without AMX intrinsics must not leave an AMX CPU on PyTorch's kernels: the next build
    this CPU runs is used (unless SLOWLLM_ISA asked for that one build)."""
    from slowllm.node.kernels import _kernels

    monkeypatch.setattr(_kernels, "cpu_flags", lambda: frozenset(ISA_FLAGS["amx"]) | frozenset(ISA_FLAGS["avx2"]))
    tried = []

    def fake_build(isa):
        tried.append(isa)
        if isa == "amx":
            raise BuildFailed("g++ 10 has no -mamx-tile")
        return f"module {isa}"
    monkeypatch.setattr(_kernels, "kernels_for", fake_build)
    monkeypatch.delenv("SLOWLLM_ISA", raising=False)
    assert _kernels._build_or_next("amx") == "module avx512bf16" and tried == ["amx", "avx512bf16"]
    monkeypatch.setenv("SLOWLLM_ISA", "amx")
    with pytest.raises(BuildUnavailable, match="no -mamx-tile"):
        _kernels._build_or_next("amx")

    # what stops every build alike (no compiler, a cache that cannot be written, a held lock) is said once,
    # rather than tried and warned about build after build
    tried.clear()
    monkeypatch.delenv("SLOWLLM_ISA")

    def no_cache(isa):
        tried.append(isa)
        raise BuildUnavailable("cannot write the kernel cache /x (Read-only file system): set SLOWLLM_CACHE ...")
    monkeypatch.setattr(_kernels, "kernels_for", no_cache)
    with pytest.raises(BuildUnavailable, match="Read-only"):
        _kernels._build_or_next("amx")
    assert tried == ["amx"]


def test_a_changed_header_is_a_new_build(tmp_path):
    """The AMX tiles live in `_amx.h`, which `_kernels.cpp` includes: the build's key covers it, so an
    upgrade that changes only the header does not keep running the old build."""
    from slowllm.node.kernels._build import cache_key

    src, header = tmp_path / "k.cpp", tmp_path / "k.h"
    src.write_text('#include "k.h"\n')
    header.write_text("int tiles = 1;\n")
    before = cache_key([src, header], ["-O3"], "g++ 12")
    header.write_text("int tiles = 2;\n")
    assert cache_key([src, header], ["-O3"], "g++ 12") != before
    from slowllm.node.kernels import _kernels

    assert Path(_kernels.__file__).with_name("_amx.h").exists()  # the real header ships beside the source
