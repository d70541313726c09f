"""The decode kernels per instruction set: their numbers, their threads, and decoding with them.
(Their build and the per-machine choices: test_kernel_build.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import AVX2_PC
from kernelutil import ISAS, build, runnable
from slowllm.coordinator import make_checkpoint, tiny_config
from slowllm.node.kernels._kernels import native_bf16, runnable_isas
from slowllm.node.kernels._linears import quantize_rows


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_each_build_matches_float_references(isa):
    k = build(isa)
    assert k.isa == isa
    before = k.calls()
    g = torch.Generator().manual_seed(0)
    for rows in (*range(1, 10), 17):  # every tile shape, and more than 8 rows (run 8 at a time)
        # odd widths take the scalar tails; weight rows that are no multiple of a tile the row-by-row rest;
        # 12300 (> 12288) avx512bf16's four-rows-at-once path with 13 = 4 x 3 + 1 rows
        for n, width in ((96, 64), (7, 40), (131, 1000), (13, 12300)):
            x = torch.randn(rows, width, generator=g).bfloat16()
            w = torch.randn(n, width, generator=g).bfloat16()
            ref = x.float() @ w.float().T
            assert (k.bf16_gemv(x, w).float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (rows, n, width)
            q, scale = quantize_rows(torch.randn(n, width, generator=g))
            ref = x.float() @ (q.float() * scale.float()[:, None]).T
            assert (k.int8_bf16_gemv(x, q, scale).float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (rows, n, width)
            assert (k.int8_gemv(x, q, scale).float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (rows, n, width)
            assert (k.int8_gemv(x.float(), q, scale) - ref).abs().max() <= 1e-4 * ref.abs().max()
            xf = torch.randn(rows, width, generator=g)  # fp32 rows, bf16 weights: fp32 throughout (the LM head)
            got, ref = k.bf16_fp32_gemv(xf, w), xf @ w.float().T
            assert got.dtype == torch.float32 and (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (rows, n, width)
            wf = torch.randn(n, width, generator=g)  # fp32 weights (a fp32 checkpoint's head)
            got32 = k.fp32_gemv(xf, wf)
            assert (got32 - xf @ wf.T).abs().max() <= 1e-5 * (xf @ wf.T).abs().max(), (rows, n, width)
            # each row's numbers do not depend on the rows beside it (a node merges sessions' steps, the
            # coordinator their heads: each must get exactly what it gets alone); the fp32 paths every row (on
            # the AVX2 builds rows run in passes of 4, 3 and 2, each row in one of them)
            got16 = k.bf16_gemv(x, w)
            for m in range(rows):
                assert torch.equal(got[m:m + 1], k.bf16_fp32_gemv(xf[m:m + 1], w)), (rows, n, width, m)
                assert torch.equal(got32[m:m + 1], k.fp32_gemv(xf[m:m + 1], wf)), (rows, n, width, m)
                assert torch.equal(got16[m:m + 1], k.bf16_gemv(x[m:m + 1], w)), (rows, n, width, m)
            assert torch.equal(k.int8_gemv(xf, q, scale)[-1:], k.int8_gemv(xf[-1:], q, scale))
            assert torch.equal(k.int8_bf16_gemv(x, q, scale)[-1:], k.int8_bf16_gemv(x[-1:], q, scale))
    after = k.calls()  # the kernels themselves ran, not a fallback
    ran = {name: after[name] - before[name] for name in after}
    assert ran == {"bf16_gemv": 328, "int8_bf16_gemv": 120, "int8_gemv": 160, "bf16_fp32_gemv": 288, "fp32_gemv": 288,
                   "bf16_lookup": 0, "attention_bmm": 0, "attention_bmm_pieces": 0}, ran


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_a_bf16_table_gives_the_ops_numbers_bit_for_bit(isa):
    """`bf16_lookup` (Bloom's GELU in bf16 decoding): a table that PyTorch's own GELU filled over every
    bf16 value (NaN, inf, -0 and subnormals included) answers what that op answers in whole vectors, as a
    decode step's activations are (one or 8 rows of 8,192); any shape, contiguous or not, is looked up
    element by element; a wrong table is refused."""
    import torch.nn.functional as F

    from slowllm.node.engine._blocks import _bf16_gelu_table

    k = build(isa)
    table = _bf16_gelu_table()
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for half in every.split(32768):  # (one call on one thread each: whole vectors, as the table was made)
        torch.testing.assert_close(k.bf16_lookup(half, table), F.gelu(half, approximate="tanh"), rtol=0, atol=0,
                                   equal_nan=True)
    g = torch.Generator().manual_seed(3)
    for rows in (1, 8):
        x = (torch.randn(rows, 1, 8192, generator=g) * 4).bfloat16()
        assert torch.equal(k.bf16_lookup(x, table), F.gelu(x, approximate="tanh")), rows
    for shape in ((3, 40000), (5, 7)):
        x = (torch.randn(shape, generator=g) * 4).bfloat16()
        for view in (x, x.t()):
            looked_up = table[view.contiguous().view(torch.int16).long() & 0xFFFF]
            assert torch.equal(k.bf16_lookup(view, table), looked_up), shape
    with pytest.raises(RuntimeError, match="every bf16 value"):
        k.bf16_lookup(x, table[:100])


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_attention_products_are_pytorchs_up_to_rounding_in_every_layout(isa):
    """`attention_bmm` (a decode step's `baddbmm` and `bmm` in Bloom's attention) against fp64 references:
    bf16 and fp32, 1-8 queries, row ends of every remainder, the cache's matrices as strided views in both
    layouts (n or k contiguous), a broadcast alibi, alpha and beta (beta 0: NaN in c ignored, as PyTorch
    does); each query's numbers the same alone as beside the others; empty and refused shapes."""
    k = build(isa)
    g = torch.Generator().manual_seed(11)
    before = k.calls()["attention_bmm"]
    calls = 0
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 8e-3)):
        for heads, m, kk, n in ((3, 1, 128, 25), (2, 1, 128, 33), (2, 3, 128, 7), (4, 8, 64, 130), (1, 5, 40, 8),
                                (2, 1, 300, 128), (2, 2, 7, 128), (1, 1, 1, 1)):
            a = torch.randn(heads, m, kk, generator=g).to(dtype)
            rows = torch.randn(heads, kk, n + 5, generator=g).to(dtype)[:, :, :n]  # n contiguous (keys stored transposed)
            dots = torch.randn(heads, n + 3, kk, generator=g).to(dtype)[:, :n].transpose(1, 2)  # k contiguous
            c = torch.randn(heads, 1, n, generator=g).to(dtype)
            for b in (rows, dots):
                want = (0.5 * c.double() + 0.125 * (a.double() @ b.double()))
                got = k.attention_bmm(a, b, c, 0.125, 0.5)
                assert got.dtype == dtype and got.shape == (heads, m, n)
                torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
                torch.testing.assert_close(k.attention_bmm(a, b).double(), a.double() @ b.double(), rtol=tol,
                                           atol=tol * (a.double() @ b.double()).abs().max().item())
                for q in range(m):  # batch invariance: a query alone gets its numbers from the batch
                    assert torch.equal(k.attention_bmm(a[:, q:q + 1], b, c, 0.125, 0.5), got[:, q:q + 1])
                calls += 2 + m
    nan = torch.full((2, 1, 9), float("nan"))
    a, b = torch.randn(2, 1, 16, generator=g), torch.randn(2, 16, 9, generator=g)
    assert torch.equal(k.attention_bmm(a, b, nan, 1.0, 0.0), k.attention_bmm(a, b))
    assert k.attention_bmm(torch.ones(0, 1, 4), torch.ones(0, 4, 3)).shape == (0, 1, 3)
    calls += 3
    assert k.calls()["attention_bmm"] == before + calls  # the kernel itself ran, every time
    with pytest.raises(RuntimeError, match="at most 8 queries"):
        k.attention_bmm(torch.ones(1, 9, 4), torch.ones(1, 4, 3))
    with pytest.raises(RuntimeError, match="both bf16 or both fp32"):
        k.attention_bmm(torch.ones(1, 1, 4), torch.ones(1, 4, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_attention_products_in_pieces_are_each_sessions_alone_bit_for_bit(isa):
    """`attention_bmm_pieces` (a node's merged pass: each session's cache where it lies, placed in the
    pass's rows of `length` positions: at their end, or its last `tail` there and the rest `gap` before
    them; zero padding elsewhere) gives each piece's heads exactly what `attention_bmm` gives its
    session's step alone (the padding's score columns beta * c), and to fp64 rounding the products of the
    padded matrix the pieces would be copied into (the padding's probabilities 0): bf16 and fp32, 1-8
    queries, pieces in both layouts side by side, short and long rows, holes; mismatched pieces are refused."""
    k = build(isa)
    g = torch.Generator().manual_seed(12)
    before = k.calls()["attention_bmm_pieces"]
    calls = 0
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 8e-3)):
        # (heads, positions, tail, gap) per piece
        for m, d, sizes, length in ((1, 64, [(2, 5, 1, 0), (1, 40, 1, 0), (3, 33, 1, 0), (2, 1, 1, 0)], 45),
                                    (3, 16, [(1, 7, 3, 0)], 7), (8, 32, [(2, 130, 8, 0), (1, 3, 1, 7)], 140),
                                    (2, 64, [(2, 20, 1, 3), (1, 9, 4, 0), (2, 4, 2, 2), (1, 36, 3, 1)], 40)):
            heads = sum(h for h, *_ in sizes)
            # (each session's keys [h, n, d] as a cache stores them: transposed or as rows, in a larger buffer)
            def stored(h: int, n: int, transposed: bool) -> torch.Tensor:
                if transposed:
                    return torch.randn(h, d, n + 6, generator=g).to(dtype)[..., :n].transpose(1, 2)
                return torch.randn(h, n + 6, d, generator=g).to(dtype)[:, :n]
            layouts = [(j % 2 == 0, j % 2 == 1) for j in range(len(sizes))]  # (keys, values transposed)
            keys = [stored(h, n, t) for (h, n, *_), (t, _) in zip(sizes, layouts)]
            values = [stored(h, n, t) for (h, n, *_), (_, t) in zip(sizes, layouts)]
            tails, gaps = [t for *_, t, _ in sizes], [gap for *_, gap in sizes]
            # where each piece's positions sit in the row: [lead, lead + n - tail) and [length - tail, length)
            places = [list(range(length - n - gap, length - tail - gap)) + list(range(length - tail, length))
                      for _, n, tail, gap in sizes]
            q = torch.randn(heads, m, d, generator=g).to(dtype)
            alibi = torch.randn(heads, 1, length, generator=g).to(dtype)
            probs = torch.softmax(torch.randn(heads, m, length, generator=g), -1)
            start = 0
            for (h, *_), at in zip(sizes, places):  # (the mask's zeros on each session's padding)
                padding = [x for x in range(length) if x not in at]
                probs[start: start + h, :, padding] = 0
                start += h
            probs = probs.to(dtype)
            scores = k.attention_bmm_pieces(q, [x.transpose(1, 2) for x in keys], True, length, alibi, 0.125, 0.5,
                                            tails, gaps)
            weighted = k.attention_bmm_pieces(probs, values, False, length, tails=tails, gaps=gaps)
            assert scores.shape == (heads, m, length) and weighted.shape == (heads, m, d)
            start = 0
            padded_k, padded_v = (torch.zeros(heads, length, d, dtype=dtype) for _ in range(2))
            for x, v, at in zip(keys, values, places):  # each session's heads: its step's products alone, padding aside
                rows = slice(start, start + x.shape[0])
                start += x.shape[0]
                padding = [c for c in range(length) if c not in at]
                alone = k.attention_bmm(q[rows], x.transpose(1, 2), alibi[rows, :, at], 0.125, 0.5)
                assert torch.equal(scores[rows][:, :, at], alone)
                assert torch.equal(scores[rows][:, :, padding],
                                   (0.5 * alibi[rows][:, :, padding].float()).to(dtype).expand(-1, m, -1))
                assert torch.equal(weighted[rows], k.attention_bmm(probs[rows][:, :, at].contiguous(), v))
                padded_k[rows, at], padded_v[rows, at] = x, v
            # and what they stand for: the products of the padded matrix the pieces would be copied into
            want = 0.5 * alibi.double() + 0.125 * (q.double() @ padded_k.double().transpose(1, 2))
            torch.testing.assert_close(scores.double(), want, rtol=tol, atol=tol * want.abs().max().item())
            want = probs.double() @ padded_v.double()
            torch.testing.assert_close(weighted.double(), want, rtol=tol, atol=tol * want.abs().max().item())
            calls += 2
    assert k.calls()["attention_bmm_pieces"] == before + calls
    a, piece = torch.ones(3, 1, 4), torch.ones(2, 4, 5)
    with pytest.raises(RuntimeError, match="the pieces hold a's B heads"):
        k.attention_bmm_pieces(a, [piece], True, 5)
    with pytest.raises(RuntimeError, match="within length"):
        k.attention_bmm_pieces(a[:2], [piece], True, 4)
    with pytest.raises(RuntimeError, match="within length"):
        k.attention_bmm_pieces(a[:2], [piece], True, 6, tails=[1], gaps=[2])
    with pytest.raises(RuntimeError, match="at most 8 queries"):
        k.attention_bmm_pieces(torch.ones(2, 9, 4), [piece], True, 5)


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_each_weight_row_gets_its_own_output_however_the_rows_are_handed_out(isa):
    """The kernels hand weight rows to threads in blocks whose tiles take rows a run apart (`over_tiles`:
    blocks of R x L rows, tile t reads rows t, t + L, ...; then tiles of adjacent rows, then single rows),
    L following the row's bytes, N and the thread count; AMX's tasks of two 16-row tiles alike
    (`amx_tasks`, from 256 rows a thread). Whatever the split, every output is the one its weight row
    gives alone (bit for bit: each row sums in one order), with 1, 2 and 3 threads, row counts that leave
    every kind of remainder, and input rows in one tile or in several passes."""
    k = build(isa)
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        # (8300: one row's input longer than `by_input`'s 16 KB, so tiles of the wider kind, fp32 and planes)
        # (1000 x 96: AMX's tasks in runs, then adjacent ones, a shorter tile; its int8 tiles' K tail)
        for n, width in ((5, 64), (47, 96), (131, 64), (250, 200), (97, 2048), (29, 8300), (1000, 96)):
            w = torch.randn(n, width, generator=g).bfloat16()
            q, scale = quantize_rows(torch.randn(n, width, generator=g))
            for rows in (1, 3, 6):  # (6: passes of input rows, each over tiles of weight rows)
                x = torch.randn(rows, width, generator=g)
                calls = {"bf16_gemv": lambda w_, q_, s_: k.bf16_gemv(x.bfloat16(), w_),
                         "bf16_fp32_gemv": lambda w_, q_, s_: k.bf16_fp32_gemv(x, w_),
                         "int8_gemv": lambda w_, q_, s_: k.int8_gemv(x, q_, s_),
                         "int8_bf16_gemv": lambda w_, q_, s_: k.int8_bf16_gemv(x.bfloat16(), q_, s_)}
                for name, call in calls.items():
                    alone = torch.cat([call(w[i:i + 1], q[i:i + 1], scale[i:i + 1]) for i in range(n)], dim=1)
                    for t in (1, 2, 3):
                        torch.set_num_threads(t)
                        assert torch.equal(call(w, q, scale), alone), (name, n, width, rows, t)
                    torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_a_bias_is_added_in_fp32_before_the_one_rounding(isa):
    """The linears pass their bias to the kernel (a decode step's ~100 products each skip a separate add
    and conversion): the result is the fp32 sum plus the bias rounded once to the input's dtype, bf16, fp32
    or fp16 biases alike, each row still its own whatever is batched beside it."""
    k = build(isa)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 300, generator=g)
    w = torch.randn(70, 300, generator=g)
    q, scale = quantize_rows(w)
    wq = q.float() * scale.float()[:, None]
    for bias in (torch.randn(70, generator=g) * 10, torch.randn(70, generator=g).bfloat16(), torch.randn(70, generator=g).half()):
        for name, args, weight in (("bf16_gemv", (x.bfloat16(), w.bfloat16()), w.bfloat16().float()),
                                   ("int8_bf16_gemv", (x.bfloat16(), q, scale), wq), ("int8_gemv", (x, q, scale), wq)):
            got = getattr(k, name)(*args, bias)
            exact = args[0].float() @ weight.T + bias.float()
            if got.dtype == torch.bfloat16:  # one rounding of the fp32 result (ties and the sum's order aside)
                assert (got.float() - exact).abs().max() <= 2 ** -8 * exact.abs().max(), (name, bias.dtype)
            else:
                assert (got - exact).abs().max() <= 1e-5 * exact.abs().max(), (name, bias.dtype)
            assert torch.equal(got[-1:], getattr(k, name)(args[0][-1:], *args[1:], bias))
        # the one rounding is PyTorch's (to nearest even, NaN kept), vectorized or not (70 = 8 x 8 + 6)
        for dtype in (torch.bfloat16, torch.float16):  # (int8_gemv sums bf16 and fp16 rows as fp32 ones)
            xd = x.to(dtype)
            assert torch.equal(k.int8_gemv(xd, q, scale, bias), k.int8_gemv(xd.float(), q, scale, bias).to(dtype))
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -11, 1 + 3 * 2 ** -11, float("nan"),
                         float("inf"), 3e38, 1e-30, 0.1] * 7)  # a zero row's outputs are its bias, rounded once
    for dtype in (torch.bfloat16, torch.float16):
        got = k.int8_gemv(torch.zeros(1, 300, dtype=dtype), q, scale, ties)
        torch.testing.assert_close(got[0], ties.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_bf16_results_come_as_fp32_and_large_outputs_in_their_own_pages(isa):
    """`fp32_out` (the LM head's bf16 logits, which sampling reads in fp32; bf16 or int8 weights): each
    value is exactly the bf16 output's, widened, ties, NaN and inf included. Outputs of 2 MB or more (the
    head's logits for several rows) come from a separate allocation (`new_output`, 2 MB pages) and hold the
    same numbers."""
    k = build(isa)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 300, generator=g).bfloat16()
    w = torch.randn(70, 300, generator=g).bfloat16()
    q, scale = quantize_rows(w.float())
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), float("nan"), float("inf"), 3e38, 1e-30] * 10)
    for xs, bias in ((x, None), (x, torch.randn(70, generator=g)), (torch.zeros(1, 300).bfloat16(), ties)):
        for entry, weights in ((k.bf16_gemv, (w,)), (k.int8_bf16_gemv, (q, scale))):
            got = entry(xs, *weights, bias, fp32_out=True)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, entry(xs, *weights, bias).float(), rtol=0, atol=0, equal_nan=True)
    # [8, 65600] outputs: 2.1 MB in fp32 (bf16: 1.05 MB, an ordinary allocation), 8 rows of one product
    x8 = torch.randn(8, 64, generator=g)
    wide = torch.randn(65600, 64, generator=g).bfloat16()
    big = k.bf16_fp32_gemv(x8, wide)
    assert big.shape == (8, 65600) and big.is_contiguous()
    assert (big - x8 @ wide.float().T).abs().max() <= 1e-5 * big.abs().max()
    assert torch.equal(k.bf16_gemv(x8.bfloat16(), wide, fp32_out=True), k.bf16_gemv(x8.bfloat16(), wide).float())
    assert torch.equal(big[3:4], k.bf16_fp32_gemv(x8[3:4], wide))
    q, scale = quantize_rows(wide.float())
    wide8 = k.int8_bf16_gemv(x8.bfloat16(), q, scale, fp32_out=True)
    assert torch.equal(wide8, k.int8_bf16_gemv(x8.bfloat16(), q, scale).float())
    assert torch.equal(wide8[3:4], k.int8_bf16_gemv(x8[3:4].bfloat16(), q, scale, fp32_out=True))


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_int8_products_are_exact_integer_sums_on_every_build(isa):
    """int8 weights meet the input rows as exact integer sums (node/kernels/_int8.h: VNNI byte dot products on
    amx, avx512bf16 and avx2vnni, AMX tiles from 2 rows on, int16 multiply-adds on avx2 and, from 2 rows
    on, VNNI's int16 dot products on avx512bf16 and avx2vnni, 24-bit rows split into int16 and byte dot
    products there), each row put on a power-of-two grid: 24 bits
    below its largest element for fp32 rows, 16 for bf16. Rows already on the grid come out as the float64
    sum rounded once or twice, at any width (the widest rows' int32 sums would overflow were they not moved
    into int64 in time); any row is off by at most half a grid step per element; a row with an inf or NaN
    gives NaN and leaves the rows beside it alone; and every row's numbers are the same whatever is batched
    beside it (up to 40 rows: several AMX column groups, every tile shape, the tails)."""
    k = build(isa)
    g = torch.Generator().manual_seed(7)
    for rows, n, width in ((1, 48, 4096), (5, 33, 200), (8, 64, 1000), (40, 17, 130), (3, 7, 40)):
        x = torch.randn(rows, width, generator=g)
        x[:, 0] *= 4096  # an outlier: most of each row lies far below its largest element
        q, scale = quantize_rows(torch.randn(n, width, generator=g))
        w = q.double() * scale.double()[:, None]
        for bits, entry, inputs in ((24, k.int8_gemv, x), (16, k.int8_bf16_gemv, x.bfloat16())):
            step = torch.exp2(inputs.float().abs().amax(1, keepdim=True).log2().floor() - (bits - 2)).double()
            on_grid = (inputs.double() / step).round() * step  # exactly representable: the sums are exact
            got, ref = entry(on_grid.to(inputs.dtype), q, scale), on_grid @ w.T
            rounding = 2 ** -23 if bits == 24 else 2 ** -8  # the output's: fp32 (twice), or bf16
            assert ((got.double() - ref).abs() <= rounding * ref.abs() + 1e-30).all(), (isa, bits, rows, n, width)
            got, ref = entry(inputs, q, scale), inputs.double() @ w.T
            grid_error = step / 2 @ w.abs().sum(1, keepdim=True).T  # half a step per element at most
            assert ((got.double() - ref).abs() <= grid_error + rounding * ref.abs()).all(), (isa, bits, rows, n, width)
            for m in (0, rows - 1):
                assert torch.equal(got[m:m + 1], entry(inputs[m:m + 1], q, scale))
        if rows > 1:  # a poisoned row
            bad = x.clone()
            bad[0, 1] = float("inf")
            out = k.int8_gemv(bad, q, scale)
            assert out[0].isnan().all() and torch.equal(out[1:], k.int8_gemv(x, q, scale)[1:])
    # the largest sums: every product near 127 x 2^15 over 65,536 inputs (2^38: far beyond an int32)
    q = torch.full((3, 65536), 127, dtype=torch.int8)
    q[1] = -128
    for entry, x in ((k.int8_gemv, torch.full((2, 65536), 1.99)), (k.int8_bf16_gemv, torch.full((2, 65536), 1.99).bfloat16())):
        got, ref = entry(x, q, torch.ones(3)), x.double() @ q.double().T
        assert ((got.double() - ref).abs() <= 2 ** -8 * ref.abs()).all(), (isa, x.dtype, got, ref)
    with pytest.raises(RuntimeError, match="at most 65536 inputs per row"):
        k.int8_gemv(torch.ones(1, 65537), torch.ones(2, 65537, dtype=torch.int8), torch.ones(2))


