"""Many requests at once: merged passes at a node, pipelined micro-batches, fair sharing (issue 23).

A merged pass must give every request what it gets alone: the tests compare with each request run by
itself (fp32, to 1e-5) and with transformers where it matters, on Bloom (alibi) and Llama (rotary, GQA).
"""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import AVX2_PC
from slowllm.coordinator import Sampling, make_checkpoint, tiny_config
from slowllm.node import Checkpoint
from slowllm.node.engine._blocks import BlockCache
from slowllm.node.engine._merge import StepPart, plan_forwards, plan_steps, run_merged_forwards, run_merged_steps
from slowllm.node.engine._resident import ResidentBlocks


@pytest.fixture(scope="module", params=["bloom", "llama", "bloom-bf16"])
def blocks(request, models_dir):
    """fp32 blocks; "bloom-bf16": a bf16 checkpoint in fp32, its linears kept in bf16 (an AVX2 PC's node)."""
    family = request.param.removesuffix("-bf16")
    extra = {"num_key_value_heads": 2} if family == "llama" else {}
    stored = torch.bfloat16 if request.param.endswith("-bf16") else torch.float32
    path = make_checkpoint(models_dir / f"merge-{request.param}",
                           tiny_config(n_layer=3, hidden=64, n_head=4, family=family, **extra), seed=5, dtype=stored)
    blocks = ResidentBlocks(Checkpoint(path), 0, 2, torch.float32)
    from slowllm.node.kernels._kernels import kernels
    assert blocks.linears == (stored if kernels() is not None else torch.float32)
    return blocks


# fp32 through matrix products of another size: rounding differs in the last bits. Hidden states here
# reach ~65 after two blocks; MKL's fp32 GEMM capped at AVX2 on an Intel CPU (the AVX2 PC's emulation)
# gave a merged llama pass 1.2e-4 from its sessions alone, ~2e-6 of the largest: 3e-4 is ~5e-6 of it. A
# merging bug (a wrong mask, position or row) moves states by O(1). A log-probability through the head
# moves by less than 1e-5, as the network tests check.
CLOSE = dict(atol=3e-4, rtol=1e-5)


