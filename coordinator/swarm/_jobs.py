"""The coordinator's jobs, each in a worker thread: a client's typed job (`protocol/_jobs.py`) run by the
jobs' own code (`jobs/`) over a `RemoteChain` of this swarm's nodes, its progress streamed as events.

`CoordinatorJobs` is the half of `Coordinator` that runs there (mixed in: it reads the coordinator's
router, limits, referee, stepper, model ends and draft).
"""

from __future__ import annotations

import hashlib
import threading
import time

import torch

from slowllm.coordinator.chains._remote import RemoteChain
from slowllm.coordinator.jobs._options import Sampling, TuneOptions
from slowllm.coordinator.jobs._runner import Runner, TextStream
from slowllm.coordinator.jobs._softprompt import check_soft_prompt
from slowllm.protocol import InputError, Job, decode_tensor, encode_tensor
from slowllm.protocol._jobs import (GenerateJob, GenerateResult, LineEvent, ScoreJob, ScoreResult, SoftPromptParam,
                                    StepEvent, TextEvent, TuneJob, TuneResult, job_spec)

from ._router import TrackedJob


class CoordinatorJobs:
    """What runs in the coordinator's job threads (`Coordinator` mixes it in)."""

    def _job_in_thread(self, job: Job, emit, cancel: threading.Event, client: str = "") -> dict:
        spec = job_spec(job.job, job.params)  # typed, or one sentence naming the wrong parameter
        chain = RemoteChain(self.router, self.limits, self.checkpoint.hidden_size, compression=spec.compression,
                            notify=lambda text: emit({"notice": text}), cancel=cancel, referee=self.referee,
                            job=job_tag(client), stepper=self.stepper)
        runner = Runner(self.checkpoint, self.ends, chain, self.draft)
        tracked = TrackedJob(next(self._job_numbers), client, job.job, chain, lambda text: emit({"notice": text}))
        self.router.track(tracked)
        try:
            if isinstance(spec, GenerateJob):
                return self._generate(spec, runner, emit)
            if isinstance(spec, ScoreJob):  # each line as soon as it is in: a client resumes from the rest
                soft = self._soft_prompt(spec.soft_prompt)
                results = runner.score(spec.requests, soft_prompt=soft, on_line=lambda i, r: emit(
                    LineEvent(line=i, result=r).model_dump()))
                return ScoreResult(results=results).model_dump()
            return self._tune(spec, runner, emit)
        finally:
            tracked.ended = time.time()

    def _generate(self, spec: GenerateJob, runner, emit) -> dict:
        sampling = Sampling(**spec.model_dump(include={"max_new_tokens", "temperature", "top_k", "top_p", "seed"},
                                              exclude_none=True))
        sampling.check()
        if sampling.max_new_tokens > self.max_new_tokens:
            raise InputError(f"max_new_tokens {sampling.max_new_tokens} exceeds this coordinator's limit of "
                             f"{self.max_new_tokens} (--max-new-tokens): ask for fewer.")
        resume, rows = spec.resume, spec.rows
        n = len(spec.prompts)
        if resume is not None and (len(resume) != n or any(len(r) > sampling.max_new_tokens for r in resume)
                                   or any(not 0 <= x < self.ends.vocab_size for r in resume for x in r)):
            raise InputError(f"resume must hold, for each of the {n} prompts, at most max_new_tokens token ids "
                             "of this model's vocabulary.")
        if rows is not None and len(rows) != n:
            raise InputError(f"rows must give each of the {n} prompts its index in the original job.")
        # Each token as it comes, with the text it completes: a client that loses this coordinator resumes
        # the job on another from exactly these tokens (and knows which prompts had finished).
        text = TextStream(self.ends, before=resume)
        results = runner.generate(spec.prompts, sampling, soft_prompt=self._soft_prompt(spec.soft_prompt),
                                  on_tokens=lambda i, ids: emit(TextEvent(prompt=i, text=text.push(i, ids),
                                                                          token_ids=ids).model_dump()),
                                  on_finish=lambda i, reason: emit(TextEvent(prompt=i, finish_reason=reason).model_dump()),
                                  draft=spec.draft, draft_tokens=spec.draft_tokens, resume=resume, rows=rows)
        text.on_text = lambda i, piece: emit(TextEvent(prompt=i, text=piece).model_dump())
        text.finish()  # what each prompt's detokenizer still held back (a character cut by the last token)
        return GenerateResult(results=results).model_dump()

    def _tune(self, spec: TuneJob, runner, emit) -> dict:
        options = TuneOptions(**spec.model_dump(include={"prompt_tokens", "steps", "lr", "batch_size", "seed"},
                                                exclude_none=True))
        options.check()
        start, first_step = self._resumed_prompt(spec, options)
        if spec.send_prompt:  # the client saves every N steps, and the latest on Ctrl-C (and resumes from it)
            prompts: dict = {}
            prompt = runner.tune(spec.data, options, on_prompt=lambda step, t: prompts.update({step: t}),
                                 on_step=lambda step, loss: emit(StepEvent(
                                     step=step, loss=loss, prompt=encode_tensor(prompts.pop(step)),
                                     fingerprint=self.fingerprint).model_dump(exclude_none=True)),
                                 prompt=start, first_step=first_step)
        else:
            prompt = runner.tune(spec.data, options,
                                 on_step=lambda step, loss: emit(StepEvent(step=step, loss=loss).model_dump(
                                     exclude_none=True)), prompt=start, first_step=first_step)
        return TuneResult(prompt=encode_tensor(prompt), fingerprint=self.fingerprint).model_dump()

    def _resumed_prompt(self, spec: TuneJob, options: TuneOptions) -> tuple[torch.Tensor | None, int]:
        """A tuning job resumed on this coordinator: the prompt it goes on from, and its first step."""
        if spec.init_prompt is None:
            if spec.first_step not in (None, 1):
                raise InputError("first_step needs the init_prompt to go on from.")
            return None, 1
        try:
            prompt = decode_tensor(spec.init_prompt, self.limits)
        except Exception:
            raise InputError("init_prompt tensor is malformed.") from None
        want = (options.prompt_tokens, self.checkpoint.hidden_size)
        if tuple(prompt.shape) != want or not prompt.is_floating_point() or not torch.isfinite(prompt).all():
            raise InputError(f"init_prompt must be {want[0]} x {want[1]} finite numbers (prompt_tokens x this "
                             "model's hidden size).")
        first = spec.first_step or 1
        if not 1 <= first <= options.steps + 1:
            raise InputError(f"first_step must be between 1 and steps + 1 ({options.steps + 1}).")
        return prompt.float(), first

    def _soft_prompt(self, value: SoftPromptParam | None) -> torch.Tensor | None:
        if value is None:
            return None
        try:
            tensor = decode_tensor(value.tensor, self.limits)
        except Exception:
            raise InputError("soft_prompt tensor is malformed.") from None
        return check_soft_prompt(tensor, value.meta, self.fingerprint, self.checkpoint.hidden_size,
                                 str(value.meta.get("source", "")))


def job_tag(client: str) -> str:
    """What nodes see of a job's client: an opaque tag (they share passes round robin between tags), from
    which they learn neither its name nor its address."""
    return hashlib.blake2b(client.encode(), digest_size=8, person=b"slowllm-job").hexdigest()