def test_every_build_gives_the_same_int8_numbers():
    """The builds differ in how they sum (VNNI byte dot products, AMX tiles, int16 multiply-adds), not in
    what: exact integers on the same grid, so an int8 product is bit for bit the same on every x86 build,
    bf16 and fp32 rows alike (a PC without AVX-VNNI gives a swarm the numbers of one with it)."""
    builds = [build(isa) for isa in runnable_isas()]
    g = torch.Generator().manual_seed(3)
    for rows, n, width in ((1, 70, 2048), (8, 33, 1000), (17, 9, 130)):
        x = torch.randn(rows, width, generator=g) * torch.exp(2 * torch.randn(rows, width, generator=g))
        q, scale = quantize_rows(torch.randn(n, width, generator=g))
        for name, inputs in (("int8_gemv", x), ("int8_bf16_gemv", x.bfloat16())):
            first = getattr(builds[0], name)(inputs, q, scale)
            for k in builds[1:]:
                assert torch.equal(getattr(k, name)(inputs, q, scale), first), (k.isa, builds[0].isa, name, rows)


DECODE = textwrap.dedent("""
    import json, sys
    from slowllm.coordinator import LocalRunner, Sampling
    from slowllm.node.kernels._kernels import kernels
    runner = LocalRunner(sys.argv[1], keep_in_ram=True, progress=False)  # no dtype asked: the default
    out = runner.generate(["The quick brown fox", "Once"], Sampling(max_new_tokens=8))
    out += runner.generate(["Once"], Sampling(max_new_tokens=8))  # one row: the kernels' case on every CPU
    k = kernels()
    print(json.dumps({"dtype": str(runner.chain.dtype), "isa": k.isa if k else None,
                      "calls": k.calls() if k else {}, "tokens": [r["token_ids"] for r in out]}))
""")


