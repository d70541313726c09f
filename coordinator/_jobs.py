"""The jobs, written once against `Chain`: score continuations and generate text.

Both run identically over the local streaming chain and the remote chain of nodes. Inputs are
left-padded (so every row's last position is its newest token) and sorted by length into batches that
fit the chain's limits; a soft prompt, when given, sits between the padding and the tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from slowllm.protocol import InputError

from ._chain import Batch, Chain, plan_batches
from ._ends import ModelEnds
from ._speculative import Draft, DraftLength, Stopwatch, accept


def inputs_embeds(ends: ModelEnds, rows: Sequence[Sequence[int]],
                  soft_prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `inputs_embeds` [B, T, H] (fp32, differentiable w.r.t. the soft prompt) and mask [B, T]."""
    p = 0 if soft_prompt is None else soft_prompt.shape[0]
    width = max(len(r) for r in rows) + p
    ids = torch.full((len(rows), width), ends.config.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) - p:] = 1
    embeds = ends.embed(ids)
    if soft_prompt is not None:
        embeds = torch.stack([
            torch.cat([embeds[i, : width - len(r) - p], soft_prompt.float(), embeds[i, width - len(r):]])
            for i, r in enumerate(rows)
        ])
    return embeds, mask


def hidden_batch(ends: ModelEnds, rows, soft_prompt=None) -> Batch:
    embeds, mask = inputs_embeds(ends, rows, soft_prompt)
    with torch.no_grad():
        return Batch(ends.embed_norm(embeds), mask)


# ---- score ---------------------------------------------------------------------------------------
@dataclass
class _Item:
    line: int
    choice: int | None
    inputs: list[int]  # context + continuation, without the last token
    targets: list[int]  # the continuation tokens


def parse_score_request(obj, line: int) -> list[str] | str:
    if not isinstance(obj, dict) or not isinstance(obj.get("context"), str):
        raise InputError(f"line {line}: expected an object with a string \"context\" and a \"continuation\" or \"choices\".")
    if isinstance(obj.get("continuation"), str):
        return obj["continuation"]
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return choices
    raise InputError(f"line {line}: needs a string \"continuation\" or a non-empty list of string \"choices\".")


def score(ends: ModelEnds, chain: Chain, requests: Sequence[dict], soft_prompt: torch.Tensor | None = None) -> list[dict]:
    """Log-likelihood of each continuation given its context (lm-evaluation-harness conventions).

    Context and continuation are tokenized separately and concatenated; an empty context is replaced
    by the end-of-text token, as the harness does. All lines go through the chain in one pass.
    """
    items: list[_Item] = []
    for line, req in enumerate(requests, start=1):
        conts = parse_score_request(req, line)
        ctx = ends.encode(req["context"]) or [ends.eos_token_id]
        for choice, cont in enumerate([conts] if isinstance(conts, str) else conts):
            cont_ids = ends.encode(cont)
            if not cont_ids:
                raise InputError(f"line {line}: a continuation is empty; give it at least one character.")
            seq = ctx + cont_ids
            items.append(_Item(line, None if isinstance(conts, str) else choice, seq[:-1], cont_ids))
    p = 0 if soft_prompt is None else soft_prompt.shape[0]
    # Rows longer than one request may carry go through a session instead, in as many steps as it takes
    # (the same numbers under the causal mask); the rest are batched by length.
    fits = [i for i, it in enumerate(items) if len(it.inputs) + p <= chain.max_request_tokens]
    long = [i for i, it in enumerate(items) if len(it.inputs) + p > chain.max_request_tokens]
    batches = [[fits[j] for j in group] for group in
               plan_batches([len(items[i].inputs) + p for i in fits], chain.max_batch_tokens, chain.max_batch_rows)]

    def make() -> Iterator[Batch]:
        for batch in batches:
            yield hidden_batch(ends, [items[i].inputs for i in batch], soft_prompt)

    def long_rows() -> Iterator[tuple[list[int], torch.Tensor]]:
        for i in long:
            batch = hidden_batch(ends, [items[i].inputs], soft_prompt)
            with chain.open_session(1, batch.mask.shape[1]) as session:
                yield [i], session.step(batch.hidden, batch.mask)

    logprob = [0.0] * len(items)
    greedy = [True] * len(items)
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (item, hidden rows, targets)
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if not pending:
            return
        hidden = torch.cat([h for _, h, _ in pending])
        targets = torch.cat([t for _, _, t in pending])
        lp, is_best, _ = ends.target_stats(hidden, targets)
        offset = 0
        for i, h, _ in pending:
            n = h.shape[0]
            logprob[i] += lp[offset:offset + n].double().sum().item()
            greedy[i] = greedy[i] and bool(is_best[offset:offset + n].all())
            offset += n
        pending, pending_tokens = [], 0

    for batch, out in itertools.chain(zip(batches, chain.forward(make())), long_rows()):
        width = out.shape[1]
        for row, i in enumerate(batch):
            it = items[i]
            n = len(it.targets)
            cols = torch.arange(width - n, width)  # the last n inputs predict the continuation
            with torch.no_grad():
                pending.append((i, ends.final_norm(out[row, cols]), torch.tensor(it.targets)))
            pending_tokens += n
            if pending_tokens >= chain.head_tokens:
                flush()
    flush()

    by_line: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_line.setdefault(it.line, []).append(i)
    results: list[dict] = []
    for line in range(1, len(requests) + 1):
        mine = by_line[line]
        if items[mine[0]].choice is None:
            results.append({"logprob": logprob[mine[0]], "is_greedy": greedy[mine[0]]})
        else:
            lps = [logprob[i] for i in mine]
            results.append({"logprobs": lps, "is_greedy": [greedy[i] for i in mine],
                            "best": max(range(len(lps)), key=lps.__getitem__)})
    return results


