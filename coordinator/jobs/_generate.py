"""Generation, written once against `Chain`: plain decoding and speculative decoding are one loop.

`generate_rows` continues token sequences (`Continuation`: each with its own limit, stop test and the
log-probabilities the caller wants, for the HTTP API); `generate` is the text front of it that the CLI,
the client and the coordinator's jobs use. Prompts are left-padded (every row's last position is its
newest token) and batched by length within the chain's limits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from slowllm.coordinator.chains._chain import Chain, Head, plan_batches

from ._ends import ModelEnds
from ._options import Sampling
from ._sampling import Draws, argmax_rows, pick_tokens
from ._sampling import probabilities  # noqa: F401 (the tests' oracle uses it)
from ._score import hidden_batch
from ._speculative import Draft, DraftLength, Stopwatch, accept


@dataclass
class Continuation:
    """One token sequence to continue, and what the caller wants to know about it."""

    ids: list[int]
    max_new_tokens: int  # 0: only the prompt pass (for `prompt_logprobs`)
    logprobs: int | None = None  # each new token's log-probability and the N likeliest (None: not wanted)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens, from the prompt pass
    stop: Callable[[list[int]], bool] | None = None  # after each token: True ends the row ("stop")
    on_token: Callable[[int, tuple | None], None] | None = None  # each new token and its logprobs, as it comes
    on_finish: Callable[[str], None] | None = None  # once the row ends: "eos", "length" or "stop"
    key: int = 0  # the row's index in its job: seeded sampling draws by (seed, key, position)
    done_before: int = 0  # tokens generated before (a resumed job): positions count on from there


@dataclass
class _Row:
    """One row's generation: its tokens so far and what the results report."""

    want: Continuation
    ids: list[int] = field(default_factory=list)
    done: bool = False
    reason: str = "length"
    passes: int = 0  # passes over the big model that produced its tokens
    accepted: int = 0  # drafted tokens kept
    drafted: int = 0  # drafted tokens checked
    logprobs: list = field(default_factory=list)  # per new token: (logprob, [(id, logprob), ...])
    prompt_logprobs: list = field(default_factory=list)  # per prompt token: None for the first, then as above

    @property
    def position(self) -> int:
        """The index of this row's next token among all it generated (a resumed job's included)."""
        return self.want.done_before + len(self.ids)

    def finish(self, reason: str) -> None:
        self.done, self.reason = True, reason
        if self.want.on_finish:
            self.want.on_finish(reason)

    def take(self, ends: ModelEnds, tokens: list[int], drafted: int, logits: torch.Tensor) -> None:
        """This row's tokens of a pass (its accepted drafts, then its own); logits[n] chose tokens[n]."""
        self.passes += 1
        n_top = self.want.logprobs
        if n_top is not None:
            lp, tops = _top(logits[: len(tokens)], n_top)
        for n, token in enumerate(tokens):
            if token in ends.stop_token_ids:
                self.finish("eos")
                return
            self.ids.append(token)
            self.accepted += n < drafted
            if n_top is not None:
                self.logprobs.append((lp[n, token].item(), tops[n]))
            if self.want.on_token:
                self.want.on_token(token, self.logprobs[-1] if n_top is not None else None)
            if len(self.ids) >= self.want.max_new_tokens:
                self.finish("length")
                return
            if self.want.stop and self.want.stop(self.ids):
                self.finish("stop")
                return

    def after_prompt(self, ends: ModelEnds, hidden: torch.Tensor, token: int, logits: torch.Tensor) -> None:
        """The prompt pass's output for this row (`hidden` [T, H]): prompt logprobs if asked, its first token."""
        if self.want.prompt_logprobs is not None:  # position t predicts token t+1 of the row
            ids, width = self.want.ids, hidden.shape[0]
            normed = ends.final_norm(hidden[width - len(ids): width - 1])
            self.prompt_logprobs = [None] + ends.token_logprobs(normed, torch.tensor(ids[1:]),
                                                                self.want.prompt_logprobs)
        if self.want.max_new_tokens < 1:
            self.finish("length")
        else:
            self.take(ends, [token], 0, logits)