@pytest.mark.parametrize("isa", [pytest.param(isa, marks=runnable(isa)) for isa in ISAS])
def test_the_kernels_let_other_python_threads_run_meanwhile(isa):
    """Every entry point of every build releases Python's lock while it computes (as PyTorch's ops do): a
    node's event loop and a coordinator's other waves go on meanwhile. The main thread counts while a
    product runs in another thread; had the product held the lock, the count would stay where it was."""
    import threading

    k = build(isa)
    w = torch.randn(8192, 2048)
    q, scale = quantize_rows(w)
    x = torch.randn(4, 2048)
    calls = {"fp32_gemv": (x, w), "bf16_fp32_gemv": (x, w.bfloat16()), "bf16_gemv": (x.bfloat16(), w.bfloat16()),
             "int8_gemv": (x, q, scale), "int8_bf16_gemv": (x.bfloat16(), q, scale)}
    for name, args in calls.items():
        started, done = threading.Event(), threading.Event()

        def run():
            started.set()
            for _ in range(40):  # ~0.1-1 s of products: long beside the main thread's loop below
                getattr(k, name)(*args)
            done.set()

        worker = threading.Thread(target=run)
        worker.start()
        started.wait()
        count = 0
        while not done.is_set():
            count += 1
        worker.join()
        assert count > 10_000, (name, count)


