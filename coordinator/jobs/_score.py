"""The jobs, written once against `Chain`: score continuations (generation is `_generate`).

Both run identically over the local streaming chain and the remote chain of nodes. Inputs are
left-padded (so every row's last position is its newest token) and sorted by length into batches that
fit the chain's limits; a soft prompt, when given, sits between the padding and the tokens.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from slowllm.coordinator.chains._chain import Batch, Chain, plan_batches
from slowllm.protocol import InputError

from ._ends import ModelEnds


STREAM_LINES_S = 1.0  # the longest a job that streams its lines holds finished ones back


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


def score(ends: ModelEnds, chain: Chain, requests: Sequence[dict], soft_prompt: torch.Tensor | None = None,
          on_line: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Log-likelihood of each continuation given its context (lm-evaluation-harness conventions).

    Context and continuation are tokenized separately and concatenated; an empty context is replaced
    by the end-of-text token, as the harness does. All lines go through the chain in one pass.
    `on_line(i, result)` is called as soon as line i's numbers are in (lines complete as their batches do).
    """
    items: list[_Item] = []
    for line, req in enumerate(requests, start=1):
        conts = parse_score_request(req, line)
        ctx = ends.encode_prompt(req["context"], empty=ends.eos_token_id)
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
    lengths = [len(items[i].inputs) + p for i in fits]
    # (on a chain of several nodes, cut into micro-batches that keep every node busy: `Chain.batch_tokens`)
    batches = [[fits[j] for j in group] for group in
               plan_batches(lengths, chain.batch_tokens(lengths), chain.max_batch_rows)]

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
    by_line: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_line.setdefault(it.line, []).append(i)
    left = {line: len(mine) for line, mine in by_line.items()}  # items of each line not computed yet

    def line_result(line: int) -> dict:
        mine = by_line[line]
        if items[mine[0]].choice is None:
            return {"logprob": logprob[mine[0]], "is_greedy": greedy[mine[0]]}
        lps = [logprob[i] for i in mine]
        return {"logprobs": lps, "is_greedy": [greedy[i] for i in mine],
                "best": max(range(len(lps)), key=lps.__getitem__)}
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (item, hidden rows, targets)
    pending_tokens = 0

    flushed = [time.monotonic()]

    def flush() -> None:
        nonlocal pending, pending_tokens
        flushed[0] = time.monotonic()
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
            line = items[i].line
            left[line] -= 1
            if not left[line] and on_line is not None:
                on_line(line - 1, line_result(line))
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
        # Someone waits for lines as they come (a client that resumes elsewhere if this coordinator dies):
        # at least a flush a second, so a long job's finished lines are never all held back to its end.
        if on_line is not None and time.monotonic() - flushed[0] > STREAM_LINES_S:
            flush()
    flush()

    return [line_result(line) for line in range(1, len(requests) + 1)]
