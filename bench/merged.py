"""A node's merged decode pass: attention reading each session's cache where it lies, against copies.

    python bench/merged.py [--sessions 2 8] [--context 100 300 1000] [--dtype bfloat16 float32] [--turns 8]
                           [--isa avx512bf16 avx2] [--width176] [--check 4]
    python bench/merged.py --local-users 1 4 8 [--tokens 17] [--turns 4] [--isa ...]

A node runs the decode steps of every session waiting at it as ONE pass over its blocks
(node/engine/_merge.py), and Bloom's attention there is handed a padded view of all the sessions' caches.
This times one merged decode step of S sessions, ~C cached positions each (3 apart: every row's length
differs, as a node's sessions' do), through the 24 blocks of bench/local.py's bloom-1b7-shaped checkpoint
(every block resident), in alternating turns of:
  copies    the view filled with a copy of every session's cache, every block (what the rounds before did)
  in place  attention's two products reading each session's cache where it lies (`attention_bmm_pieces`)
and checks that "in place" gives each session exactly its step alone (bit for bit; "copies" differs by
float rounding where a padded sum groups differently: the largest difference is printed; with --check a
session's row with a hole also has PyTorch's softmax sum a longer row, whose rounding can differ too). The first turn
of each is dropped, the rest's median kept. --width176 adds one block at Bloom-176B width (hidden 14336,
112 heads, built tensor by tensor with random weights, never written), 8 sessions of ~2,048 positions;
--check K adds rows where the first session steps a speculative check of K positions (the others one:
their rows get holes). A node merges at most its kernels' rows (sessions x the pass's new positions, holes
included: 8 in bf16 without AMX, `plan_steps`), so --sessions 2 --check 4 is such a pass a node runs, where
each session still gets its numbers alone; more would run the linears as PyTorch's GEMM.
--local-users N... measures instead N generations at once through one process with every block in RAM
(`slowllm serve --local --keep-in-ram`'s users, `step_together`): its chain now runs their steps as merged
passes and their LM heads in one read of the head, against their sessions stepped one after another with
a read of the head each (what it did before), decode tokens/s of all of them, tokens compared.
Per ISA (`SLOWLLM_ISA`, each in its own process; `avx2` also caps PyTorch, oneDNN and MKL at AVX2, as
bench/decode.py does: an AVX2 PC, whose bf16 caches keep keys as rows). Prints a table and one JSON line;
"in place" is a ratio to "copies" measured in the same turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from local import make_model  # noqa: E402

AVX2_PC = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
WIDTH176 = dict(hidden_size=14336, n_head=112, n_layer=1, vocab_size=384)


def sessions_of(n: int, context: int, layers: int, heads: int, head_dim: int, dtype, layout, seed: int = 1) -> list:
    """n sessions' caches ([past, {layer: BlockCache}]), ~context positions each, 3 apart, random keys."""
    from slowllm.node.engine._blocks import BlockCache, kv_buffer

    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(n):
        past = context - 3 * s
        caches = {}
        for layer in range(layers):
            shape = (1, heads, past + 64, head_dim)
            k = kv_buffer(shape, dtype, "cpu", layout.keys_transposed)
            v = kv_buffer(shape, dtype, "cpu", layout.values_transposed)
            k.copy_(torch.randn(shape, generator=g))
            v.copy_(torch.randn(shape, generator=g))
            caches[layer] = BlockCache(k, v, length=past, layout=layout)
        out.append([past, caches])
    return out


def step_input(session: int, new: int, hidden: int, dtype) -> torch.Tensor:
    """Session `session`'s hidden states for a step of `new` positions (the same in every turn)."""
    return torch.randn(1, new, hidden, generator=torch.Generator().manual_seed(session)).to(dtype)