def test_the_kernels_leave_the_cores_other_programs_keep_busy():
    """A volunteer's PC is never idle. A parallel region waits for every thread of its team, and a thread
    whose core another program holds waits for a time slice first, so with one core busy 2 threads decoded
    at a third of 1 thread's speed. The kernels use as many threads as cores stay free (at least one;
    _cores.h); SLOWLLM_FREE_CORES=0 keeps all of PyTorch's. A CPU-bound process holds one core here."""
    from slowllm.node.kernels._kernels import kernels

    if kernels() is None or len(os.sched_getaffinity(0)) < 2 or not Path("/proc/stat").exists():
        pytest.skip("needs slowllm's kernels (a compiler, SLOWLLM_ISA not none), 2 or more cores and "
                    "Linux's /proc/stat")
    if torch.get_num_threads() < 2:  # (the child processes inherit this environment)
        pytest.skip("PyTorch runs one thread here (OMP_NUM_THREADS=1): there is no thread to leave out")
    script = textwrap.dedent("""
        import time, torch
        from slowllm.node.kernels._kernels import kernels
        k, x, w = kernels(), torch.randn(1, 2048).bfloat16(), torch.randn(4096, 2048).bfloat16()
        end = time.monotonic() + 1.5  # (the kernels read the cores' use every 0.5 s)
        while time.monotonic() < end:
            k.bf16_gemv(x, w)
        print(torch.get_num_threads(), k.kernel_threads())
    """)
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = {}
        for follow in ("1", "0"):
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "SLOWLLM_FREE_CORES": follow}, check=True).stdout
            seen[follow] = tuple(int(v) for v in out.split()[-2:])
    finally:
        neighbour.kill()
        neighbour.wait()
    (threads, following), (threads_off, all_of_them) = seen["1"], seen["0"]
    assert 1 <= following < threads, seen  # (on a quiet machine exactly threads - 1)
    assert all_of_them == threads_off, seen


