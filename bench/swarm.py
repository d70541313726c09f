"""Swarm benchmark: many clients at once through coordinator + N single-thread nodes on loopback.

    python bench/swarm.py [--nodes 2 4] [--clients 1 2 4 8 16] [--tokens 24] [--lines 256] [--repeat 1] [--dtype bfloat16]

Creates (once, under bench/_work/) a random fp32 Bloom checkpoint (hidden 1024, 8 blocks, 16 heads),
then for each N in --nodes starts a coordinator and N nodes splitting the blocks evenly, each node with
`--threads 1` (so N stages can compute at once on a small machine), and measures in one run:
  - S concurrent clients (each its own `Client`, its own prompt, greedy, --tokens new tokens):
    aggregate tokens/s, and per-token latency p50/p95 over the clients (a client's time from sending its
    job to its result, prompt included, over its tokens);
    every client's tokens are compared with its prompt run alone (they must be identical);
  - a --lines scoring job through the N nodes, against the same job through ONE node holding every
    block (started in the same run), scores compared (max |difference|).
Every figure is also a ratio within the run: throughput against S = 1, scoring time against one node.
Prints a table and one JSON line. Targets (issue 23): 8 clients >= 4x one client on 2 nodes; 128-line
scoring through 2 nodes <= 0.65x one node; one client's latency no worse than before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from slowllm.coordinator import Sampling, make_checkpoint, tiny_config
from slowllm.coordinator.demo._launch import LocalCluster

WORK = Path(__file__).parent / "_work"
N_LAYER, HIDDEN = 8, 1024
STORY = "the researcher without a cluster read every block from disk in turn and wrote down what it said"


def prompts(n: int) -> list[str]:
    words = STORY.split()
    return [f"{i}: " + " ".join(words[i % len(words):] + words[: i % len(words)]) for i in range(n)]


def split(n: int) -> list[str]:
    per = N_LAYER // n
    return [f"{i * per}-{(i + 1) * per - 1 if i < n - 1 else N_LAYER - 1}" for i in range(n)]


def concurrent_clients(cluster: LocalCluster, texts: list[str], tokens: int) -> dict:
    """Every text from its own client thread at once: wall time, each client's ms per token, the tokens."""
    per_token: list[float] = []
    out: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(texts))
    lock = threading.Lock()

    def one(i: int, text: str) -> None:
        try:
            client = cluster.client()
            barrier.wait()
            start = time.perf_counter()
            res = client.generate([text], Sampling(max_new_tokens=tokens))
            with lock:
                per_token.append((time.perf_counter() - start) / max(1, len(res[0]["token_ids"])))
                out[i] = res[0]["token_ids"]
        except BaseException as e:  # noqa: BLE001 - reported after the run
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(texts)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    produced = sum(len(v) for v in out.values())
    per_token.sort()
    return {"wall_s": wall, "tokens": produced, "tokens_per_s": produced / wall,
            "p50_ms": 1000 * statistics.median(per_token), "p95_ms": 1000 * per_token[round(0.95 * (len(per_token) - 1))],
            "ids": out}


def score_lines(n: int) -> list[dict]:
    texts = prompts(n)
    return [{"context": t, "choices": [" yes", " no"]} if i % 2 else {"context": t, "continuation": " and so on"}
            for i, t in enumerate(texts)]


def timed_score(cluster: LocalCluster, lines: list[dict]) -> tuple[float, list[dict]]:
    client = cluster.client()
    start = time.perf_counter()
    res = client.score(lines)
    return time.perf_counter() - start, res


def max_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        xs = x.get("logprobs", [x.get("logprob")])
        ys = y.get("logprobs", [y.get("logprob")])
        worst = max(worst, *(abs(p - q) for p, q in zip(xs, ys)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--lines", type=int, default=256)
    p.add_argument("--repeat", type=int, default=1, help="every timing: the best of this many runs")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="what the nodes compute in (bf16: slowllm's kernels, as a Bloom node runs; float32: MKL's)")
    args = p.parse_args()
    model = WORK / f"swarm-h{HIDDEN}-l{N_LAYER}"
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(n_layer=N_LAYER, hidden=HIDDEN, n_head=16, vocab_size=8192, std=0.05))
    node_args = ["--threads", "1", "--dtype", args.dtype]
    texts = prompts(max(args.clients))
    lines = score_lines(args.lines)
    report: dict = {"config": {"hidden": HIDDEN, "n_layer": N_LAYER, "tokens": args.tokens, "lines": args.lines,
                               "node_threads": 1, "dtype": args.dtype}, "runs": {}}

    # every client here is the same (loopback, no key) user: let it run them all at once
    coordinator_args = ["--max-jobs-per-client", "64", "--max-jobs", "64"]
    with LocalCluster(model, ["0-%d" % (N_LAYER - 1)], node_args=node_args, coordinator_args=coordinator_args) as one:
        one.client().generate([texts[0]], Sampling(max_new_tokens=2))  # warm up
        one_score = min(timed_score(one, lines) for _ in range(args.repeat))
    for n in args.nodes:
        with LocalCluster(model, split(n), node_args=node_args, coordinator_args=coordinator_args) as cluster:
            cluster.client().generate([texts[0]], Sampling(max_new_tokens=2))
            alone = {i: cluster.client().generate([t], Sampling(max_new_tokens=args.tokens))[0]["token_ids"]
                     for i, t in enumerate(texts)}
            runs = {}
            for s in args.clients:
                tries = [concurrent_clients(cluster, texts[:s], args.tokens) for _ in range(args.repeat)]
                r = max(tries, key=lambda x: x["tokens_per_s"])
                r["identical"] = all(t["ids"][i] == alone[i] for t in tries for i in range(s))
                del r["ids"]
                runs[s] = r
            t, scores = min(timed_score(cluster, lines) for _ in range(args.repeat))
            base = runs[min(args.clients)]["tokens_per_s"]
            for r in runs.values():
                r["vs_one_client"] = r["tokens_per_s"] / base
            report["runs"][n] = {"clients": runs, "score_s": t, "score_one_node_s": one_score[0],
                                 "score_vs_one_node": t / one_score[0], "score_max_diff": max_diff(scores, one_score[1])}

    for n, run in report["runs"].items():
        print(f"\n{n} nodes ({', '.join(split(n))}), one thread each, {args.dtype}")
        print(f"{'clients':>8} {'tok/s':>8} {'vs 1':>6} {'p50 ms':>8} {'p95 ms':>8} {'identical':>10}")
        for s, r in run["clients"].items():
            print(f"{s:>8} {r['tokens_per_s']:>8.1f} {r['vs_one_client']:>5.2f}x {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
                  f"{str(r['identical']):>10}")
        print(f"score {args.lines} lines: {run['score_s']:.2f} s vs {run['score_one_node_s']:.2f} s on one node "
              f"({run['score_vs_one_node']:.2f}x), max |diff| {run['score_max_diff']:.1e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