def generate(ends: ModelEnds, chain: Chain, prompts: Sequence[str], sampling: Sampling,
             soft_prompt: torch.Tensor | None = None,
             on_tokens: Callable[[int, list[int]], None] | None = None, draft: Draft | None = None,
             resume: Sequence[Sequence[int]] | None = None, keys: Sequence[int] | None = None,
             on_finish: Callable[[int, str], None] | None = None) -> list[dict]:
    """Generate for several prompts together: one pass over the blocks advances every prompt.

    Stops a prompt at EOS (not included in the output) or at `max_new_tokens`. `on_tokens(i, ids)` is
    called as tokens arrive (for streaming clients), `on_finish(i, reason)` when a prompt ends. With a
    `draft`, each pass checks the tokens the draft proposed and may advance a prompt by several tokens
    (see `_speculative`); the output is the same. `resume` (a job resumed on another coordinator): per
    prompt the tokens generated before, which the rows go on from (`keys`: each prompt's index in the
    original job, which seeded sampling draws by); the results then hold every token.
    """
    sampling.check()
    resume = [list(r) for r in resume] if resume is not None else [[] for _ in prompts]
    keys = list(keys) if keys is not None else list(range(len(prompts)))
    rows = [Continuation(ends.encode_prompt(p) + before, sampling.max_new_tokens - len(before), key=keys[i],
                         done_before=len(before),
                         on_token=(lambda t, entry, i=i: on_tokens(i, [t])) if on_tokens else None,
                         on_finish=(lambda reason, i=i: on_finish(i, reason)) if on_finish else None)
            for i, (p, before) in enumerate(zip(prompts, resume))]
    results = generate_rows(ends, chain, rows, sampling, soft_prompt, draft)
    for prompt, before, r in zip(prompts, resume, results):
        r["prompt"] = prompt
        if before:
            r["token_ids"] = before + r["token_ids"]
            r["text"] = ends.decode(r["token_ids"])
        for key in ("logprobs", "prompt_logprobs"):
            r.pop(key, None)
    return results


def generate_rows(ends: ModelEnds, chain: Chain, rows: Sequence[Continuation], sampling: Sampling,
                  soft_prompt: torch.Tensor | None = None, draft: Draft | None = None) -> list[dict]:
    """Continue every row (`sampling.max_new_tokens` is ignored: each row has its own limit).

    Returns per row {"token_ids", "text", "finish_reason": "eos" | "length" | "stop", and "logprobs" /
    "prompt_logprobs" when asked, and with a draft "target_passes", "accepted", "drafted"}.
    """
    job = Generation(ends, chain, rows, sampling, soft_prompt, draft)
    try:
        with chain.stepping():
            while not job.done:
                step_together(chain, [job])
    finally:
        job.close()  # after an error: the groups' sessions are closed now, not when collected
    return job.results()