# ---- generate ------------------------------------------------------------------------------------
@dataclass
class Sampling:
    max_new_tokens: int = 20
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        _whole("max_new_tokens", self.max_new_tokens)
        _whole("seed", self.seed, optional=True)
        _whole("top_k", self.top_k, optional=True)
        _finite("temperature", self.temperature)
        _finite("top_p", self.top_p, optional=True)
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1.")
        if self.temperature < 0:
            raise InputError("--temperature must be 0 (greedy) or positive.")
        if self.top_k is not None and self.top_k < 1:
            raise InputError("--top-k must be at least 1.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError("--top-p must be in (0, 1].")


def _whole(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number, not {value!r}.")


def _finite(name: str, value, optional: bool = False) -> None:
    """A number that is not NaN or infinite (NaN slips through every `<` check)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value!r}.")


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


def pick_tokens(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, s), 1, generator=generator).squeeze(1)


@dataclass
class _Row:
    """One prompt's generation: its tokens so far and what the --json output reports."""

    ids: list[int] = field(default_factory=list)
    done: bool = False
    reason: str = "length"
    passes: int = 0  # passes over the big model that produced its tokens
    accepted: int = 0  # drafted tokens kept
    drafted: int = 0  # drafted tokens checked


def generate(ends: ModelEnds, chain: Chain, prompts: Sequence[str], sampling: Sampling,
             soft_prompt: torch.Tensor | None = None,
             on_tokens: Callable[[int, list[int]], None] | None = None, draft: Draft | None = None) -> list[dict]:
    """Generate for several prompts together: one pass over the blocks advances every prompt.

    Stops a prompt at EOS (not included in the output) or at `max_new_tokens`. `on_tokens(i, ids)` is
    called as tokens arrive (for streaming clients). With a `draft`, each pass checks the tokens the draft
    proposed and may advance a prompt by several tokens (see `_speculative`); the output is the same.
    """
    sampling.check()
    rows = [ends.encode(p) or [ends.bos_token_id] for p in prompts]
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    results: list[dict] = [{} for _ in prompts]
    p = 0 if soft_prompt is None else soft_prompt.shape[0]
    most = draft.tokens if draft is not None else 0
    groups = plan_batches([len(r) + p + sampling.max_new_tokens + most for r in rows],
                          chain.max_batch_tokens, chain.max_batch_rows)
    for group in sorted(groups):
        emit = (lambda j, ids, group=group: on_tokens(group[j], ids)) if on_tokens else (lambda j, ids: None)
        done = _generate_group(ends, chain, [rows[i] for i in group], sampling, soft_prompt, generator, draft, emit)
        for j, i in enumerate(group):
            row = done[j]
            results[i] = {"prompt": prompts[i], "text": ends.decode(row.ids), "token_ids": row.ids,
                          "finish_reason": row.reason}
            if draft is not None:
                results[i].update(target_passes=row.passes, accepted=row.accepted, drafted=row.drafted)
    return results


def _generate_group(ends: ModelEnds, chain: Chain, rows: list[list[int]], s: Sampling, soft_prompt,
                    generator, draft: Draft | None, emit: Callable[[int, list[int]], None]) -> list[_Row]:
    """One batch of prompts through one session of the big model (and one of the draft).

    Both sessions see the same columns after the prompt: each round appends the pending token x and the
    drafted d1..dk; the big model checks them in one step. Positions that no row kept are rolled back
    (`ChainSession.rollback`: node sessions, spilled caches and the failover record forget them); in a
    batch, a row that kept fewer than another is left with holes, mask 0, which attention skips and alibi
    does not count (exactly like left padding), so every row sees only its own accepted tokens. Without a
    draft every round is k = 0: one new position per pass, the plain decoding loop.
    """
    B, greedy = len(rows), s.temperature == 0
    state = [_Row() for _ in rows]
    batch = hidden_batch(ends, rows, soft_prompt)
    most = draft.tokens if draft is not None else 0
    room = s.max_new_tokens * (most + 1 if B > 1 else 1) + most  # new positions a session may ever hold
    tail_ids = torch.empty(B, 0, dtype=torch.long)  # the columns after the prompt, shared by both models
    tail_mask = torch.empty(B, 0, dtype=torch.long)
    ones = torch.ones(B, 1, dtype=torch.long)

    def take(j: int, tokens: list[int], drafted: int) -> None:
        row = state[j]
        row.passes += 1
        for n, token in enumerate(tokens):
            if token == ends.eos_token_id:
                row.done, row.reason = True, "eos"
                return
            row.ids.append(token)
            row.accepted += n < drafted
            emit(j, [token])
            if len(row.ids) >= s.max_new_tokens:
                row.done = True
                return

    with contextlib.ExitStack() as stack:
        target = stack.enter_context(chain.open_session(B, batch.mask.shape[1] + room))
        with torch.no_grad():
            hidden = target.step(batch.hidden, batch.mask)
            x = pick_tokens(ends.logits(ends.final_norm(hidden[:, -1])), s, generator)
        for j in range(B):
            take(j, [int(x[j])], 0)
        if draft is not None:
            draft_batch = hidden_batch(draft.ends, rows)  # the soft prompt is the big model's alone
            draft_session = stack.enter_context(draft.chain.open_session(B, draft_batch.mask.shape[1] + room))
            draft_fed = -1  # tail columns the draft has seen (-1: not even the prompt yet)
            length = DraftLength(draft.tokens, draft.adaptive)
        while not all(row.done for row in state):
            active = [j for j in range(B) if not state[j].done]
            k = length.choose(max(s.max_new_tokens - len(state[j].ids) for j in active)) if draft else 0
            tail_ids, tail_mask = torch.cat([tail_ids, x[:, None]], 1), torch.cat([tail_mask, ones], 1)
            base = tail_ids.shape[1] - 1  # x's column
            drafted, q = [], []
            with Stopwatch() as draft_time, torch.no_grad():
                for _ in range(k):
                    new = draft.ends.embed_norm(draft.ends.embed(tail_ids[:, max(draft_fed, 0):]))
                    if draft_fed < 0:
                        new = torch.cat([draft_batch.hidden, new], 1)
                    h = draft_session.step(new, torch.cat([draft_batch.mask, tail_mask], 1))
                    draft_fed = tail_ids.shape[1]
                    logits = draft.ends.logits(draft.ends.final_norm(h[:, -1]))
                    if greedy:
                        d = logits.argmax(dim=-1)
                    else:
                        q.append(probabilities(logits, s))
                        d = torch.multinomial(q[-1], 1, generator=generator).squeeze(1)
                    drafted.append(d)
                    tail_ids, tail_mask = torch.cat([tail_ids, d[:, None]], 1), torch.cat([tail_mask, ones], 1)
            with Stopwatch() as pass_time, torch.no_grad():
                new = ends.embed_norm(ends.embed(tail_ids[:, base:]))  # x, d1..dk
                h = target.step(new, torch.cat([batch.mask, tail_mask], 1))
                logits = ends.logits(ends.final_norm(h.reshape(B * (k + 1), -1))).view(B, k + 1, -1)
            probs = None if greedy else probabilities(logits.view(B * (k + 1), -1), s).view(B, k + 1, -1)
            drafts = torch.stack(drafted, 1) if drafted else torch.empty(B, 0, dtype=torch.long)
            kept, y = [0] * B, x.clone()
            for j in active:
                kept[j], token = accept(None if greedy else probs[j], [qi[j] for qi in q] if q else None,
                                        logits[j], drafts[j], generator)
                y[j] = token
                state[j].drafted += k
                take(j, drafts[j, :kept[j]].tolist() + [token], kept[j])
            # keep x, d1..dA (A: the most any row kept); the rest is rolled back, the shortfall left as holes
            most_kept = max(kept[j] for j in active)
            cut = k - most_kept
            if cut:
                target.rollback(cut)
                tail_ids, tail_mask = tail_ids[:, :-cut], tail_mask[:, :-cut]
                if draft_fed > tail_ids.shape[1]:
                    draft_session.rollback(draft_fed - tail_ids.shape[1])
                    draft_fed = tail_ids.shape[1]
            tail_mask = tail_mask.clone()
            for j in active:
                tail_mask[j, base + 1 + kept[j]: base + 1 + most_kept] = 0
            x = y
            if draft is not None:
                length.record(k, [kept[j] for j in active], pass_time.seconds, draft_time.seconds)
    return state
