"""Sampling, with randomness that is a function of (seed, row, position).

A seeded row's n-th token draws the same number whatever runs beside it, however the passes are cut, and
on whichever coordinator computes it: so a generation resumed on another coordinator from the tokens it
had produced (the client knows them) continues exactly as it would have. Numbers come from BLAKE2b over
(seed, row, position, use): no generator state to carry from one pass, process or machine to the next.
Unseeded jobs draw from the process's own random source.
"""

from __future__ import annotations

import hashlib
import random

import torch

from ._options import Sampling

_SCALE = 1.0 / (1 << 53)


def probabilities(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution that sampling draws from: softmax of logits / temperature within top-k and top-p."""
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the first token always
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(logits, dim=-1)


class Draws:
    """The random numbers of one job: `uniform(row, position, use)` in [0, 1)."""

    def __init__(self, seed: int | None):
        self.seed = seed
        self._own = random.Random()  # unseeded: any numbers will do
        with torch.inference_mode(False):  # (a normal tensor: updated in place in inference mode or out of it)
            self._cdf = torch.empty(0, dtype=torch.float64)  # `sample`'s, reused (a job's rows draw one at a time)

    def uniform(self, row: int, position: int, use: str = "token") -> float:
        if self.seed is None:
            return self._own.random()
        digest = hashlib.blake2b(f"{self.seed}/{row}/{position}/{use}".encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 11) * _SCALE

    def sample(self, probs: torch.Tensor, row: int, position: int, use: str = "token") -> int:
        """A token from `probs` [V] by inverse CDF: a token of probability 0 is never drawn.

        The CDF is the fp64 running sum, `probs.double().cumsum(0)`'s numbers, made in a buffer the job
        keeps: at Bloom's vocabulary it is 2 MB, and a fresh one is a mapping of its own whose pages fault
        in at every draw (1.5 ms a token, 0.3 this way; cumsum's own conversion, `dtype=`, takes 0.9)."""
        cdf = self._cdf.resize_(probs.shape).copy_(probs).cumsum_(0)
        u = torch.tensor([self.uniform(row, position, use) * float(cdf[-1])], dtype=torch.float64)
        return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)


# Elements per block of `argmax_rows`' first pass
_ARGMAX_BLOCK = 1024


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of float logits [..., V], the same indices (each row's first largest; a NaN
    counts as the largest), in two vectorized passes: each block's max, then the first block holding the
    row's max, searched. torch's argmax over Bloom's 250,880 logits took 215-300 us a row on Zen 4 (its
    max alone 12; this 41), at 8 rows 1.1 ms (this 0.13) of every decode step."""
    v = x.shape[-1]
    if v < 4 * _ARGMAX_BLOCK or not x.is_floating_point() or x.numel() == 0:
        return x.argmax(dim=-1)
    lead, x = x.shape[:-1], x.reshape(-1, v).contiguous()
    n, body = x.shape[0], v // _ARGMAX_BLOCK * _ARGMAX_BLOCK
    blocks = x[:, :body].view(n, -1, _ARGMAX_BLOCK).amax(dim=-1)
    if body < v:
        blocks = torch.cat([blocks, x[:, body:].amax(dim=-1, keepdim=True)], dim=1)
    first = blocks.argmax(dim=-1) * _ARGMAX_BLOCK
    # the block's columns; the last block may be shorter: its last column repeats, after the real one
    columns = (first[:, None] + torch.arange(_ARGMAX_BLOCK)).clamp_max_(v - 1)
    return (first + x.gather(1, columns).argmax(dim=-1)).reshape(lead)


def pick_tokens(logits: torch.Tensor, s: Sampling, draws: Draws, where: list[tuple[int, int]]) -> torch.Tensor:
    """The next token of each row (`where`: each row's (row key, position)): argmax at temperature 0."""
    if s.temperature == 0:
        return argmax_rows(logits)
    if s.top_p is not None and s.top_p < 1:  # (its sorts are the cost: one op sorts the rows on every thread)
        probs = probabilities(logits, s)
        rows = (probs[j] for j in range(len(where)))
    else:
        # Row by row, the same numbers as the batch's (each op is its row's own): a row's temporaries at
        # Bloom's vocabulary (1 MB in fp32) stay below glibc's threshold for a mapping of their own, where
        # [8, V] ones (8 MB) were each mapped anew and faulted in, ~2.5 ms apiece
        rows = (probabilities(logits[j:j + 1], s)[0] for j in range(len(where)))
    return torch.tensor([draws.sample(p, row, position) for p, (row, position) in zip(rows, where)])
