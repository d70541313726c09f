"""Failover benchmark: how long a generation stalls when a node dies, and what the replay costs.

    python bench/failover.py [--kills 20] [--n-layer 24] [--hidden 1024]

Coordinator + 4 nodes on loopback (two redundant pairs covering the blocks). For each of --kills runs a
32-token generation is started and the node holding its session's first span is killed with SIGKILL
after the 16th token; the killed node is restarted between runs. Reports the stall (time from the kill
to the next token, minus the median time between tokens), median and p95; the bytes replayed to the
replacement; and the slowdown of a 32-token generation with one failure vs none. Table + JSON line.
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
PROMPT = "Once upon a time there was a researcher without a cluster"


def timed_generation(client, kill=None, at_token: int = 16) -> tuple[float, list[float], float | None]:
    stamps: list[float] = []
    killed_at: list[float] = []
    killers: list[threading.Thread] = []

    def kill_now():
        kill()
        killed_at.append(time.perf_counter())

    def on_text(i, text):  # runs inside the client's event loop: the kill goes to another thread
        stamps.append(time.perf_counter())
        if kill and len(stamps) == at_token:
            killers.append(threading.Thread(target=kill_now))
            killers[0].start()

    start = time.perf_counter()
    client.generate([PROMPT], Sampling(max_new_tokens=32), on_text=on_text)
    total = time.perf_counter() - start
    for killer in killers:
        killer.join()
    return total, stamps, killed_at[0] if killed_at else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args()
    model = WORK / f"net-h{args.hidden}-l{args.n_layer}"  # the checkpoint bench/network.py uses
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(n_layer=args.n_layer, hidden=args.hidden, n_head=16, vocab_size=8192,
                                           std=0.02))
    half = args.n_layer // 2
    ranges = [f"0-{half - 1}", f"{half}-{args.n_layer - 1}"] * 2
    with LocalCluster(model, ranges) as cluster:
        client = cluster.client()
        timed_generation(client)  # warm up
        clean = [timed_generation(client)[0] for _ in range(3)]
        gaps = []
        stalls, replayed, with_failure = [], [], []
        for run in range(args.kills):
            before = client.status()["replayed_bytes"]
            victim = {}

            def kill():
                busy = [n for n in client.status()["nodes"] if n["sessions"] and n["layers"][0] == 0]
                victim.update(busy[0])
                cluster.nodes[busy[0]["name"]].kill()

            total, stamps, killed_at = timed_generation(client, kill)
            if killed_at is None or not any(t > killed_at for t in stamps):
                raise SystemExit(f"run {run}: the kill did not land mid-generation; use a larger model")
            gaps += [b - a for a, b in zip(stamps, stamps[1:])][:10]
            after = next(t for t in stamps if t > killed_at)
            stalls.append(after - killed_at)
            with_failure.append(total)
            replayed.append(client.status()["replayed_bytes"] - before)
            first, last = victim["layers"]
            cluster.start_node(f"{first}-{last}", name=victim["name"])
            cluster.wait_covered(4)
        token_gap = statistics.median(gaps)
        stalls = sorted(s - token_gap for s in stalls)
        p95 = stalls[min(len(stalls) - 1, round(0.95 * (len(stalls) - 1)))]
        out = {"kills": args.kills, "token_gap_ms": token_gap * 1000,
               "stall_ms_median": statistics.median(stalls) * 1000, "stall_ms_p95": p95 * 1000,
               "replayed_bytes_median": statistics.median(replayed),
               "gen32_clean_s": statistics.median(clean), "gen32_one_failure_s": statistics.median(with_failure)}
        out["slowdown_one_failure"] = out["gen32_one_failure_s"] / out["gen32_clean_s"]
    print(f"{'figure':<36} value")
    print(f"{'time between tokens (median)':<36} {out['token_gap_ms']:.1f} ms")
    print(f"{'stall after a kill (median / p95)':<36} {out['stall_ms_median']:.1f} / {out['stall_ms_p95']:.1f} ms")
    print(f"{'bytes replayed per failover':<36} {out['replayed_bytes_median']:.0f}")
    print(f"{'32 tokens: one failure vs none':<36} {out['gen32_one_failure_s']:.3f} / {out['gen32_clean_s']:.3f} s "
          f"= {out['slowdown_one_failure']:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