def turns(blocks, sessions: list, hidden: int, dtype, count: int, check: int = 0) -> dict:
    """Alternating merged steps (in place first, then copies, then the other order), each run again on the
    same caches (the step's positions are forgotten after it): ms per step, outputs identical. `check`:
    the first session steps a speculative check of that many positions."""
    news = [check if check and i == 0 else 1 for i in range(len(sessions))]
    from slowllm.node.engine import _merge
    from slowllm.node.engine._attention_products import for_attention
    from slowllm.node.kernels import kernels

    in_place = _merge.merged_for_attention

    def copies(keys, values, new, *pieces_and_fill):
        pieces_and_fill[-1]()  # (fill)
        return for_attention(keys, values, new)
    last = max(blocks.blocks)
    times: dict[bool, list[float]] = {True: [], False: []}
    outs: dict[bool, torch.Tensor] = {}
    pieces = 0
    try:
        for turn in range(count):
            for on in ((True, False) if turn % 2 == 0 else (False, True)):
                _merge.merged_for_attention = in_place if on else copies
                parts = [_merge.StepPart(step_input(i, new, hidden, dtype), torch.ones(1, past + new, dtype=torch.long),
                                         caches, f"s{i}")
                         for i, ((past, caches), new) in enumerate(zip(sessions, news))]
                before = kernels().calls()["attention_bmm_pieces"]
                start = time.perf_counter()
                out = _merge.run_merged_steps(blocks, parts, 0, last)
                times[on].append(time.perf_counter() - start)
                pieces += (kernels().calls()["attention_bmm_pieces"] - before) if on else 0
                for (_, caches), new in zip(sessions, news):
                    for cache in caches.values():
                        cache.truncate(cache.length - new)
                outs[on] = torch.cat([x.reshape(-1, hidden) for x in out])
    finally:
        _merge.merged_for_attention = in_place
    alone = []  # each session's step by itself
    for i, ((past, caches), new) in enumerate(zip(sessions, news)):
        alone.append(blocks.forward(step_input(i, new, hidden, dtype), torch.ones(1, past + new, dtype=torch.long), 0,
                                    last, caches)
                     .reshape(-1, hidden))
        for cache in caches.values():
            cache.truncate(cache.length - new)
    copies_ms, in_place_ms = (statistics.median(times[on][1:]) * 1e3 for on in (False, True))
    return {"copies_ms": round(copies_ms, 1), "in_place_ms": round(in_place_ms, 1),
            "ratio": round(in_place_ms / copies_ms, 3), "in_place_took_pieces": pieces > 0,
            "in_place_as_alone": bool(torch.equal(outs[True], torch.cat(alone))),
            "copies_max_diff": float((outs[True].float() - outs[False].float()).abs().max())}


def local_users(model, users: int, tokens: int, count: int) -> dict:
    """`users` generations stepped together on resident blocks (`slowllm serve --local --keep-in-ram`'s
    users: `step_together`), the ResidentChain's merged passes and the bf16 ends' shared LM-head reads
    against its sessions stepped one after another, each with its own read of the head (what it did
    before), in alternating turns: decode tokens/s of all users, tokens identical."""
    from slowllm.coordinator import LocalRunner, Sampling
    from slowllm.coordinator.chains._chain import Chain
    from slowllm.coordinator.chains._local import ResidentChain
    from slowllm.coordinator.jobs._generate import Continuation, Generation, step_together

    runner = LocalRunner(model, keep_in_ram=True, progress=False)
    merged = ResidentChain.step_sessions
    texts = [f"{i}: the researcher without a cluster read every block from disk in turn" for i in range(users)]
    rate: dict[bool, list[float]] = {True: [], False: []}
    got: dict[bool, list] = {}
    try:
        for turn in range(count):
            for on in ((True, False) if turn % 2 == 0 else (False, True)):
                ResidentChain.step_sessions = merged if on else Chain.step_sessions
                runner.ends.__dict__.pop("invariant_rows", None)  # (a cached property: worked out again, or 0)
                if not on and runner.ends.dtype == torch.bfloat16:  # (bf16 ends shared no head reads before)
                    runner.ends.__dict__["invariant_rows"] = 0
                jobs = [Generation(runner.ends, runner.chain, [Continuation(runner.ends.encode(t), tokens)], Sampling())
                        for t in texts]
                step_together(runner.chain, jobs)  # (the prompts' passes: the clock starts at the first decode step)
                start = time.perf_counter()
                while any(not job.done for job in jobs):
                    step_together(runner.chain, [job for job in jobs if not job.done])
                rate[on].append(users * (tokens - 1) / (time.perf_counter() - start))
                got[on] = [job.results()[0]["token_ids"] for job in jobs]
    finally:
        ResidentChain.step_sessions = merged
    before, now = (statistics.median(rate[on][1:] or rate[on]) for on in (False, True))
    return {"users": users, "one_by_one_tokens_s": round(before, 1), "merged_tokens_s": round(now, 1),
            "ratio": round(now / before, 2), "identical": got[True] == got[False]}