def _session(blocks, rows: int, past: int, holes: bool, gen: torch.Generator):
    """A session with `past` positions already cached (left padding, and a hole when asked)."""
    caches = {layer: BlockCache() for layer in range(3)}
    mask = torch.ones(rows, past, dtype=torch.long)
    mask[0, : past // 3] = 0  # the first row is left-padded
    if holes and past > 4:
        mask[-1, past - 2] = 0  # a rejected draft left a hole
    hidden = torch.randn(rows, past, 64, generator=gen)
    blocks.forward(hidden, mask, 0, 2, caches)
    return caches, mask


def _clone(caches):
    return {k: BlockCache(c.keys.clone(), c.values.clone()) for k, c in caches.items()}


def test_merged_steps_equal_each_session_alone(blocks):
    gen = torch.Generator().manual_seed(0)
    # (rows, past, new): decode steps of different lengths, a speculative step of 3, a fresh prefill
    shapes = [(1, 9, 1), (2, 5, 1), (1, 17, 3), (3, 0, 6), (1, 12, 1)]
    parts, alone = [], []
    for i, (rows, past, new) in enumerate(shapes):
        caches, mask = _session(blocks, rows, past, holes=i == 2, gen=gen) if past else ({l: BlockCache() for l in range(3)},
                                                                                       torch.ones(rows, 0, dtype=torch.long))
        hidden = torch.randn(rows, new, 64, generator=gen)
        full = torch.cat([mask, torch.ones(rows, new, dtype=torch.long)], 1)
        twin = _clone(caches) if past else {l: BlockCache() for l in range(3)}
        alone.append((blocks.forward(hidden, full, 0, 2, twin), twin))
        parts.append(StepPart(hidden, full, caches, f"s{i}"))
    outs = run_merged_steps(blocks, parts, 0, 2)
    for (want, twin), got, part in zip(alone, outs, parts):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **CLOSE)
        for layer in range(3):  # each session's cache holds what it holds after stepping alone
            torch.testing.assert_close(part.caches[layer].keys, twin[layer].keys, **CLOSE)
            assert part.caches[layer].length == twin[layer].length
    # and the next (single-position) step of every session, merged again, still agrees
    nexts = [torch.randn(p.rows, 1, 64, generator=gen) for p in parts]
    parts2 = [StepPart(h, torch.cat([p.mask, torch.ones(p.rows, 1, dtype=torch.long)], 1), p.caches, p.session)
              for h, p in zip(nexts, parts)]
    want2 = [blocks.forward(h, p2.mask, 0, 2, twin) for h, p2, (_, twin) in zip(nexts, parts2, alone)]
    for got, want in zip(run_merged_steps(blocks, parts2, 0, 2), want2):
        torch.testing.assert_close(got, want, **CLOSE)


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_padded_key_views_give_no_weight_to_their_padding(models_dir, family, monkeypatch):
    """In bf16 on CPU, attention sees a cache's keys through views padded within the buffers' spare room
    (decode steps: the whole buffer; longer steps: to KV_BUCKET positions), so oneDNN meets each shape
    again and multiplies tensors that fill their buffers. The padding, zeros or a rolled-back draft's keys, gets no weight: a prompt and
    decode steps through the caches, alone and merged, are as close to the fp32 truth as with unpadded
    views (their rounding may differ: sdpa sums a padded row in another order). Where slowllm's kernel
    multiplies Bloom's decode steps it is shown exact views (it reads what it is shown), as close."""
    from slowllm.node.engine import _blocks, _merge

    if not _blocks.pads_views(torch.bfloat16, torch.device("cpu")):  # (an AVX2 PC, or PyTorch capped at AVX2)
        pytest.skip("attention sees padded views only where oneDNN multiplies bf16")
    extra = {"num_key_value_heads": 2} if family == "llama" else {}
    path = make_checkpoint(models_dir / f"pad-{family}", tiny_config(n_layer=3, hidden=64, n_head=4, family=family,
                                                                     **extra), seed=6)
    blocks = ResidentBlocks(Checkpoint(path), 0, 2, torch.bfloat16)
    gen = torch.Generator().manual_seed(6)
    hidden = (3 * torch.randn(2, 9, 64, generator=gen)).bfloat16()
    draft = (30 * torch.randn(2, 1, 64, generator=gen)).bfloat16()
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    truth = ResidentBlocks(Checkpoint(path), 0, 2, torch.float32).forward(hidden.float(), mask, 0, 2)

    def error(bucket: int, merged: bool) -> torch.Tensor:
        monkeypatch.setattr(_blocks, "KV_BUCKET", bucket)
        caches = [{layer: BlockCache() for layer in range(3)} for _ in range(2)]
        outs = [[blocks.forward(hidden[r:r + 1, :5], mask[r:r + 1, :5], 0, 2, caches[r])] for r in range(2)]
        for r in range(2):  # a rejected draft: its keys stay in the buffers past the filled part
            blocks.forward(draft[r:r + 1], mask[r:r + 1, :6], 0, 2, caches[r])
            for cache in caches[r].values():
                cache.truncate(5)
        for t in range(5, 9):
            parts = [StepPart(hidden[r:r + 1, t:t + 1], mask[r:r + 1, :t + 1], caches[r], f"s{r}") for r in range(2)]
            steps = run_merged_steps(blocks, parts, 0, 2) if merged else [
                blocks.forward(p.hidden, p.mask, 0, 2, p.caches) for p in parts]
            for r in range(2):
                outs[r].append(steps[r])
        return (torch.cat([torch.cat(o, dim=1) for o in outs]).float() - truth).abs()

    seen: set = set()  # the key lengths attention saw through the sessions' caches
    append = BlockCache.append

    def spy(self, *args, **kwargs):
        keys, values = append(self, *args, **kwargs)
        seen.add(keys.shape[-2])
        return keys, values
    monkeypatch.setattr(BlockCache, "append", spy)
    products = _blocks.kernel_products  # (PyTorch's ops multiply here: slowllm's kernel reads exact views, below)
    for module in (_blocks, _merge):
        monkeypatch.setattr(module, "kernel_products", lambda dtype, device: False)
    bucket = _blocks.KV_BUCKET
    with monkeypatch.context() as unpadded:
        unpadded.setattr(_blocks, "pads_views", lambda dtype, device: False)
        exact = error(1, merged=False)
    assert seen == {5, 6, 7, 8, 9} and exact.max() < 0.03 * truth.abs().max()  # (bf16 against fp32)
    for merged in (False, True):
        seen.clear()
        padded = error(bucket, merged)
        # the prompt pass's buffers are exact (seen unpadded); decode steps see the whole grown buffer
        assert seen == {5, 5 + BlockCache.GROW_MIN}
        assert padded.max() <= 1.25 * exact.max() and padded.mean() <= 1.1 * exact.mean(), (merged, padded, exact)
    if family == "bloom" and products(torch.bfloat16, torch.device("cpu")):
        for module in (_blocks, _merge):  # Bloom's decode steps in slowllm's kernel: exact views
            monkeypatch.setattr(module, "kernel_products", products)
        for merged in (False, True):
            seen.clear()
            got = error(bucket, merged)
            assert merged or seen == {5, 6, 7, 8, 9}
            assert got.max() <= 1.25 * exact.max() and got.mean() <= 1.1 * exact.mean(), (merged, got, exact)