class Generation:
    """The rows of one request (or job), batched by length into groups that each hold a session.

    Each group is a generator that yields the big-model steps it needs, `(session, hidden, mask, head)`, and
    is sent their outputs and logits: `step_together` runs the pending steps of any number of generations in
    ONE pass over the weights (and their LM heads in as few calls as leave every row's numbers alone),
    which is how requests that arrive while others generate join the next pass (the HTTP API's batcher),
    and how a job's groups share passes.
    """

    def __init__(self, ends: ModelEnds, chain: Chain, rows: Sequence[Continuation], sampling: Sampling,
                 soft_prompt: torch.Tensor | None = None, draft: Draft | None = None):
        self.ends, self.rows, self.draft = ends, list(rows), draft
        draws = Draws(sampling.seed)
        p = 0 if soft_prompt is None else soft_prompt.shape[0]
        most = draft.tokens if draft is not None else 0
        self.groups = plan_batches([len(r.ids) + p + r.max_new_tokens + most for r in rows],
                                   chain.max_batch_tokens, chain.max_batch_rows)
        self.running: dict[int, object] = {}  # group index -> its generator
        self.pending: dict[int, tuple] = {}  # group index -> the step it waits for
        self.finished: dict[int, list[_Row]] = {}
        for g, group in enumerate(sorted(self.groups)):
            gen = _generate_group(ends, chain, [rows[i] for i in group], sampling, soft_prompt, draws, draft)
            self.running[g] = gen
            self._advance(g, None, first=True)
        self.groups = sorted(self.groups)

    @property
    def done(self) -> bool:
        return not self.running

    def _advance(self, g: int, out, first: bool = False) -> None:
        try:
            self.pending[g] = next(self.running[g]) if first else self.running[g].send(out)
        except StopIteration as stop:
            self.finished[g] = stop.value
            del self.running[g]
            self.pending.pop(g, None)

    def close(self) -> None:
        """Stop every group now (their sessions are closed)."""
        for gen in self.running.values():
            gen.close()
        self.running.clear()
        self.pending.clear()

    def results(self) -> list[dict]:
        results: list[dict] = [{} for _ in self.rows]
        for g, group in enumerate(self.groups):
            for row, i in zip(self.finished[g], group):
                r = results[i] = {"text": self.ends.decode(row.ids), "token_ids": row.ids, "finish_reason": row.reason}
                if row.want.logprobs is not None:
                    r["logprobs"] = row.logprobs
                if row.want.prompt_logprobs is not None:
                    r["prompt_logprobs"] = row.prompt_logprobs
                if self.draft is not None:
                    r.update(target_passes=row.passes, accepted=row.accepted, drafted=row.drafted)
        return results


def step_together(chain: Chain, jobs: Sequence[Generation]) -> None:
    """One pass over the big model for the pending step of every group of every job."""
    waiting = [(job, g) for job in jobs for g in list(job.pending)]
    if not waiting:
        return
    pending = [job.pending[g] for job, g in waiting]
    with torch.no_grad():
        outs = chain.step_sessions([p[:3] for p in pending], heads=[p[3] for p in pending])
    for (job, g), out in zip(waiting, outs):
        job._advance(g, out)