PREFETCH = textwrap.dedent("""
    import torch
    from slowllm.node.kernels._kernels import kernels
    k, g = kernels(), torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 2048, generator=g), torch.randn(4096, 2048, generator=g).bfloat16()
    q, s = torch.randint(-127, 128, (4096, 2048), generator=g, dtype=torch.int8), torch.rand(4096, generator=g)
    out = torch.cat([k.bf16_fp32_gemv(x, w), k.int8_gemv(x, q, s.bfloat16()), k.bf16_gemv(x.bfloat16(), w).float()], 1)
    rows = torch.randn(8, 2048, generator=g)  # (several rows: tiles in runs, or of adjacent rows, and the rest)
    products = (lambda r: k.bf16_fp32_gemv(r, w), lambda r: k.bf16_gemv(r.bfloat16(), w).float(),
                lambda r: k.int8_gemv(r, q, s.bfloat16()))
    many = [torch.cat([f(rows[:n]) for f in products], 1) for n in (8, 3)]  # (3: int8 tiles of several weight rows)
    alone = all(torch.equal(each[m:m + 1], torch.cat([f(rows[m:m + 1]) for f in products], 1))
                for each in many for m in range(len(each)))
    print(k.prefetch(), k.read_bytes(torch.tensor([1, 2, 4, 8], dtype=torch.uint8), True), out.view(torch.int32).sum().item(),
          torch.cat(many).view(torch.int32).sum().item(), alone)
""")