def test_caches_store_keys_and_values_as_their_attention_reads_them(blocks):
    """Bloom multiplies queries by the keys' transpose (`baddbmm`) and the weights by the values (`bmm`):
    in fp32 its caches store keys [head_dim, positions] and values as rows where slowllm's kernel
    multiplies decode steps' attention, both [head_dim, positions] where MKL does (`cache_layout`; bf16's
    layouts are tested below); the rotary families' as sdpa reads them. The views attention gets, a spill
    to disk and back, and merged passes see the same positions either way (the tests above compare the
    numbers)."""
    from slowllm.node.engine._attention_products import usable
    from slowllm.node.engine._blocks import KVLayout

    gen = torch.Generator().manual_seed(3)
    caches, mask = _session(blocks, 2, 7, holes=False, gen=gen)
    bloom = blocks.config.model_type == "bloom"
    for cache in caches.values():
        values_transposed = bloom and not usable(torch.float32, "cpu")
        assert cache.layout == KVLayout(keys_transposed=bloom, values_transposed=values_transposed)
        stored = cache.state()
        for name, transposed in (("keys", bloom), ("values", values_transposed)):  # positions last where transposed
            assert stored[name].shape[-1 if transposed else -2] == cache.capacity
        assert cache.keys.shape[-2:] == (7, cache.values.shape[-1])
        back = BlockCache.from_state(cache.state())
        assert back.layout == cache.layout and torch.equal(back.keys, cache.keys)
        assert torch.equal(back.values, cache.values)
    other, other_mask = _session(blocks, 1, 3, holes=False, gen=gen)
    one = torch.ones(2, 1, dtype=torch.long)
    step = StepPart(torch.randn(2, 1, 64, generator=gen), torch.cat([mask, one], 1), caches, "s")
    beside = StepPart(torch.randn(1, 1, 64, generator=gen), torch.cat([other_mask, one[:1]], 1), other, "t")
    twin = _clone(caches)
    merged = run_merged_steps(blocks, [step, beside], 0, 2)[0]
    torch.testing.assert_close(merged, blocks.forward(step.hidden, step.mask, 0, 2, twin), **CLOSE)
    assert all(c.length == 8 for c in caches.values())


