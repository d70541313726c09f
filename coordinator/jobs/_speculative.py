"""Speculative decoding: a small draft model proposes tokens, the big model checks them in one pass.

A pass over the big model costs the same whether it carries one new position or five (streaming: the
whole checkpoint is read from disk either way; a node: every weight is read from RAM either way), so
each drafted token the big model agrees with is a pass saved. This module holds the parts that are not
the generation loop itself (that is `_generate`, written once for every chain):

- `Draft`: the draft model (its ends and a resident chain), checked to share the target's tokenizer;
- `accept`: the acceptance rule. Greedy: a drafted token stays while it is the big model's argmax.
  Sampling: the standard speculative sampling rule (Leviathan et al. 2023, Chen et al. 2023): keep a
  drafted token d with probability min(1, p(d)/q(d)), else sample from max(0, p - q) normalised, so
  every emitted token has exactly the big model's distribution p;
- `DraftLength`: how many tokens to propose, from the measured acceptance and the measured cost of a
  big-model pass and a draft step, so that a draft that agrees with nothing soon proposes none.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from slowllm.coordinator.chains._chain import Chain
from slowllm.node import Checkpoint
from slowllm.node.engine._memory import node_dtype
from slowllm.protocol import InputError

from ._ends import ModelEnds
from ._sampling import Draws, argmax_rows

MAX_DRAFT_TOKENS = 16  # beyond this a round's acceptance probability of the last token is negligible


@dataclass
class Draft:
    """The draft model, kept in RAM beside the big model's ends, and the most tokens it proposes per pass."""

    ends: ModelEnds
    chain: Chain
    tokens: int = 4
    adaptive: bool = True  # False: always draft `tokens` (tests, to exercise rollback whatever the timing)

    def with_tokens(self, tokens: int | None) -> "Draft":
        if tokens is None:
            return self
        check_draft_tokens(tokens)
        return dataclasses.replace(self, tokens=tokens)

    def close(self) -> None:
        self.chain.close()


def check_draft_tokens(tokens) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_DRAFT_TOKENS:
        raise InputError(f"--draft-tokens must be a whole number from 1 to {MAX_DRAFT_TOKENS}, not {tokens!r}.")


def load_draft(model: str, target: Checkpoint, *, dtype: torch.dtype | None, device: str = "cpu",
               tokens: int = 4) -> Draft:
    """Load the draft model whole into RAM (it is small: bloom-560m or bloom-1b7 for Bloom-176B).

    dtype None: as a node would choose (bf16 for a bf16 checkpoint where bf16 is fast here)."""
    check_draft_tokens(tokens)
    checkpoint = Checkpoint(model)
    if dtype is None:
        dtype = node_dtype(checkpoint.storage_dtype(), device, None, checkpoint.int8)[0]
    ends = ModelEnds(checkpoint, dtype=dtype)
    vocab = Tokenizer.from_file(str(target.tokenizer_path())).get_vocab()
    if ends.tokenizer.get_vocab() != vocab or ends.vocab_size != target.meta(target.embedding_key)[0][0] \
            or ends.family != target.family:
        raise InputError(f"the draft model {model} does not share the big model's tokenizer and vocabulary: choose "
                         "a draft of the same family and tokenizer (for Bloom-176B/Bloomz: bloom-560m, bloom-1b7, bloomz-560m...; "
                         "for Llama-3.1-70B: Llama-3.2-1B).")
    from slowllm.coordinator.chains._local import \
        ResidentChain  # transformers' blocks: imported when a draft is loaded, not at start-up

    return Draft(ends, ResidentChain(checkpoint, dtype=dtype, device=device), tokens)


