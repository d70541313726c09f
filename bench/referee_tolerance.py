"""How far an honest node's answer is from the referee's recomputation in the same arithmetic.

    python bench/referee_tolerance.py [--hidden 1024] [--n-layer 4] [--rows 8] [--trials 4]

The referee (`coordinator/swarm/_verify.py`) judges a node in the arithmetic it declares: its dtype, and for
int8 weights the same quantization of the coordinator's checkpoint. What separates an honest answer
from the referee's is then only summation order: the node computes a batch of --rows rows (merged
passes), the referee one row; kernels may switch paths with the batch size. For each arithmetic this
prints the worst relative L2 error per position over --trials random inputs, next to the tolerance the
referee uses (`REFEREE_TOLERANCE`) and their ratio (must stay well below 1), for a random checkpoint of
the given width (made once under bench/_work/), and one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slowllm.coordinator import make_checkpoint, tiny_config
from slowllm.coordinator.swarm._verify import REFEREE_TOLERANCE, Referee
from slowllm.node import Checkpoint
from slowllm.node.engine._quantize import quantize_checkpoint
from slowllm.node.engine._resident import ResidentBlocks

WORK = Path(__file__).parent / "_work"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.float() - b.float()).norm(dim=-1)
    return (diff / torch.maximum(a.float().norm(dim=-1), b.float().norm(dim=-1))).max().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--trials", type=int, default=4)
    args = p.parse_args()
    model = WORK / f"referee-h{args.hidden}-l{args.n_layer}"
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(n_layer=args.n_layer, hidden=args.hidden, n_head=16, vocab_size=512,
                                           std=0.02))
    int8 = WORK / f"referee-h{args.hidden}-l{args.n_layer}-int8"
    if not (int8 / "config.json").exists():
        quantize_checkpoint(model, int8)
    referee = Referee(Checkpoint(model))
    last = args.n_layer - 1
    rows = []
    for name, path, dtype, quantized in [("float32", model, "float32", False), ("bfloat16", model, "bfloat16", False),
                                         ("int8, float32", int8, "float32", True),
                                         ("int8, bfloat16", int8, "bfloat16", True)]:
        node = ResidentBlocks(Checkpoint(path), 0, last, getattr(torch, dtype))
        worst = 0.0
        for trial in range(args.trials):
            g = torch.Generator().manual_seed(trial)
            hidden = torch.randn(args.rows, 24, args.hidden, generator=g)
            mask = torch.ones(args.rows, 24, dtype=torch.long)
            mask[1, :5] = 0  # a left-padded row
            out = node.forward(hidden, mask, 0, last)
            for r in range(2):
                judge = referee.forward(0, last, hidden[r:r + 1], mask[r:r + 1], dtype, quantized)
                worst = max(worst, relative(out[r:r + 1], judge))
        rows.append({"arithmetic": name, "worst": worst, "tolerance": REFEREE_TOLERANCE[dtype],
                     "ratio": worst / REFEREE_TOLERANCE[dtype]})
    print(f"{'arithmetic':<16}{'worst rel. L2':>15}{'tolerance':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['arithmetic']:<16}{r['worst']:>15.2e}{r['tolerance']:>11.0e}{r['ratio']:>8.3f}")
    print(json.dumps({"bench": "referee_tolerance", "hidden": args.hidden, "n_layer": args.n_layer,
                      "rows": args.rows, "results": rows}))


if __name__ == "__main__":
    main()