def test_bloom_decode_steps_multiply_attention_in_slowllms_kernel(blocks, monkeypatch):
    """A Bloom block's decode steps hand attention `DecodeKV`, so its `baddbmm` and `bmm` run slowllm's
    kernel, two calls per block: alone (a speculative check of 3) `attention_bmm`; merged (a plain step
    beside a check of 2), the sessions' caches read where they lie (`attention_bmm_pieces`), nothing
    copied into the pass's scratch. None for
    the rotary families (their attention is transformers' sdpa or eager). The outputs are PyTorch's ops'
    up to fp32 rounding (the same steps with the hand-off switched off: the scratch filled, PyTorch's
    products), and a prompt pass (more than 8 queries) stays PyTorch's."""
    from slowllm.node.engine import _blocks, _merge
    from slowllm.node.kernels import kernels

    k = kernels()
    if k is None:
        pytest.skip("no kernels built here (SLOWLLM_ISA=none or no compiler)")
    bloom = blocks.config.model_type == "bloom"
    gen = torch.Generator().manual_seed(9)
    caches, mask = _session(blocks, 2, 11, holes=False, gen=gen)  # (a prompt pass of 11: no kernel products)
    other, other_mask = _session(blocks, 1, 6, holes=False, gen=gen)
    twins = (_clone(caches), _clone(other))
    fills = []
    fill = _merge.MergedCache._fill
    monkeypatch.setattr(_merge.MergedCache, "_fill", lambda self, *args: fills.append(1) or fill(self, *args))
    three, step, beside = (torch.randn(rows, new, 64, generator=gen) for rows, new in ((2, 3), (2, 1), (1, 2)))
    outs = []
    for on, (c, o) in ((True, (caches, other)), (False, twins)):
        with monkeypatch.context() as off:
            if not on:
                off.setattr(_blocks, "for_attention", lambda keys, values, new: (keys, values))
                off.setattr(_merge, "for_attention", lambda keys, values, new: (keys, values))
                off.setattr(_merge, "merged_for_attention", lambda keys, values, *rest: (rest[-1](), (keys, values))[1])
            before = k.calls()
            alone = blocks.forward(three, torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1), 0, 2, c)
            ran_alone = k.calls()["attention_bmm"] - before["attention_bmm"]
            one = torch.ones(2, 1, dtype=torch.long)
            parts = [StepPart(step, torch.cat([mask, one, one, one, one], 1), c, "s"),
                     StepPart(beside, torch.cat([other_mask, one[:1], one[:1]], 1), o, "t")]  # (a check of 2)
            fills.clear()
            merged = run_merged_steps(blocks, parts, 0, 2)
            after = k.calls()
        ran_merged = (after["attention_bmm_pieces"] - before["attention_bmm_pieces"],
                      after["attention_bmm"] - before["attention_bmm"] - ran_alone)
        outs.append((alone, *merged))
        kernel = on and bloom
        assert ran_alone == (3 * 2 if kernel else 0), ran_alone  # 3 blocks x 2 products
        assert ran_merged == ((3 * 2, 0) if kernel else (0, 0)), ran_merged
        assert len(fills) == (0 if kernel else 3)  # (merged: the scratch filled only where PyTorch multiplies)
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **CLOSE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merged_pass_copies_its_caches_only_for_what_is_not_its_two_products(dtype):
    """A merged pass hands attention its padded scratch, unfilled: Bloom's two products read each
    session's cache where it lies, at its place in the rows (left padding, and a hole where a session steps
    fewer new positions than a speculative check beside it). Any other read of it (another op, another
    view) first gets the copies the scratch stands for; reading a block's keys after the next block has
    reused the scratch is refused in one sentence, not silently wrong."""
    from slowllm.node.engine._attention_products import DecodeKV, usable
    from slowllm.node.engine._blocks import KVLayout
    from slowllm.node.engine._merge import MergedCache, _Scratch

    if not usable(dtype, "cpu"):
        pytest.skip("no kernels built here (SLOWLLM_ISA=none or no compiler)")
    gen = torch.Generator().manual_seed(4)
    heads, d = 3, 8
    parts = []
    for rows, past, new in ((2, 5, 1), (1, 9, 2)):  # (the second: a speculative check of 2)
        caches = {}
        for layer in range(2):
            cache = BlockCache()
            cache.lay_out(KVLayout(keys_transposed=True))
            cache.append(*(torch.randn(rows, heads, past, d, generator=gen).to(dtype) for _ in range(2)))
            caches[layer] = cache
        parts.append(StepPart(torch.zeros(rows, new, 4), torch.ones(rows, past + new, dtype=torch.long), caches))
    scratch, length = _Scratch(), 11
    new = [torch.randn(3, heads, 2, d, generator=gen).to(dtype) for _ in range(2)]

    def update(layer: int):
        merged = MergedCache(parts, layer, length, scratch, KVLayout(keys_transposed=True))
        merged.products = True
        return merged.update(*new, layer)

    def padded(layer: int, which: str) -> torch.Tensor:
        """the first session: 4 slots of padding, its 5 past positions, a hole, its new one"""
        out = torch.zeros(3, heads, length, d, dtype=dtype)
        mine = getattr(parts[0].caches[layer], which)
        out[:2, :, 4:9], out[:2, :, 10:] = mine[:, :, :5], mine[:, :, 5:]
        out[2:, :, :] = getattr(parts[1].caches[layer], which)
        return out
    keys, values = update(0)
    assert isinstance(keys, DecodeKV) and keys._merged is not None
    q = torch.randn(9, 2, d, generator=gen).to(dtype)
    probs = torch.softmax(torch.randn(9, 2, length, generator=gen), -1)
    probs[:6, :, :4] = probs[:6, :, 9] = 0  # (the first session's padding and hole, as its mask gives)
    probs = probs.to(dtype)
    alibi = torch.randn(9, 1, length, generator=gen).to(dtype)
    scores = alibi.baddbmm(q, keys.reshape(9, -1, d).transpose(-1, -2), alpha=0.5)  # (read in place: nothing copied)
    weighted = torch.bmm(probs, values.reshape(9, -1, d))
    assert not keys._merged.filled
    want_k, want_v = padded(0, "keys"), padded(0, "values")
    torch.testing.assert_close(scores.float(), alibi.float() + 0.5 * (q.float() @ want_k.reshape(9, -1, d).float()
                                                                      .transpose(-1, -2)), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weighted.float(), probs.float() @ want_v.reshape(9, -1, d).float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(keys.clone(), want_k) and torch.equal(values[:, :, 4:] + 0, want_v[:, :, 4:])  # (filled)
    assert keys._merged.filled
    # (from the copies now: the same products up to fp32 rounding)
    torch.testing.assert_close(alibi.baddbmm(q, keys.reshape(9, -1, d).transpose(-1, -2), alpha=0.5), scores)
    keys, values = update(1)
    stale = keys
    update(1)  # (the next block)
    with pytest.raises(RuntimeError, match="read them while their block runs"):
        stale.sum()


def test_merged_forwards_equal_each_alone(blocks):
    gen = torch.Generator().manual_seed(1)
    inputs = []
    for rows, length in [(2, 7), (1, 5), (3, 7)]:
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, :2] = 0
        inputs.append((torch.randn(rows, length, 64, generator=gen), mask))
    for got, (h, m) in zip(run_merged_forwards(blocks, inputs, 0, 2), inputs):
        torch.testing.assert_close(got, blocks.forward(h, m, 0, 2), **CLOSE)