def tuned(isa: str) -> dict:
    """What this machine measured for build `isa` (its tuning.json in the kernel cache)."""
    from slowllm.node.kernels._kernels import kernel_root

    (path,) = kernel_root().glob(f"slowllm_kernels_{isa}-*/tuning.json")
    return json.loads(path.read_text())


def test_how_runs_ask_for_weights_changes_no_number():
    """One input row's tiles read weight rows in runs, and ask for each line ahead (Intel: its streamer stops
    at every 4 KB page) or for their own line, non-temporal (elsewhere, as measured on Zen 4); tiles of
    several rows take runs too where lines are asked ahead, else adjacent rows. SLOWLLM_PREFETCH
    forces either, beating what this machine measured (else chosen, tuning.json), and a value it does not
    know says so and takes what was measured. A prefetch is only a hint:
    both give the same numbers bit for bit, and several rows each what it gets alone."""
    from slowllm.node.kernels._kernels import kernels

    if kernels() is None:
        pytest.skip("needs slowllm's kernels (a compiler, SLOWLLM_ISA not none)")
    isas = [None] + [isa for isa in ("avx512bf16", "avx2") if isa in runnable_isas()]  # (AMX: tiles of its own)
    for isa in isas:
        if isa:
            build(isa)  # (built here once, not in each subprocess)
        seen = {}
        for mode in ("ahead", "own", "sideways") if isa is None else ("ahead", "own"):
            env = {**os.environ, "SLOWLLM_PREFETCH": mode, **({"SLOWLLM_ISA": isa} if isa else {})}
            out = subprocess.run([sys.executable, "-c", PREFETCH], capture_output=True, text=True, timeout=120,
                                 env=env, check=True)
            seen[mode] = out.stdout.split()
            if mode == "sideways":
                assert "SLOWLLM_PREFETCH=sideways is neither ahead nor own" in out.stderr
        assert seen["ahead"][0] == "ahead" and seen["own"][0] == "own"
        if isa is None:
            assert seen["sideways"][0] == tuned(kernels().isa)["prefetch"]  # (as with no setting: measured)
        assert seen["ahead"][1] == seen["own"][1] == "15"  # (read_bytes: the OR of every byte)
        assert len({s[2] for s in seen.values()}) == 1 and len({s[3] for s in seen.values()}) == 1, (isa, seen)
        assert all(s[4] == "True" for s in seen.values()), (isa, seen)


