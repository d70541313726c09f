"""Failover benchmark: how long a job stalls when a node, or its coordinator, dies.

    python bench/failover.py [--kills 20] [--coordinator-kills 5] [--n-layer 24] [--hidden 1024]

Nodes: coordinator + 4 nodes on loopback (two redundant pairs covering the blocks). For each of --kills
runs a 32-token generation is started and the node holding its session's first span is killed with
SIGKILL after the 16th token; the killed node is restarted between runs. Reports the stall (time from the
kill to the next token, minus the median time between tokens), median and p95; the bytes replayed to the
replacement; and the slowdown of a 32-token generation with one failure vs none.

Coordinators: two coordinators and 2 nodes serving both, a client knowing both. For each of
--coordinator-kills runs, the client's coordinator is killed with SIGKILL after the 16th token of a
generation, and after the first scored line of a 96-line scoring job: the stall from the kill to the next
token (line) at the other coordinator, the slowdown of each job vs no failure, and how long the restarted
coordinator takes, once up, to have every node back. Table + JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from slowllm.coordinator import Client, Sampling, make_checkpoint, tiny_config
from slowllm.coordinator.client import _resume
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


LINES = [{"context": f"Line {i}: the quick brown fox" + " and more" * (i % 7), "continuation": " jumps"}
         for i in range(96)]


def coordinator_failover(model: Path, ranges: list[str], kills: int) -> dict:
    """Stalls when the client's coordinator is killed mid-generation and mid-scoring (see the docstring)."""
    with LocalCluster(model, []) as a, LocalCluster(model, []) as b:
        for i, layers in enumerate(ranges):
            a.start_node(layers, name=f"both{i}", coordinators=[a.url, b.url])
        a.wait_covered(len(ranges))
        b.wait_covered(len(ranges))
        client = Client([a.url, b.url])
        clean_gen, clean_score, gen_stalls, score_stalls, gen_total, score_total, back = [], [], [], [], [], [], []
        for _ in range(2):  # warm up, then the clean baseline
            client._at = 0
            clean_gen = [timed_generation(client)[0] for _ in range(3)]
            start = time.perf_counter()
            client.score(LINES)
            clean_score = [time.perf_counter() - start]
        for run in range(kills):
            client._at = 0

            def kill():
                a.coordinator.kill()

            total, stamps, killed_at = timed_generation(client, kill)
            gen_total.append(total)
            gen_stalls.append(next(t for t in stamps if t > killed_at) - killed_at)
            back.append(_restart(a, len(ranges)))
            # scoring: killed after its first line; the stall is until the next line arrives elsewhere
            lines: list[float] = []  # the kill's time, then each line's from the other coordinator
            original = _resume.ScoreState.on_event

            def on_event(state, data, original=original):
                original(state, data)
                if not lines:
                    a.coordinator.kill()
                    lines.append(time.perf_counter())
                elif client.url == b.url:  # (not lines the dying coordinator had already sent)
                    lines.append(time.perf_counter())
            _resume.ScoreState.on_event = on_event
            try:
                client._at = 0
                start = time.perf_counter()
                client.score(LINES)
                score_total.append(time.perf_counter() - start)
            finally:
                _resume.ScoreState.on_event = original
            score_stalls.append(lines[1] - lines[0])
            back.append(_restart(a, len(ranges)))
    out = {"coordinator_kills": kills, "gen_stall_ms_median": statistics.median(gen_stalls) * 1000,
           "score_stall_ms_median": statistics.median(score_stalls) * 1000,
           "gen32_one_coordinator_failure_vs_none": statistics.median(gen_total) / statistics.median(clean_gen),
           "score96_one_coordinator_failure_vs_none": statistics.median(score_total) / statistics.median(clean_score),
           "nodes_back_after_restart_s_median": statistics.median(back), "nodes_back_after_restart_s_max": max(back)}
    return out


def _restart(cluster: LocalCluster, nodes: int) -> float:
    cluster.coordinator.wait()
    cluster.start_coordinator()
    up = time.perf_counter()
    cluster.wait_covered(nodes, timeout=60)
    return time.perf_counter() - up


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--coordinator-kills", type=int, default=5)
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
    if args.coordinator_kills:
        out.update(coordinator_failover(model, ranges[:2], args.coordinator_kills))
    print(f"{'figure':<36} value")
    print(f"{'time between tokens (median)':<36} {out['token_gap_ms']:.1f} ms")
    print(f"{'stall after a kill (median / p95)':<36} {out['stall_ms_median']:.1f} / {out['stall_ms_p95']:.1f} ms")
    print(f"{'bytes replayed per failover':<36} {out['replayed_bytes_median']:.0f}")
    print(f"{'32 tokens: one failure vs none':<36} {out['gen32_one_failure_s']:.3f} / {out['gen32_clean_s']:.3f} s "
          f"= {out['slowdown_one_failure']:.2f}x")
    if args.coordinator_kills:
        print(f"{'coordinator killed: stall, generation':<36} {out['gen_stall_ms_median']:.0f} ms (median)")
        print(f"{'coordinator killed: stall, scoring':<36} {out['score_stall_ms_median']:.0f} ms (median)")
        print(f"{'32 tokens: coordinator dies vs not':<36} {out['gen32_one_coordinator_failure_vs_none']:.2f}x")
        print(f"{'96 lines: coordinator dies vs not':<36} {out['score96_one_coordinator_failure_vs_none']:.2f}x")
        print(f"{'restarted: nodes back (median/max)':<36} {out['nodes_back_after_restart_s_median']:.1f} / "
              f"{out['nodes_back_after_restart_s_max']:.1f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