# ---- acceptance ----------------------------------------------------------------------------------
def accept(p: torch.Tensor | None, q: list[torch.Tensor] | None, target_logits: torch.Tensor,
           drafted: torch.Tensor, draws: Draws | None = None, row: int = 0, at: int = 0,
           best: torch.Tensor | None = None) -> tuple[int, int]:
    """For one row: how many of the k drafted tokens stay, and the big model's own next token.

    `target_logits` [k+1, V] are the big model's logits after each of x, d1..dk; `drafted` [k] the draft's
    tokens. Greedy when `p` is None; otherwise `p` [k+1, V] are the big model's sampling probabilities
    (temperature, top-k, top-p applied) and `q[i]` [V] the draft's, from which drafted[i] was sampled;
    the random numbers are `draws`' for row `row`, the drafts sitting at positions at, at+1, ...
    `best`: greedy, `argmax_rows(target_logits)` if the caller has it already (a batch's rows in one call).
    """
    k = drafted.shape[0]
    if p is None:
        best = argmax_rows(target_logits) if best is None else best
        agree = (best[:k] == drafted).long()
        n = int(agree.cumprod(0).sum()) if k else 0
        return n, int(best[n])
    for i in range(k):
        d = int(drafted[i])
        ratio = p[i, d] / q[i][d]  # q[i][d] > 0: d was sampled from q[i]
        if draws.uniform(row, at + i, "accept") < ratio:  # min(1, ratio) is implied: uniform < 1
            continue
        residual = (p[i] - q[i]).clamp_(min=0)
        total = residual.sum()
        # p == q up to rounding: the residual is empty, and p itself is the right distribution
        dist = residual / total if total > 1e-12 else p[i]
        return i, draws.sample(dist, row, at + i, "residual")
    return k, draws.sample(p[k], row, at + k)


# ---- how many tokens to draft --------------------------------------------------------------------
class DraftLength:
    """Chooses k per round: the k in 0..most with the most expected tokens per second.

    Acceptance is modelled per token (alpha, estimated from recent rounds: accepted / (accepted +
    rejections)); a round of k drafts yields (1 - alpha^(k+1)) / (1 - alpha) tokens on average and costs a
    big-model pass of k+1 positions plus k draft steps. Both are timed as they happen: the pass time is a
    line fitted over recent rounds (time = a + b * k, b >= 0; flat when streaming from disk, where k+1
    positions cost what one does), so timing noise between two values of k cannot make a larger k look
    cheaper. When k = 0 wins, a one-token probe every `probe_every` rounds notices a draft that starts to
    agree again (a quote, a list); a useless draft thus costs a draft step and one extra position every
    16 passes.
    """

    def __init__(self, most: int, adaptive: bool = True, probe_every: int = 16, decay: float = 0.6):
        self.most, self.adaptive, self.probe_every, self.decay = most, adaptive, probe_every, decay
        # A weak prior that fades fast: one round decides most of it, so a useless draft stops within two
        # or three rounds (each costs a pass of k+1 positions and k draft steps for one token).
        self.accepted, self.rejected = 0.25, 0.25
        self.passes: collections.deque[tuple[int, float]] = collections.deque(maxlen=32)  # (k, seconds)
        self.draft_s = 0.0  # seconds of one draft step
        self.rounds_at_zero = 0

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def pass_seconds(self, k: int) -> float:
        """The big model's pass of k+1 positions, from the line through recent rounds."""
        if not self.passes:
            return 1.0
        ks, ts = [x for x, _ in self.passes], [t for _, t in self.passes]
        mean_k, mean_t = sum(ks) / len(ks), sum(ts) / len(ts)
        var = sum((x - mean_k) ** 2 for x in ks)
        slope = max(0.0, sum((x - mean_k) * (t - mean_t) for x, t in self.passes) / var) if var else 0.0
        return max(1e-6, mean_t + slope * (k - mean_k))

    def expected_rate(self, k: int) -> float:
        return expected_tokens(self.alpha, k) / (self.pass_seconds(k) + k * self.draft_s)

    def choose(self, remaining: int) -> int:
        """Tokens to draft this round, given that at most `remaining` more tokens are wanted."""
        limit = max(0, min(self.most, remaining - 1))
        if limit == 0 or not self.adaptive:
            return limit
        best = max(range(limit + 1), key=lambda k: (self.expected_rate(k), -k))
        if best == 0:
            self.rounds_at_zero += 1
            if self.rounds_at_zero % self.probe_every == 0:
                return 1
        else:
            self.rounds_at_zero = 0
        return best

    def record(self, k: int, accepted: list[int], pass_seconds: float, draft_seconds: float) -> None:
        """After a round of `k` drafts: tokens accepted per active row and what the round's parts took."""
        self.passes.append((k, pass_seconds))
        if k == 0 or not accepted:
            return
        step = draft_seconds / k
        self.draft_s = step if not self.draft_s else 0.7 * self.draft_s + 0.3 * step
        self.accepted = self.decay * self.accepted + sum(accepted)
        self.rejected = self.decay * self.rejected + sum(1 for a in accepted if a < k)


class Stopwatch:
    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round of k drafts yields when each drafted token is accepted with probability alpha."""
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