def test_decoding_runs_the_chosen_build_and_each_gives_the_same_tokens(models_dir):
    """A bf16 checkpoint decodes in its default dtype (bf16 where the CPU computes it natively) through the
    build SLOWLLM_ISA names (the counters prove it ran), and every build, and PyTorch's kernels, give the
    same greedy tokens. On an AVX2 PC (no native bf16; here: PyTorch capped at AVX2) the default is fp32
    activations on the bf16 weights, decoded by the avx2 build's fp32-rows path."""
    model = models_dir / "kernels-bf16"
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(std=0.25), seed=0, dtype=torch.bfloat16)
    isas = runnable_isas()
    for isa in isas:
        build(isa)  # built here once, not in each subprocess at the same time
    isas.append("none")
    procs = {isa: subprocess.Popen([sys.executable, "-c", DECODE, str(model)], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "SLOWLLM_ISA": isa}) for isa in isas}
    avx2_pc = subprocess.Popen([sys.executable, "-c", DECODE, str(model)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "SLOWLLM_ISA": "avx2", **AVX2_PC})
    runs = {isa: json.loads(p.communicate(timeout=600)[0].splitlines()[-1]) for isa, p in procs.items()}
    pc = json.loads(avx2_pc.communicate(timeout=600)[0].splitlines()[-1])
    assert pc["dtype"] == "torch.float32" and pc["isa"] == "avx2" and pc["calls"]["bf16_fp32_gemv"] > 0, pc
    assert pc["calls"]["bf16_gemv"] == 0, pc
    for isa, run in runs.items():
        # bf16 where this CPU computes it natively; else fp32 activations (on the bf16 weights with a build)
        assert run["dtype"] == ("torch.bfloat16" if native_bf16() else "torch.float32")
        if isa != "none":
            assert run["isa"] == isa and run["calls"]["bf16_gemv" if native_bf16() else "bf16_fp32_gemv"] > 0, (isa, run)
        assert run["tokens"] == runs[isas[0]]["tokens"], isa