def child(args) -> list[dict]:
    from transformers import BloomConfig

    from slowllm.node import Checkpoint
    from slowllm.node.engine._blocks import DEFAULT_SCORE_BUDGET, cache_layout, new_block
    from slowllm.node.engine._resident import ResidentBlocks
    from slowllm.node.kernels import kernels

    if kernels() is None:
        raise SystemExit("slowllm's kernels are not built here (SLOWLLM_ISA=none or no compiler): nothing to compare")
    rows = []
    model = make_model(24)
    if args.local_users:
        return [{"isa": kernels().isa, **local_users(model, n, args.tokens, args.turns)} for n in args.local_users]
    for name in args.dtype:
        dtype = getattr(torch, name)
        blocks = ResidentBlocks(Checkpoint(model), 0, 23, dtype)
        config = blocks.config
        layout = cache_layout(blocks.blocks[0].slowllm_family, dtype, torch.device("cpu"))
        heads = config.num_attention_heads
        for n in args.sessions:
            for context in args.context:
                sessions = sessions_of(n, context, 24, heads, config.hidden_size // heads, dtype, layout)
                for check in sorted({0, args.check}):
                    rows.append({"isa": kernels().isa, "dtype": name, "model": "bloom-1b7 shape, 24 blocks",
                                 "sessions": n, "context": context, "check": check,
                                 **turns(blocks, sessions, config.hidden_size, dtype, args.turns, check)})
                del sessions
        del blocks
        if args.width176:
            config = BloomConfig(**WIDTH176)
            block = new_block(config, dtype, linears=torch.bfloat16 if dtype == torch.float32 else None)
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
            one = ResidentBlocks.__new__(ResidentBlocks)  # (its block built here, not read from a checkpoint)
            one.blocks, one.first, one.last, one.config = {0: block}, 0, 0, config
            one.dtype, one.device, one.score_budget = dtype, torch.device("cpu"), DEFAULT_SCORE_BUDGET
            layout = cache_layout(block.slowllm_family, dtype, torch.device("cpu"))
            sessions = sessions_of(8, 2048, 1, 112, 128, dtype, layout)
            rows.append({"isa": kernels().isa, "dtype": name, "model": "one Bloom-176B-width block", "sessions": 8,
                         "context": 2048, "check": 0, **turns(one, sessions, 14336, dtype, min(args.turns, 6))})
            del block, sessions
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--turns", type=int, default=8, help="timed steps of each kind (alternating)")
    ap.add_argument("--isa", nargs="+", default=None, help="kernel builds to measure (default: those this CPU runs)")
    ap.add_argument("--width176", action="store_true", help="also one block at Bloom-176B width (~8 GB of RAM)")
    ap.add_argument("--check", type=int, default=0,
                    help="also with the first session stepping a speculative check of this many positions")
    ap.add_argument("--local-users", type=int, nargs="+", default=None,
                    help="instead: this many generations at once through `LocalRunner(keep_in_ram=True)`")
    ap.add_argument("--tokens", type=int, default=17, help="with --local-users: new tokens per generation")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from slowllm.node.kernels._kernels import runnable_isas

    make_model(24)  # (once, before the children: they would race to build it)
    rows = []
    for isa in args.isa or runnable_isas():
        env = {**os.environ, "SLOWLLM_ISA": isa, **(AVX2_PC if isa.startswith("avx2") else {})}
        print(f"measuring {isa} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True,
                             text=True, check=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    if args.local_users:
        print(f"{'build':>10} {'users':>5} {'one by one tok/s':>16} {'merged tok/s':>12} {'ratio':>6} identical")
        for r in rows:
            print(f"{r['isa']:>10} {r['users']:>5} {r['one_by_one_tokens_s']:>16.1f} {r['merged_tokens_s']:>12.1f} "
                  f"{r['ratio']:>5.2f}x {r['identical']}")
        print(json.dumps({"bench": "merged", "local_users": rows}))
        return
    print(f"{'build':>10} {'dtype':>8} {'model':>28} {'sessions':>8} {'positions':>9} {'check':>5} {'copies ms':>9} "
          f"{'in place':>8} {'ratio':>6} {'as alone':>8} {'vs copies':>9}")
    for r in rows:
        print(f"{r['isa']:>10} {r['dtype']:>8} {r['model']:>28} {r['sessions']:>8} {r['context']:>9} "
              f"{r['check'] or '':>5} "
              f"{r['copies_ms']:>9.1f} {r['in_place_ms']:>8.1f} {r['ratio']:>5.3f}x {str(r['in_place_as_alone']):>8} "
              f"{r['copies_max_diff']:>9.1e}")
    print(json.dumps({"bench": "merged", "rows": rows}))


if __name__ == "__main__":
    main()