def test_merge_plans_stay_within_their_bounds():
    config = tiny_config(n_layer=2, hidden=64, n_head=4)
    def part(session, rows, past, new):
        return StepPart(torch.zeros(rows, new, 64), torch.ones(rows, past + new), {}, session)
    parts = [part("a", 1, 10, 1), part("b", 1, 500, 1), part("a", 1, 11, 1), part("c", 4, 12, 1)]
    groups = plan_steps(parts, config, 4, budget=1 << 30, max_tokens=1 << 16)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert not any({0, 2} <= set(g) for g in groups)  # one session's two steps never share a pass
    tight = plan_steps(parts, config, 4, budget=2000, max_tokens=1 << 16)
    assert all(len(g) == 1 for g in tight)  # too big to merge: each alone
    # sliding window: beyond it, parts with different numbers of new positions do not merge
    windowed = plan_steps([part("a", 1, 50, 1), part("b", 1, 50, 3)], config, 4, 1 << 30, 1 << 16, window=32)
    assert len(windowed) == 2
    # a pass whose attention reads the caches in place (slowllm's kernel: `products`, at most 8 new
    # positions) needs no padded view: only its scores bound it
    steps = [part("a", 1, 500, 1), part("b", 1, 490, 1)]
    assert len(plan_steps(steps, config, 4, budget=300_000, max_tokens=1 << 16)) == 2  # (the view: 524 KB)
    assert plan_steps(steps, config, 4, budget=300_000, max_tokens=1 << 16, products=True) == [[1, 0]]
    uneven = [part("a", 1, 500, 1), part("b", 1, 490, 3)]  # (a speculative check beside a plain step: in place too)
    assert len(plan_steps(uneven, config, 4, budget=300_000, max_tokens=1 << 16)) == 2
    assert len(plan_steps(uneven, config, 4, budget=300_000, max_tokens=1 << 16, products=True)) == 1
    prefill = [part("a", 1, 500, 1), part("b", 1, 0, 12)]  # (more than 8 new positions: PyTorch's products)
    assert len(plan_steps(prefill, config, 4, budget=300_000, max_tokens=1 << 16, products=True)) == 2
    assert plan_forwards([(1, 100), (1, 100), (1, 10), (30, 100)], max_tokens=1 << 16) == [[0, 1], [2], [3]]


# ---- through real processes -----------------------------------------------------------------------
PROMPTS = ["The first", "Another prompt that is longer than the first", "3 4 5", "a b c d e f g"]


def _together(calls):
    """Run every call in its own thread at once; their results in order (the first error is raised)."""
    out, errors = [None] * len(calls), []
    barrier = threading.Barrier(len(calls))

    def run(i, call):
        try:
            barrier.wait()
            out[i] = call()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_heads_of_a_pass_are_one_call_and_each_equals_its_own(models_dir, dtype, monkeypatch):
    """The coordinator computes the LM heads of every step in a pass together (`with_heads`): one read of
    the head for many generations, and every step's logits exactly (torch.equal) what it gets alone; a
    step with more positions than the kernels keep batch invariant, and a failed step, go as alone."""
    from slowllm.coordinator.jobs._ends import ModelEnds
    from slowllm.coordinator.chains._chain import Head, with_heads
    from slowllm.node.kernels._kernels import kernels

    if kernels() is None:
        pytest.skip("no decode kernels here: the head is PyTorch's GEMM, and each step gets its own call")
    path = models_dir / f"heads-{str(dtype)[6:]}"
    if not (path / "config.json").exists():
        make_checkpoint(path, tiny_config(std=0.25), seed=3, dtype=dtype)
    ends = ModelEnds(Checkpoint(path))
    most = ends.invariant_rows
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 5, 64, generator=gen),  # a prompt step: each row's last position
            torch.randn(3, 2, 64, generator=gen),  # a decode step with a drafted position: all six
            RuntimeError("this step failed"),
            torch.randn(most + 1, 1, 64, generator=gen),  # too many positions to share: alone
            torch.randn(1, 1, 64, generator=gen)]
    heads = [Head(ends, last=True), Head(ends), Head(ends), Head(ends), None]
    calls = []
    real = ends.logits
    monkeypatch.setattr(ends, "logits", lambda hidden: calls.append(hidden.shape[0]) or real(hidden))
    got = with_heads(outs, heads)
    assert sorted(calls) == [2 + 6, most + 1]  # the two small steps in one call, the big one alone
    assert got[2] is outs[2] and got[4] == (outs[4], None)
    for i in (0, 1, 3):
        out, logits = got[i]
        assert out is outs[i]
        assert torch.equal(logits, real(ends.final_norm(heads[i].rows(outs[i]))))


