"""Speculative decoding benchmark: tokens/s with a draft model vs without, locally and through the network.

    python bench/speculative.py [--tokens 32] [--skip-local] [--skip-network] [--repeat 1]

Local (streaming, bf16): a bloom-1b7-shaped big model (hidden 2048, 24 blocks, vocab 250880, 3.4 GB) and
a draft that agrees with it (its first 2 blocks: `make_draft_pair`), plus a useless draft (another random
model with the same tokenizer). Each run is a fresh process that evicts the big model from the page cache
after loading, then generates --tokens tokens for one prompt:
  - "cold start": the page cache fills as the first pass reads the blocks (a model that fits in RAM);
  - "every pass from disk": the files are evicted again before every pass (a model larger than RAM, as
    Bloom-176B on a 16 GB PC: every pass is a read of the whole checkpoint).
Network: coordinator (with the draft) + 3 nodes on loopback, hidden 1024, 24 blocks; ms/token with and
without the draft (--draft/--no-draft of the same coordinator), and with a useless draft.

Prints a table and one JSON line; every figure is a ratio to the run without a draft in the same run.
Greedy outputs must be identical in all runs (checked and reported).
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

WORK = Path(__file__).parent / "_work"
PROMPT = "Once upon a time there was a researcher without a cluster who read every block"


def evict(model: Path) -> None:
    for f in model.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def make_models(root: Path, n_layer: int, hidden: int, n_head: int, vocab: int, std: float, damping: float,
                dtype) -> tuple[Path, Path, Path]:
    from slowllm.coordinator import make_checkpoint, make_draft_pair, tiny_config

    target, draft, useless = root / "target", root / "draft", root / "useless"
    if not (draft / "config.json").exists():
        cfg = tiny_config(n_layer=n_layer, hidden=hidden, n_head=n_head, vocab_size=vocab, std=std)
        make_draft_pair(target, draft, cfg, draft_layers=2, damping=damping, dtype=dtype)
    if not (useless / "config.json").exists():
        make_checkpoint(useless, tiny_config(n_layer=2, hidden=256, n_head=4, vocab_size=vocab, std=std), seed=9,
                        dtype=dtype)
    return target, draft, useless


def one_local(target: Path, draft: str, every_pass: bool, tokens: int) -> dict:
    import torch
    from slowllm.coordinator import LocalRunner, Sampling

    torch.set_num_threads(os.cpu_count())
    with LocalRunner(target, dtype="bfloat16", progress=False, draft_model=draft or None) as runner:
        if every_pass:  # a model larger than RAM: every pass reads the checkpoint from disk again
            stream = runner.chain.executor.stream
            blocks = stream.blocks

            def cold_blocks(*args, **kwargs):
                evict(target)
                return blocks(*args, **kwargs)
            stream.blocks = cold_blocks
        evict(target)
        start = time.perf_counter()
        result = runner.generate([PROMPT], Sampling(max_new_tokens=tokens))[0]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "token_ids": result["token_ids"], "passes": result.get("target_passes"),
            "accepted": result.get("accepted"), "drafted": result.get("drafted")}


def local(args) -> dict:
    import torch

    target, draft, useless = make_models(WORK / "spec-1b7", 24, 2048, 16, 250880, args.std, args.damping,
                                         torch.bfloat16)
    out = {}
    for every in (False, True):
        setting = "every_pass_from_disk" if every else "cold_start"
        runs = {}
        for name, d in (("no_draft", ""), ("draft", str(draft)), ("useless_draft", str(useless))):
            samples = []
            for _ in range(args.repeat):
                proc = subprocess.run([sys.executable, __file__, "--one-local", str(target), d, str(int(every)),
                                       str(args.tokens)], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr)
                samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            best = dict(samples[0], seconds=statistics.median(s["seconds"] for s in samples))
            runs[name] = best
            print(f"  local {setting} {name}: {best['seconds']:.1f} s", file=sys.stderr, flush=True)
        out[setting] = runs
    return out


def network(args) -> dict:
    import torch
    from slowllm.coordinator import Sampling
    from slowllm.coordinator.demo._launch import LocalCluster

    # bf16, as volunteers' nodes keep a bf16 checkpoint on CPUs that compute it natively (this one does): there
    # a pass of 5 positions costs what one does; in fp32, MKL's GEMM for 2-16 rows costs twice its GEMV
    target, draft, useless = make_models(WORK / "spec-net-bf16", 24, 1024, 16, 8192, args.std, args.damping,
                                         torch.bfloat16)
    ranges = ["0-7", "8-15", "16-23"]
    out: dict = {}
    prompt_runs = {}
    for name, d in (("draft", draft), ("useless_draft", useless)):
        with LocalCluster(target, ranges, coordinator_args=["--draft-model", str(d), "--verify", "0"]) as c:
            client = c.client()
            client.generate([PROMPT], Sampling(max_new_tokens=2))  # warm up

            def timed(use: bool, n: int) -> tuple[float, dict]:
                start = time.perf_counter()
                r = client.generate([PROMPT], Sampling(max_new_tokens=n), draft=use)[0]
                return time.perf_counter() - start, r

            for _ in range(args.repeat * 3):  # interleaved, so that load on this shared machine hits both alike
                for use in (False, True):
                    key = name if use else f"no_draft ({name} coordinator)"
                    full, r = timed(use, args.tokens + 1)
                    first, _ = timed(use, 1)
                    prompt_runs.setdefault(key, []).append(((full - first) / args.tokens * 1000, r))
    for key, runs in prompt_runs.items():
        ms = statistics.median(m for m, _ in runs)
        r = runs[0][1]
        out[key] = {"ms_per_token": ms, "token_ids": r["token_ids"], "passes": r.get("target_passes"),
                    "accepted": r.get("accepted"), "drafted": r.get("drafted")}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--std", type=float, default=0.5, help="init std of the random models (context-sensitive output)")
    p.add_argument("--damping", type=float, default=0.006, help="how little the blocks the draft lacks write")
    p.add_argument("--skip-local", action="store_true")
    p.add_argument("--skip-network", action="store_true")
    p.add_argument("--one-local", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_local:
        target, draft, every, tokens = args.one_local
        print(json.dumps(one_local(Path(target), draft, every == "1", int(tokens))))
        return
    results = {"tokens": args.tokens}
    if not args.skip_local:
        results["local"] = local(args)
    if not args.skip_network:
        results["network"] = network(args)

    rows, summary = [], {}
    for setting, runs in list(results.get("local", {}).items()):
        base = runs["no_draft"]
        for name, r in runs.items():
            same = r["token_ids"] == base["token_ids"]
            speed = base["seconds"] / r["seconds"]
            rows.append((f"local {setting}", name, f"{args.tokens / r['seconds']:.2f} tok/s", f"{speed:.2f}x", r, same))
            summary[f"local_{setting}_{name}_speedup"] = speed
    net = results.get("network", {})
    for name in ("draft", "useless_draft"):
        if name in net:
            base = net[f"no_draft ({name} coordinator)"]
            r = net[name]
            speed = base["ms_per_token"] / r["ms_per_token"]
            rows.append(("network", f"no draft ({name.replace('_', ' ')} coord.)", f"{base['ms_per_token']:.1f} ms/tok",
                         "1.00x", base, True))
            rows.append(("network", name, f"{r['ms_per_token']:.1f} ms/tok", f"{speed:.2f}x", r,
                         r["token_ids"] == base["token_ids"]))
            summary[f"network_{name}_speedup"] = speed
    print(f"{'mode':<30} {'run':<30} {'speed':>14} {'vs no draft':>12} {'passes':>7} {'accepted':>9} "
          f"{'acceptance':>10} {'same output':>12}")
    for mode, name, speed, ratio, r, same in rows:
        rate = f"{r['accepted'] / r['drafted']:.2f}" if r.get("drafted") else "-"
        print(f"{mode:<30} {name:<30} {speed:>14} {ratio:>12} {str(r.get('passes') or '-'):>7} "
              f"{str(r.get('accepted') if r.get('accepted') is not None else '-'):>9} {rate:>10} {str(same):>12}")
    for runs in results.get("local", {}).values():
        for r in runs.values():
            r.pop("token_ids", None)
    for r in net.values():
        r.pop("token_ids", None)
    results["speedups"] = summary
    results["identical_outputs"] = all(row[5] for row in rows)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
