"""A model's ends plus a chain: the jobs as methods, for the CLI, the client library and the coordinator."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from slowllm.coordinator.chains._chain import Chain
from slowllm.node import Checkpoint, default_max_ram, parse_size
from slowllm.node.engine._memory import default_dtype
from slowllm.node.kernels import kernels
from slowllm.protocol import InputError

from ._detokenize import Detokenizer
from ._ends import ModelEnds
from ._generate import generate
from ._options import Sampling, TuneOptions
from ._score import score
from ._softprompt import load_soft_prompt, save_soft_prompt
from ._speculative import Draft, check_draft_tokens, load_draft
from ._tune import tune

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TextStream:
    """Turns token ids arriving per prompt into printable text deltas (whole UTF-8 characters only), one
    `Detokenizer` per prompt."""

    def __init__(self, ends: ModelEnds, on_text: Callable[[int, str], None] | None = None,
                 before: list[list[int]] | None = None):
        self.ends, self.on_text = ends, on_text
        self.rows: dict[int, Detokenizer] = {}
        for i, ids in enumerate(before or []):  # a resumed job: its text goes on from what was already shown
            if ids:
                self.rows.setdefault(i, Detokenizer(self.ends)).push(ids)

    def push(self, i: int, ids: list[int]) -> str:
        """The text prompt i's new tokens complete (maybe none yet)."""
        return self.rows.setdefault(i, Detokenizer(self.ends)).push(ids)

    def __call__(self, i: int, ids: list[int]) -> None:
        text = self.push(i, ids)
        if text:
            self.on_text(i, text)

    def finish(self) -> None:
        """The generation ended: what each prompt still holds back (a character cut by the last token is
        printed as U+FFFD, as --json shows it, rather than dropped)."""
        for i, row in self.rows.items():
            text = row.flush()
            if text:
                self.on_text(i, text)


class Runner:
    def __init__(self, checkpoint: Checkpoint, ends: ModelEnds, chain: Chain, draft: Draft | None = None):
        self.checkpoint, self.ends, self.chain, self.draft = checkpoint, ends, chain, draft
        self.fingerprint = checkpoint.fingerprint()

    def pick_draft(self, use: bool | None = None, tokens: int | None = None) -> Draft | None:
        """The draft for one job: on by default when there is one; `use=True` without one is an error."""
        if use is False:
            return None
        if self.draft is None:
            if use:
                raise InputError("there is no draft model here: start with --draft-model MODEL "
                                 "(slowllm-coordinator --draft-model, or slowllm generate --local --draft-model).")
            if tokens is not None:
                check_draft_tokens(tokens)
            return None
        return self.draft.with_tokens(tokens)

    def soft_prompt(self, value: str | os.PathLike | torch.Tensor | None) -> torch.Tensor | None:
        if value is None or isinstance(value, torch.Tensor):
            return value
        return load_soft_prompt(value, self.fingerprint, self.checkpoint.hidden_size)

    def generate(self, prompts: list[str], sampling: Sampling, soft_prompt=None,
                 on_text: Callable[[int, str], None] | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None, draft: bool | None = None,
                 draft_tokens: int | None = None, resume: list[list[int]] | None = None,
                 rows: list[int] | None = None, on_finish: Callable[[int, str], None] | None = None) -> list[dict]:
        """`resume`/`rows`: a generation resumed from the tokens it had (see `_generate.generate`)."""
        text = TextStream(self.ends, on_text, resume) if on_text is not None else None
        results = generate(self.ends, self.chain, prompts, sampling, self.soft_prompt(soft_prompt), text or on_tokens,
                           draft=self.pick_draft(draft, draft_tokens), resume=resume, keys=rows, on_finish=on_finish)
        if text is not None:
            text.finish()
        return results

    def score(self, requests: list[dict], soft_prompt=None, on_line: Callable[[int, dict], None] | None = None) -> list[dict]:
        """`on_line(i, result)` as soon as line i's numbers are in (a client resumes from the rest)."""
        return score(self.ends, self.chain, requests, self.soft_prompt(soft_prompt), on_line=on_line)

    def tune(self, data: list[dict], options: TuneOptions, out: str | os.PathLike | None = None,
             on_step: Callable[[int, float], None] | None = None,
             on_prompt: Callable[[int, torch.Tensor], None] | None = None, prompt: torch.Tensor | None = None,
             first_step: int = 1) -> torch.Tensor:
        """`prompt`/`first_step`: tuning resumed from the prompt after step first_step - 1."""
        prompt = tune(self.ends, self.chain, data, options, on_step, prompt=prompt, on_prompt=on_prompt,
                      first_step=first_step)
        if out is not None:
            self.save_prompt(out, prompt)
        return prompt

    def save_prompt(self, out: str | os.PathLike, prompt: torch.Tensor) -> None:
        save_soft_prompt(out, prompt, self.fingerprint, self.checkpoint.model_id)

    def set_progress(self, on: bool) -> None:
        """Show or hide progress bars from now on (the CLI hides them once text streams to the terminal)."""
        self.chain.set_progress(on)

    def close(self) -> None:
        self.chain.close()
        if self.draft is not None:
            self.draft.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalRunner(Runner):
    """Everything in this process: the blocks streamed from disk within `max_ram`, or all kept in RAM."""

    def __init__(self, model: str | Path, *, dtype: str | torch.dtype | None = None, max_ram: str | int | None = None,
                 device: str = "cpu", spill_dir: str | None = None, progress: bool | None = None,
                 keep_in_ram: bool = False, draft_model: str | Path | None = None, draft_tokens: int = 4):
        # Local chains run transformers' blocks here: imported now, not when a coordinator (whose blocks run
        # on its nodes) or a client imports this module (~3 s on 2 cores).
        from slowllm.coordinator.chains._local import LocalChain, ResidentChain, plan_memory

        checkpoint = Checkpoint(model)
        if device == "cpu":  # built and measured (~1-2 s, 0.3-0.9 GB for a moment) before the memory plan
            kernels()  # reads this process's size, not inside the first pass, when blocks fill the budget
        if dtype is None:  # bf16 and int8 checkpoints run in bf16 where it is fast; fp32 ones stay exact
            dtype = default_dtype(checkpoint.storage_dtype(), device, checkpoint.int8)[0] if device == "cpu" else "float32"
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        budget = default_max_ram() if max_ram is None else (max_ram if isinstance(max_ram, int) else parse_size(max_ram))
        draft = None
        if draft_model is not None:  # loaded first: the memory plan then counts it as already used
            draft = load_draft(str(draft_model), checkpoint, dtype=torch_dtype, device=device, tokens=draft_tokens)
        self.plan = plan_memory(checkpoint, torch_dtype, budget, device=device)
        ends = ModelEnds(checkpoint, dtype=torch_dtype, resident_embedding=self.plan.resident_embedding,
                         head_chunk_bytes=self.plan.head_chunk_bytes)
        if keep_in_ram:
            chain = ResidentChain(checkpoint, dtype=torch_dtype, device=device)
        else:
            chain = LocalChain(checkpoint, self.plan, dtype=torch_dtype, device=device, spill_dir=spill_dir,
                               progress=progress)
        super().__init__(checkpoint, ends, chain, draft)