def test_concurrent_clients_share_passes_and_get_what_they_get_alone(tiny_model, secret):
    """Greedy and seeded-sampling clients at once through 2 nodes (one dies mid merged pass, its sessions
    fail over); a big scoring job beside a prompt; every answer equal to the job alone."""
    from netutil import Cluster

    greedy = Sampling(max_new_tokens=10)
    seeded = Sampling(max_new_tokens=10, temperature=0.9, seed=7)
    lines = [{"context": f"{i} " + PROMPTS[i % 4], "continuation": " and then"} for i in range(48)]
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret) as c:
        alone = [c.client().generate([p], greedy)[0]["token_ids"] for p in PROMPTS]
        alone_seeded = c.client().generate([PROMPTS[1]], seeded)[0]["token_ids"]
        scores_alone = [c.client().score([line])[0]["logprob"] for line in lines[:6]]
        # a second 3-5 node that dies during the run: sessions on it fail over (replayed) with equal output
        c.start_node("3-5", name="doomed", extra=["--inject-fault", "exit:12"])
        c.wait_covered(3)
        calls = [lambda p=p: c.client().generate([p], greedy)[0]["token_ids"] for p in PROMPTS]
        calls.append(lambda: c.client().generate([PROMPTS[1]], seeded)[0]["token_ids"])
        got = _together(calls)
        assert got[:4] == alone
        assert got[4] == alone_seeded
        assert c.nodes["doomed"].wait(60) == 137  # it did die with sessions on it
        nodes = c.client().status()["nodes"]
        assert max(n["steps_per_message"] for n in nodes) > 1  # the steps of different clients went together

        # fairness: a prompt sent while a big scoring job runs is answered before the job ends
        finished = []
        big = lines * 4

        def score():
            res = c.client().score(big)
            finished.append("score")
            return res

        def prompt():
            res = c.client().generate([PROMPTS[0]], Sampling(max_new_tokens=3))
            finished.append("prompt")
            return res
        scores, _ = _together([score, prompt])
        assert finished == ["prompt", "score"]
        # the pipelined micro-batches give the scores each line gets alone
        for want, res in zip(scores_alone, scores):
            assert abs(res["logprob"] - want) < 1e-4


def test_a_wave_with_checked_hops_and_a_liar_gives_each_client_its_answer(tiny_model, secret):
    """Concurrent clients' steps hop together as one wave (one Steps message per node and hop, from one
    thread): under --verify 0.5 some hops are re-run on another node and judged, a liar (fast, covering
    every block) is banned at its first hop and the sessions it held fail over; each client still gets
    exactly what it gets alone."""
    from adversaries import LyingNode
    from netutil import Cluster

    greedy = Sampling(max_new_tokens=8)
    with Cluster(tiny_model, ["0-2", "3-5", "0-5"], secret_file=secret, coordinator_args=["--verify", "0.5"]) as c:
        alone = [c.client().generate([p], greedy)[0]["token_ids"] for p in PROMPTS]
        liar = LyingNode(c.url, open(secret, "rb").read().strip(), tiny_model, 0, 5, "nudge", speed=1e12).start()
        got = _together([lambda p=p: c.client().generate([p], greedy)[0]["token_ids"] for p in PROMPTS])
        assert got == alone
        status = c.client().status()
        assert liar.answered >= 1 and liar.done.wait(10)
        assert next(n for n in status["nodes"] if n["name"] == liar.name)["banned"]
        assert status["verified_hops"] > 0 and max(n["steps_per_message"] for n in status["nodes"]) > 1


def test_a_steps_message_answers_each_step_and_a_bad_one_alone(tiny_model):
    """The node's side of a merged pass, in process: a Steps message whose middle step is malformed gets an
    error for that step only; the others equal the same steps sent alone."""
    from slowllm.node.server._passes import _Queue
    from slowllm.node.server._server import NodeServer
    from slowllm.protocol import Channel, Error, Result, Results, Step, Steps, decode_tensor, encode_tensor, pack, unpack

    node = NodeServer(first=0, last=5, coordinator="ws://127.0.0.1:9", model=str(tiny_model), dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)

    def step(i, session, width=64, new=3):
        return Step(id=i, session=session, first=0, last=5, hidden=encode_tensor(torch.randn(1, new, width, generator=gen)),
                    mask=encode_tensor(torch.ones(1, new, dtype=torch.uint8)), max_length=32)

    def run(frames):
        queue = _Queue(Channel())
        return [outcome for _, outcome in node.pool.submit(node._pass, queue, [(f, None) for f in frames]).result()]

    items = [step(1, "a"), step(2, "b", width=63), step(3, "c", new=5)]
    (msg, reply), = run([pack(Steps(id=9, items=items))])
    answer = unpack(reply)
    assert isinstance(answer, Results) and answer.id == 9 and [x.id for x in answer.items] == [1, 2, 3]
    assert isinstance(answer.items[1], Error) and answer.items[1].code == "bad_input"
    alone = [unpack(reply) for _, reply in run([pack(items[0].model_copy(update={"session": "a2"}))])]
    alone += [unpack(reply) for _, reply in run([pack(items[2].model_copy(update={"session": "c2"}))])]
    for merged, single in zip([answer.items[0], answer.items[2]], alone):
        assert isinstance(merged, Result) and isinstance(single, Result)
        torch.testing.assert_close(decode_tensor(merged.tensor), decode_tensor(single.tensor), **CLOSE)
    # two steps of one session in one message: the second runs in the next pass, after the first's keys
    queue = _Queue(Channel())
    twice = [step(4, "d", new=2), Step(id=5, session="d", first=0, last=5, max_length=32,
                                       hidden=encode_tensor(torch.randn(1, 1, 64, generator=gen)),
                                       mask=encode_tensor(torch.ones(1, 3, dtype=torch.uint8)))]
    done = node.pool.submit(node._pass, queue, [(pack(Steps(id=10, items=twice)), None)]).result()
    while not done:
        done = node.pool.submit(node._pass, queue, []).result()
    answer = unpack(done[0][1][1])
    assert [type(x) for x in answer.items] == [Result, Result], answer.items


