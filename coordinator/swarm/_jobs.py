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
from slowllm.coordinator.jobs._runner import Runner
from slowllm.coordinator.jobs._softprompt import check_soft_prompt
from slowllm.protocol import InputError, Job, decode_tensor, encode_tensor
from slowllm.protocol._jobs import (GenerateJob, GenerateResult, ScoreJob, ScoreResult, SoftPromptParam, StepEvent,
                                    TextEvent, TuneJob, TuneResult, job_spec)

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
            if isinstance(spec, ScoreJob):
                soft = self._soft_prompt(spec.soft_prompt)
                return ScoreResult(results=runner.score(spec.requests, soft_prompt=soft)).model_dump()
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
        results = runner.generate(spec.prompts, sampling, soft_prompt=self._soft_prompt(spec.soft_prompt),
                                  on_text=lambda i, text: emit(TextEvent(prompt=i, text=text).model_dump()),
                                  draft=spec.draft, draft_tokens=spec.draft_tokens)
        return GenerateResult(results=results).model_dump()

    def _tune(self, spec: TuneJob, runner, emit) -> dict:
        options = TuneOptions(**spec.model_dump(include={"prompt_tokens", "steps", "lr", "batch_size", "seed"},
                                                exclude_none=True))
        options.check()
        if spec.send_prompt:  # the client saves every N steps, and the latest on Ctrl-C
            prompts: dict = {}
            prompt = runner.tune(spec.data, options, on_prompt=lambda step, t: prompts.update({step: t}),
                                 on_step=lambda step, loss: emit(StepEvent(
                                     step=step, loss=loss, prompt=encode_tensor(prompts.pop(step)),
                                     fingerprint=self.fingerprint).model_dump(exclude_none=True)))
        else:
            prompt = runner.tune(spec.data, options,
                                 on_step=lambda step, loss: emit(StepEvent(step=step, loss=loss).model_dump(
                                     exclude_none=True)))
        return TuneResult(prompt=encode_tensor(prompt), fingerprint=self.fingerprint).model_dump()

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