def _top(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, list[list[tuple[int, float]]]]:
    """Log-softmax of logits [N, V], and each row's n likeliest (id, logprob)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(lp, n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    return lp, [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]


@torch.no_grad()
def _draft(draft: Draft, session, batch, tail_ids, tail_mask, fed: int, k: int, s: Sampling, draws: Draws,
           where: list[tuple[int, int]], drafted: list, q: list):
    """k tokens from the draft model, appended to the shared columns after the prompt (`drafted`: each
    round's tokens; `q`: their probabilities when sampling; `where`: each row's key and the position of
    its first drafted token). Returns (tail_ids, tail_mask, columns fed)."""
    ones = torch.ones(tail_ids.shape[0], 1, dtype=torch.long)
    for _ in range(k):
        new = draft.ends.embed_norm(draft.ends.embed(tail_ids[:, max(fed, 0):]))
        if fed < 0:  # its first step: the prompt too
            new = torch.cat([batch.hidden, new], 1)
        h = session.step(new, torch.cat([batch.mask, tail_mask], 1))
        fed = tail_ids.shape[1]
        logits = draft.ends.logits(draft.ends.final_norm(h[:, -1]))
        if s.temperature == 0:
            d = argmax_rows(logits)
        else:
            q.append(probabilities(logits, s))
            n = len(drafted)
            d = torch.tensor([draws.sample(q[-1][j], row, at + n, "draft") for j, (row, at) in enumerate(where)])
        drafted.append(d)
        tail_ids, tail_mask = torch.cat([tail_ids, d[:, None]], 1), torch.cat([tail_mask, ones], 1)
    return tail_ids, tail_mask, fed


def _generate_group(ends: ModelEnds, chain: Chain, rows: list[Continuation], s: Sampling, soft_prompt,
                    draws: Draws, draft: Draft | None):
    """One batch of prompts through one session of the big model (and one of the draft): a generator that
    yields each step of the big model, (session, hidden, mask, head), is sent its output and the logits the
    head asked for, and returns the rows.

    Both sessions see the same columns after the prompt: each round appends the pending token x and the
    drafted d1..dk; the big model checks them in one step. Positions that no row kept are rolled back
    (`ChainSession.rollback`: node sessions, spilled caches and the failover record forget them); in a
    batch, a row that kept fewer than another is left with holes, mask 0, which attention skips and alibi
    does not count (exactly like left padding), so every row sees only its own accepted tokens. Without a
    draft every round is k = 0: one new position per pass, the plain decoding loop.
    """
    B, greedy = len(rows), s.temperature == 0
    state = [_Row(r) for r in rows]
    batch = hidden_batch(ends, [r.ids for r in rows], soft_prompt)
    most = draft.tokens if draft is not None else 0
    longest = max(r.max_new_tokens for r in rows)
    room = longest * (most + 1 if B > 1 else 1) + most  # new positions a session may ever hold
    tail_ids = torch.empty(B, 0, dtype=torch.long)  # the columns after the prompt, shared by both models
    tail_mask = torch.empty(B, 0, dtype=torch.long)
    ones = torch.ones(B, 1, dtype=torch.long)

    with contextlib.ExitStack() as stack:
        target = stack.enter_context(chain.open_session(B, batch.mask.shape[1] + room))
        hidden, logits = yield (target, batch.hidden, batch.mask, Head(ends, last=True))
        with torch.no_grad():
            x = pick_tokens(logits, s, draws, [(r.want.key, r.position) for r in state])
        for j, row in enumerate(state):
            row.after_prompt(ends, hidden[j], int(x[j]), logits[j:j + 1])
        del hidden
        if draft is not None and not all(row.done for row in state):
            draft_batch = hidden_batch(draft.ends, [r.ids for r in rows])  # the soft prompt is the big model's alone
            draft_session = stack.enter_context(draft.chain.open_session(B, draft_batch.mask.shape[1] + room))
            draft_fed = -1  # tail columns the draft has seen (-1: not even the prompt yet)
            length = DraftLength(draft.tokens, draft.adaptive)
        while not all(row.done for row in state):
            active = [j for j in range(B) if not state[j].done]
            remaining = max(state[j].want.max_new_tokens - len(state[j].ids) for j in active)
            k = length.choose(remaining) if draft else 0
            tail_ids, tail_mask = torch.cat([tail_ids, x[:, None]], 1), torch.cat([tail_mask, ones], 1)
            base = tail_ids.shape[1] - 1  # x's column
            drafted, q = [], []
            with Stopwatch() as draft_time:
                if k:
                    tail_ids, tail_mask, draft_fed = _draft(draft, draft_session, draft_batch, tail_ids, tail_mask,
                                                            draft_fed, k, s, draws,
                                                            [(r.want.key, r.position) for r in state], drafted, q)
            with Stopwatch() as pass_time:
                with torch.no_grad():
                    new = ends.embed_norm(ends.embed(tail_ids[:, base:]))  # x, d1..dk
                _, logits = yield (target, new, torch.cat([batch.mask, tail_mask], 1), Head(ends))
                logits = logits.view(B, k + 1, -1)
            probs = None if greedy else probabilities(logits.view(B * (k + 1), -1), s).view(B, k + 1, -1)
            # greedy: every row's argmax in one call (8 rows of Bloom's vocabulary, one call a row: ~0.5 ms
            # more a step); each row's indices are its own
            best = argmax_rows(logits) if greedy else None
            drafts = torch.stack(drafted, 1) if drafted else torch.empty(B, 0, dtype=torch.long)
            kept, y = [0] * B, x.clone()
            for j in active:
                kept[j], token = accept(None if greedy else probs[j], [qi[j] for qi in q] if q else None,
                                        logits[j], drafts[j], draws, state[j].want.key, state[j].position,
                                        None if best is None else best[j])
                y[j] = token
                state[j].drafted += k
                state[j].take(ends, drafts[j, :kept[j]].tolist() + [token], kept[j], logits[j])
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