@pytest.mark.parametrize("stored", ["bf16", "int8"])
def test_a_resident_head_decodes_in_one_product_with_the_chunks_numbers(models_dir, stored):
    """Decoding in bf16 with the head in RAM (bf16, or int8 rows and scales): one kernel call for the whole
    head, logits equal (torch.equal) to the head's chunks (bf16: read from disk; int8: the resident rows a
    chunk at a time, as before), row by row or several rows at once."""
    from slowllm.coordinator.jobs._ends import ModelEnds
    from slowllm.node import Checkpoint
    from slowllm.node.engine._quantize import quantize_checkpoint
    from slowllm.node.kernels._kernels import kernels

    k = kernels()
    if k is None:
        pytest.skip("no slowllm decode kernels on this machine (no AVX2+FMA, no compiler, or SLOWLLM_ISA=none): "
                    "the head is PyTorch's product, which this one-kernel-call path does not take")
    model = models_dir / "kernels-bf16"
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(std=0.25), seed=0, dtype=torch.bfloat16)
    if stored == "int8":
        if not (models_dir / "kernels-int8" / "config.json").exists():
            quantize_checkpoint(model, models_dir / "kernels-int8")
        model = models_dir / "kernels-int8"
    entry = "bf16_gemv" if stored == "bf16" else "int8_bf16_gemv"
    # (chunks of 4 KB: a resident head, too, was computed chunk by chunk)
    resident = ModelEnds(Checkpoint(model), dtype=torch.bfloat16, head_chunk_bytes=4096)
    chunked = ModelEnds(Checkpoint(model), dtype=torch.bfloat16, resident_embedding=False, head_chunk_bytes=4096)
    assert chunked.head_chunk_rows < chunked.vocab_size
    hidden = torch.randn(3, resident.hidden_size, generator=torch.Generator().manual_seed(0))
    before = k.calls()[entry]
    whole = resident.logits(hidden)
    assert k.calls()[entry] == before + 1 and whole.dtype == torch.float32
    if stored == "bf16":
        assert torch.equal(whole, chunked.logits(hidden))
    else:  # (from disk, int8 chunks are converted to bf16 weights: rounded, other numbers)
        x, chunks = hidden.bfloat16(), list(resident._stored_chunks())
        assert len(chunks) > 1
        assert torch.equal(whole, torch.cat([k.int8_bf16_gemv(x, q, scale).float() for _, q, scale in chunks], 1))
    assert torch.equal(whole[1:2], resident.logits(hidden[1:2]))