def test_a_node_answers_each_merged_pass_as_it_ends_the_smallest_first(tiny_model, monkeypatch):
    """Requests too big to merge wait for passes of their own, each answered as soon as it ran (so the next
    node starts on it), decode-sized steps first; a Steps message is answered once all its steps ran."""
    from slowllm.node.server._passes import _Queue
    from slowllm.node.server._server import NodeServer
    from slowllm.protocol import Channel, Result, Results, Step, Steps, decode_tensor, encode_tensor, pack, unpack

    node = NodeServer(first=0, last=5, coordinator="ws://127.0.0.1:9", model=str(tiny_model), dtype=torch.float32)
    monkeypatch.setattr(type(node), "_merge_rows", lambda self: 4)  # as a bf16 node's kernels bound it
    gen = torch.Generator().manual_seed(4)

    def step(i, session, new):
        return Step(id=i, session=session, first=0, last=5, hidden=encode_tensor(torch.randn(1, new, 64, generator=gen)),
                    mask=encode_tensor(torch.ones(1, new, dtype=torch.uint8)), max_length=32)

    prompts, small = [step(1, "p1", 6), step(2, "p2", 6)], step(3, "d", 1)
    queue = _Queue(Channel())
    frames = [(pack(m), m.id) for m in [*prompts, small]]
    answered = []
    done = node.pool.submit(node._pass, queue, frames).result()
    while done:
        answered.append([future for future, _ in done])
        outcomes = {future: unpack(reply) for future, (_, reply) in done}
        for future, msg in outcomes.items():
            alone = node.pool.submit(node._pass, _Queue(Channel()), [
                (pack(next(m for m in [*prompts, small] if m.id == future).model_copy(update={"session": "x"})), 0)]
            ).result()[0][1][1]
            torch.testing.assert_close(decode_tensor(msg.tensor), decode_tensor(unpack(alone).tensor), **CLOSE)
            node.sessions.close(queue.session_key("x"))
        done = node.pool.submit(node._pass, queue, []).result()
    assert answered == [[3], [1], [2]]  # one pass each, the decode-sized step first
    # the same three in one Steps message: one reply, after the three passes
    queue = _Queue(Channel())
    items = [m.model_copy(update={"session": m.session + "-again"}) for m in [*prompts, small]]
    replies = [node.pool.submit(node._pass, queue, [(pack(Steps(id=9, items=items)), None)]).result()]
    replies += [node.pool.submit(node._pass, queue, []).result() for _ in range(2)]
    assert [len(r) for r in replies] == [0, 0, 1] and queue.passes == 3
    answer = unpack(replies[2][0][1][1])
    assert isinstance(answer, Results) and [type(x) for x in answer.items] == [Result] * 3


def test_a_node_serving_two_coordinators_keeps_their_sessions_apart_within_one_budget(tiny_model):
    """Two coordinators' links share the node's KV budget, and their session ids live apart: the same id
    from both is two sessions, and one coordinator cannot close (or step) the other's."""
    from slowllm.node.server._passes import _Queue
    from slowllm.node.server._server import NodeServer
    from slowllm.protocol import BusyError, Channel, CloseSession, InputError, Step, encode_tensor, pack

    node = NodeServer(first=0, last=5, coordinator=["ws://127.0.0.1:9", "ws://127.0.0.1:10"], model=str(tiny_model),
                      dtype=torch.float32)
    a, b = (_Queue(Channel(), tag=link.tag) for link in node.links)
    gen = torch.Generator().manual_seed(5)

    def run(queue, msg):
        return node.pool.submit(node._pass, queue, [(pack(msg), None)]).result()[0][1]

    def step(i, session):
        return Step(id=i, session=session, first=0, last=5, hidden=encode_tensor(torch.randn(1, 3, 64, generator=gen)),
                    mask=encode_tensor(torch.ones(1, 3, dtype=torch.uint8)), max_length=32)

    assert not isinstance(run(a, step(1, "s")), BaseException)
    one = node.sessions.nbytes()
    assert not isinstance(run(b, step(2, "s")), BaseException)
    assert len(node.sessions) == 2 and node.sessions.nbytes() == 2 * one
    assert not isinstance(run(b, CloseSession(id=3, session="s")), BaseException)
    assert isinstance(run(b, CloseSession(id=4, session="s")), InputError)  # b's is gone; a's is not b's to close
    assert len(node.sessions) == 1
    node.sessions.budget = node.sessions.nbytes() + one // 2  # room for half a session more, whoever asks
    assert isinstance(run(a, step(5, "t")), BusyError) and isinstance(run(b, step(6, "t")), BusyError)


