"""Many requests at once: merged passes at a node, pipelined micro-batches, fair sharing (issue 23).

A merged pass must give every request what it gets alone: the tests compare with each request run by
itself (fp32, to 1e-5) and with transformers where it matters, on Bloom (alibi) and Llama (rotary, GQA).
"""

from __future__ import annotations

import threading

import pytest
import torch

from slowllm.coordinator import Sampling, make_checkpoint, tiny_config
from slowllm.node import Checkpoint
from slowllm.node._blocks import BlockCache
from slowllm.node._merge import StepPart, plan_forwards, plan_steps, run_merged_forwards, run_merged_steps
from slowllm.node._resident import ResidentBlocks


@pytest.fixture(scope="module", params=["bloom", "llama"])
def blocks(request, models_dir):
    extra = {"num_key_value_heads": 2} if request.param == "llama" else {}
    path = make_checkpoint(models_dir / f"merge-{request.param}",
                           tiny_config(n_layer=3, hidden=64, n_head=4, family=request.param, **extra), seed=5)
    return ResidentBlocks(Checkpoint(path), 0, 2, torch.float32)


# fp32 through matrix products of another size: rounding differs in the last bits (hidden states here are
# of order 1-10; a log-probability through the head moves by less than 1e-5, as the network tests check)
CLOSE = dict(atol=1e-4, rtol=1e-5)


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
    assert plan_forwards([(1, 100), (1, 100), (1, 10), (30, 100)], max_tokens=1 << 16) == [[0, 1], [2], [3]]
