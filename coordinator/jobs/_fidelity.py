"""How far an int8 copy's predictions stray from its original's: the figures docs/benchmarks.md states for int8.

Both runners see the same token sequences; per position we compare the log-probability each model gives
the next token (what scoring reports) and whether their most likely next tokens agree (what greedy
generation picks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._score import hidden_batch


@dataclass
class Fidelity:
    positions: int
    mean_abs_logprob_diff: float
    max_abs_logprob_diff: float
    top1_agreement: float

    def as_dict(self) -> dict:
        return {"positions": self.positions, "mean_abs_logprob_diff": round(self.mean_abs_logprob_diff, 5),
                "max_abs_logprob_diff": round(self.max_abs_logprob_diff, 5),
                "top1_agreement": round(self.top1_agreement, 4)}


@torch.no_grad()
def position_logprobs(runner, ids: list[int]) -> torch.Tensor:
    """Log-softmax over the vocabulary at every position of one sequence [len(ids), vocab] (fp32)."""
    batch = hidden_batch(runner.ends, [ids])
    (out,) = list(runner.chain.forward([batch]))
    hidden = runner.ends.final_norm(out[0])
    logits = torch.cat([runner.ends.logits(hidden[i:i + 8]) for i in range(0, hidden.shape[0], 8)])
    return torch.log_softmax(logits, dim=-1)


def compare(reference, candidate, sequences: list[list[int]]) -> Fidelity:
    """`candidate` (e.g. the int8 copy) against `reference` (the original) on `sequences` of token ids."""
    diffs, agree, total = [], 0, 0
    for ids in sequences:
        a, b = position_logprobs(reference, ids), position_logprobs(candidate, ids)
        targets = torch.tensor(ids[1:])
        rows = torch.arange(len(ids) - 1)
        diffs.append((a[rows, targets] - b[rows, targets]).abs())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    d = torch.cat(diffs)
    return Fidelity(int(d.numel()), float(d.mean()), float(d.max()), agree / total)
