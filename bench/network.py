"""Network benchmark: coordinator + 3 node processes on loopback vs the same blocks in one process.

    python bench/network.py [--family bloom|gpt_neox|llama] [--n-layer 24] [--hidden 1024] [--repeat 5]
                            [--dtype float32|bfloat16]

Creates (once, under bench/_work/) a random checkpoint of the family (hidden 1024, 24 blocks: per-token
compute of tens of ms on a 2-core CPU; llama with 4 KV heads for 16), then measures, in one run:
  - generation ms/token for 1 and for 8 prompts (time of 33 new tokens minus 1, over 32: no prefill),
  - batch forward throughput (a score job of 16 x 64 tokens), tokens/s,
  - one tuning step (batch of 4),
in-process (every block resident: `ResidentChain`) and through the network (`Client`, raw and bf16
compression), and bytes per token per hop with each codec. Prints a table and one JSON line, each
network figure also as a ratio to the in-process one. Targets: per-token latency <= 1.15x in-process,
forward throughput >= 0.9x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


from slowllm.coordinator import Runner, Sampling, TuneOptions, make_checkpoint, tiny_config
from slowllm.coordinator.jobs._ends import ModelEnds
from slowllm.coordinator.demo._launch import LocalCluster
from slowllm.coordinator.chains._local import ResidentChain
from slowllm.coordinator.chains._exchange import encode_mask
from slowllm.node import Checkpoint
from slowllm.protocol import Step, encode_tensor, pack

WORK = Path(__file__).parent / "_work"
TEXT = "Once upon a time there was a researcher without a cluster who read every block from disk in turn. "
TUNE = [{"context": f"Question {i}: is the sky blue?", "continuation": " Yes, it is."} for i in range(4)]


def measure(jobs: dict, repeat: int) -> dict:
    """Every figure for every job, the jobs interleaved round by round so that load changes on this
    shared machine hit them alike; medians over `repeat` rounds."""
    prompts8 = [f"{i} {TEXT}" for i in range(8)]
    score_reqs = [{"context": f"{i} " + TEXT * 3, "continuation": " and then"} for i in range(16)]
    tokens = sum(len(job_tokens(r)) for r in score_reqs)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    figures = {
        "ms_per_token_1": lambda job: (timed(lambda: job.generate(prompts8[:1], Sampling(max_new_tokens=33)))
                                       - timed(lambda: job.generate(prompts8[:1], Sampling(max_new_tokens=1)))) / 32 * 1000,
        "ms_per_token_8": lambda job: (timed(lambda: job.generate(prompts8, Sampling(max_new_tokens=33)))
                                       - timed(lambda: job.generate(prompts8, Sampling(max_new_tokens=1)))) / 32 * 1000,
        "forward_tokens_per_s": lambda job: tokens / timed(lambda: job.score(score_reqs)),
        "tune_step_s": lambda job: timed(lambda: job.tune(TUNE, TuneOptions(prompt_tokens=8, steps=1, batch_size=4))),
    }
    samples = {name: {f: [] for f in figures} for name in jobs}
    for _ in range(repeat):
        for figure, fn in figures.items():
            for name, job in jobs.items():
                samples[name][figure].append(fn(job))
    return {name: {f: statistics.median(v) for f, v in figs.items()} for name, figs in samples.items()}


_ENDS: ModelEnds | None = None


def job_tokens(req: dict) -> list[int]:
    return _ENDS.encode(req["context"]) + _ENDS.encode(req["continuation"])


def main() -> None:
    global _ENDS
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="bloom", choices=["bloom", "gpt_neox", "llama"])
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="what the blocks compute in, in process and at the nodes (bf16 nodes get bf16 on the wire)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    suffix = ("" if args.family == "bloom" else f"-{args.family}") + ("-bf16" if args.dtype == "bfloat16" else "")
    model = WORK / f"net-h{args.hidden}-l{args.n_layer}{suffix}"
    if not (model / "config.json").exists():
        extra = {"num_key_value_heads": 4} if args.family == "llama" else {}
        make_checkpoint(model, tiny_config(n_layer=args.n_layer, hidden=args.hidden, n_head=16, vocab_size=8192,
                                           std=0.02, family=args.family, **extra), dtype=dtype)
    ck = Checkpoint(model)
    _ENDS = ModelEnds(ck)
    third = args.n_layer // 3
    ranges = [f"0-{third - 1}", f"{third}-{2 * third - 1}", f"{2 * third}-{args.n_layer - 1}"]

    local = Runner(ck, _ENDS, ResidentChain(ck, dtype=dtype))
    with LocalCluster(model, ranges, node_args=["--dtype", args.dtype]) as cluster:
        jobs = {"in_process": local, "network_raw": cluster.client(), "network_bf16": cluster.client(compression="bf16")}
        for job in jobs.values():  # warm up
            job.generate([TEXT], Sampling(max_new_tokens=2))
        results = measure(jobs, args.repeat)

    hop_bytes = {}
    for codec in ("raw", "raw_to_bf16_node", "fp16", "bf16", "int8"):
        for n in (1, 8):
            h = torch.randn(n, 1, args.hidden)
            wire = encode_tensor(h.bfloat16()) if codec == "raw_to_bf16_node" else encode_tensor(h, codec)
            frame = pack(Step(id=1, session="0" * 32, first=0, last=third - 1, hidden=wire,
                              mask=encode_mask(torch.ones(n, 64, dtype=torch.long))))
            hop_bytes[f"{codec}_{n}"] = len(frame) / n

    base = results["in_process"]
    print(f"{'run':<14} {'ms/token (1)':>14} {'ms/token (8)':>14} {'forward tok/s':>15} {'tune step s':>12}")
    for name, r in results.items():
        ratio = lambda k: f" ({r[k] / base[k]:.2f}x)" if name != "in_process" else ""  # noqa: E731
        print(f"{name:<14} {r['ms_per_token_1']:>8.1f}{ratio('ms_per_token_1'):>7} "
              f"{r['ms_per_token_8']:>8.1f}{ratio('ms_per_token_8'):>7} "
              f"{r['forward_tokens_per_s']:>8.0f}{ratio('forward_tokens_per_s'):>8} "
              f"{r['tune_step_s']:>6.2f}{ratio('tune_step_s'):>7}")
    print("bytes per token per hop (step frame, incl. a 64-token mask): " +
          ", ".join(f"{k}: {v:.0f}" for k, v in hop_bytes.items()))
    summary = {"config": {"family": args.family, "dtype": args.dtype, "n_layer": args.n_layer, "hidden": args.hidden, "nodes": ranges}, "results": results,
               "hop_bytes_per_token": hop_bytes,
               "ratios": {name: {k: r[k] / base[k] for k in r} for name, r in results.items() if name != "in_process"}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
