"""Soft-prompt tuning: the model stays frozen; only `prompt_tokens` input embeddings are trained.

One step: embed the batch with the prompt prepended (autograd records only the prompt and the embedding
layer norm), run the chain forward keeping each block's input, take the mean NLL of the continuation
tokens through the chunked LM head, send its gradient back through the chain (which recomputes each
block from its saved input), and finish the backward pass into the prompt. Adam updates the prompt
only after the whole step succeeded, so a failed step is never half-applied.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch

from slowllm.coordinator.chains._chain import Batch, Chain, plan_batches
from slowllm.protocol import InputError

from ._ends import ModelEnds
from ._options import TuneOptions
from ._score import inputs_embeds


def tokenize_examples(ends: ModelEnds, data: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    examples = []
    for line, obj in enumerate(data, start=1):
        if not (isinstance(obj, dict) and isinstance(obj.get("context"), str) and isinstance(obj.get("continuation"), str)):
            raise InputError(f"line {line}: tuning needs objects with string \"context\" and \"continuation\".")
        ctx, cont = ends.encode_prompt(obj["context"], empty=ends.eos_token_id), ends.encode(obj["continuation"])
        if not cont:
            raise InputError(f"line {line}: the continuation is empty; give it at least one character.")
        examples.append((ctx, cont))
    if not examples:
        raise InputError("the tuning data is empty: give at least one {\"context\", \"continuation\"} line.")
    return examples


def init_prompt(ends: ModelEnds, tokens: int, seed: int) -> torch.Tensor:
    """Start from the embeddings of random vocabulary tokens (a common, stable initialisation)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, ends.vocab_size, (tokens,), generator=g)
    return ends.embed(ids[None])[0].clone()


def loss_and_grad(ends: ModelEnds, chain: Chain, prompt: torch.Tensor,
                  batch: Sequence[tuple[list[int], list[int]]]) -> tuple[float, torch.Tensor]:
    """Mean continuation NLL for one batch and its gradient w.r.t. the prompt (model frozen).

    A batch too large for one request of the chain runs as several (rows grouped by length), and on a
    chain of several nodes as micro-batches in flight together (`Chain.pipelined`); their gradients add up,
    in order, to exactly the batch's, since the loss is a sum over tokens divided by their count.
    """
    prompt = prompt.detach().requires_grad_(True)
    rows = [(ctx + cont)[:-1] for ctx, cont in batch]
    total = sum(len(cont) for _, cont in batch)
    p = prompt.shape[0]
    lengths = [len(r) + p for r in rows]

    def one(group: list[int]) -> tuple[float, torch.Tensor]:
        embeds, mask = inputs_embeds(ends, [rows[i] for i in group], prompt)
        hidden0 = ends.embed_norm(embeds)
        out, tape = chain.forward_for_backward(Batch(hidden0.detach(), mask))
        out = out.detach().float().requires_grad_(True)
        width = out.shape[1]
        picked, targets = [], []
        for r, i in enumerate(group):
            cont = batch[i][1]
            picked.append(out[r, width - len(cont):])
            targets += cont
        normed = ends.final_norm(torch.cat(picked))
        loss = ends.nll(normed, torch.tensor(targets)).sum() / total
        (grad_out,) = torch.autograd.grad(loss, out)
        grad_in = chain.backward(tape, grad_out)
        (grad,) = torch.autograd.grad(hidden0, prompt, grad_in.float())  # (not .backward: threads, one leaf)
        return loss.item(), grad

    loss_sum, grad_sum = 0.0, torch.zeros_like(prompt)
    for loss, grad in chain.pipelined(one, plan_batches(lengths, chain.batch_tokens(lengths), chain.max_batch_rows)):
        loss_sum += loss
        grad_sum += grad
    return loss_sum, grad_sum


def tune(ends: ModelEnds, chain: Chain, data: Sequence[dict], options: TuneOptions,
         on_step: Callable[[int, float], None] | None = None, prompt: torch.Tensor | None = None,
         on_prompt: Callable[[int, torch.Tensor], None] | None = None, first_step: int = 1) -> torch.Tensor:
    """Train the prompt; `on_step(step, loss)` after each step, `on_prompt(step, prompt)` with a copy of it
    (for saving every N steps, and on Ctrl-C). `first_step` > 1 resumes a job from `prompt` (the prompt
    after step first_step - 1): the same batches follow, and Adam's moments start afresh."""
    options.check()
    examples = tokenize_examples(ends, data)
    for line, (ctx, cont) in enumerate(examples, start=1):
        if len(ctx) + len(cont) - 1 + options.prompt_tokens > chain.max_request_tokens:
            raise InputError(f"line {line}: {len(ctx) + len(cont)} tokens plus the prompt are more than one request "
                             f"can carry at this model's width ({chain.max_request_tokens} tokens): shorten the "
                             "example, or raise the coordinator's --max-message-size.")
    prompt = (init_prompt(ends, options.prompt_tokens, options.seed) if prompt is None else prompt.clone()).float()
    prompt = torch.nn.Parameter(prompt)
    optimizer = torch.optim.Adam([prompt], lr=options.lr)
    order = random.Random(options.seed)
    queue: list[int] = []
    for step in range(1, options.steps + 1):
        batch = []
        while len(batch) < min(options.batch_size, len(examples)):
            if not queue:
                queue = list(range(len(examples)))
                order.shuffle(queue)
            batch.append(examples[queue.pop()])
        if step < first_step:  # done before the resume: only its draw of the batch order is replayed
            continue
        loss, grad = loss_and_grad(ends, chain, prompt, batch)
        prompt.grad = grad
        optimizer.step()
        optimizer.zero_grad()
        if not math.isfinite(loss) or not torch.isfinite(prompt).all():
            raise InputError(f"tuning diverged at step {step} (the loss or the prompt became non-finite): use a "
                             f"smaller --lr than {options.lr}.")
        if on_prompt:  # first: once "step N" is shown, step N's prompt is what Ctrl-C saves
            on_prompt(step, prompt.detach().clone())
        if on_step:
            on_step(step, loss)
    return prompt.detach()