# A bf16 session's prompt and decode steps (alone and merged), with the layout `cache_layout` chooses here or
# with the other one forced, against the fp32 truth of all positions at once (no cache).
_LAYOUTS = r"""
import json, sys
import torch
from slowllm.node import Checkpoint
from slowllm.node.engine import _blocks, _merge
from slowllm.node.engine._blocks import BlockCache, KVLayout, onednn_attention
from slowllm.node.engine._merge import StepPart, run_merged_steps
from slowllm.node.engine._resident import ResidentBlocks

blocks = ResidentBlocks(Checkpoint(sys.argv[1]), 0, 2, torch.bfloat16)
gen = torch.Generator().manual_seed(7)
hidden = 3 * torch.randn(2, 12, 64, generator=gen)
mask = torch.ones(2, 12, dtype=torch.long)
mask[1, :3] = 0
want = ResidentBlocks(Checkpoint(sys.argv[1]), 0, 2, torch.float32).forward(hidden, mask, 0, 2)

def decode(merged):
    caches = [{layer: BlockCache() for layer in range(3)} for _ in range(2)]
    outs = [[blocks.forward(hidden[r:r + 1, :8].bfloat16(), mask[r:r + 1, :8], 0, 2, caches[r])] for r in range(2)]
    for t in range(8, 12):
        parts = [StepPart(hidden[r:r + 1, t:t + 1].bfloat16(), mask[r:r + 1, :t + 1], caches[r], f"s{r}")
                 for r in range(2)]
        steps = run_merged_steps(blocks, parts, 0, 2) if merged else [
            blocks.forward(p.hidden, p.mask, 0, 2, p.caches) for p in parts]
        for r in range(2):
            outs[r].append(steps[r])
    cache = caches[0][0]
    return {"layout": list(cache.layout), "keys_stride": list(cache.keys.stride()),
            "values_stride": list(cache.values.stride()),
            "error": (torch.cat([torch.cat(o, 1) for o in outs]).float() - want).abs().max().item()}

run = {"onednn": onednn_attention(torch.bfloat16, torch.device("cpu")), "alone": decode(False), "merged": decode(True),
       "scale": want.abs().max().item()}
chosen = KVLayout(*run["alone"]["layout"])
other = KVLayout(not chosen.keys_transposed, not chosen.values_transposed)
_blocks.cache_layout = _merge.cache_layout = lambda *args: other
run["other"] = decode(False)
print(json.dumps(run))
"""


def test_bf16_caches_follow_the_path_that_multiplies_them(models_dir):
    """Where oneDNN multiplies bf16 attention (AVX512 CPUs) keys are stored transposed and values as rows; on
    PyTorch's own bf16 loops (an AVX2 PC with `--dtype bfloat16`; here PyTorch capped at AVX2) the reverse,
    4-23x faster there (`cache_layout`). Each layout is stored as chosen (the views' strides show which) and
    gives a prompt and decode steps, alone and merged, as close to the fp32 truth as the other layout."""
    import json
    import os
    import subprocess
    import sys

    path = make_checkpoint(models_dir / "layouts", tiny_config(n_layer=3, hidden=64, n_head=4, std=0.25), seed=7)
    procs = {name: subprocess.Popen([sys.executable, "-c", _LAYOUTS, str(path)], stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, **extra}) for name, extra in (("here", {}), ("avx2", AVX2_PC))}
    runs = {name: json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for name, p in procs.items()}
    assert runs["avx2"]["onednn"] is False
    for name, run in runs.items():
        for way in ("alone", "merged"):
            got = run[way]
            assert got["layout"] == ([True, False] if run["onednn"] else [False, True]), (name, got)
            assert (got["keys_stride"][-2] == 1) == run["onednn"], (name, got)  # keys: positions contiguous
            assert (got["values_stride"][-2] == 1) != run["onednn"], (name, got)
            assert got["error"] < 0.03 * run["scale"], (name, way, run)
            assert got["error"] <= 1.5 * run["other"]["error"] + 1e-3 * run["scale"], (name, way, run)
        assert run["other"]["layout"] != run["alone"]["layout"]
