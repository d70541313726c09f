"""What a client keeps of a running job so that another coordinator can finish it.

Each job streams what it has done: generation its tokens and which prompts ended, scoring each line as
soon as it is in, tuning the prompt after every step. When the client's coordinator goes away mid-job, the
job's state says what is left (`rest()`), and the client sends that to another coordinator:
- generation goes on from the tokens received (the prompt plus the streamed tokens; the new coordinator
  rebuilds the KV caches with one prefill). Greedy output is identical, and seeded sampling too: its
  numbers are a function of (seed, row, position), and each prompt keeps its row index (`rows`);
- scoring sends only the lines not yet answered;
- tuning goes on from the prompt after the last step it heard of (the same batches follow; Adam's
  moments start afresh, which the client says).
Nothing here runs a job twice to completion: the first coordinator cancels a job whose client went away.
"""

from __future__ import annotations

from typing import Callable

from slowllm.protocol._jobs import (GenerateJob, GenerateResult, LineEvent, ScoreJob, ScoreResult, StepEvent, TextEvent,
                                    TuneJob, TuneResult, job_spec)


class GenerateState:
    def __init__(self, spec: GenerateJob, on_text: Callable[[int, str], None] | None):
        self.spec, self.on_text = spec, on_text
        self.keys = list(spec.rows) if spec.rows is not None else list(range(len(spec.prompts)))
        n = len(spec.prompts)
        self.ids: list[list[int]] = [list(r) for r in spec.resume] if spec.resume else [[] for _ in range(n)]
        self.text: list[list[str]] = [[] for _ in range(n)]
        self.finished: list[str | None] = [None] * n
        self.sent = list(range(n))  # the prompts the current attempt runs, by its own index

    def on_event(self, data: dict) -> None:
        event = TextEvent.model_validate(data)
        if not 0 <= event.prompt < len(self.sent):
            return
        i = self.sent[event.prompt]
        self.ids[i] += event.token_ids
        if event.text:
            self.text[i].append(event.text)
            if self.on_text:
                self.on_text(i, event.text)
        if event.finish_reason:
            self.finished[i] = event.finish_reason

    def rest(self) -> GenerateJob | None:
        """The job's rest for another coordinator: the prompts not finished, from their tokens so far."""
        self.sent = [i for i, reason in enumerate(self.finished) if reason is None]
        if not self.sent:
            return None
        params = self.spec.model_dump(exclude={"job", "prompts", "resume", "rows"}, exclude_none=True)
        return job_spec("generate", {**params, "prompts": [self.spec.prompts[i] for i in self.sent],
                                     "resume": [self.ids[i] for i in self.sent],
                                     "rows": [self.keys[i] for i in self.sent]})

    def resumed_at(self) -> str:
        return f"from the tokens it had ({sum(map(len, self.ids))} in all)"

    def done(self, result: dict | None) -> list[dict]:
        rows = GenerateResult.model_validate(result).results if result is not None else []
        out: list[dict | None] = [None] * len(self.ids)
        for i, row in zip(self.sent, rows):
            out[i] = row.model_dump()
        for i, row in enumerate(out):
            if row is None:  # ended on a coordinator that went away before the job did
                out[i] = {"prompt": self.spec.prompts[i], "text": "".join(self.text[i]), "token_ids": self.ids[i],
                          "finish_reason": self.finished[i]}
        return out


class ScoreState:
    def __init__(self, spec: ScoreJob):
        self.spec = spec
        self.results: list[dict | None] = [None] * len(spec.requests)
        self.sent = list(range(len(spec.requests)))

    def on_event(self, data: dict) -> None:
        event = LineEvent.model_validate(data)
        if 0 <= event.line < len(self.sent):
            self.results[self.sent[event.line]] = event.result.model_dump()

    def rest(self) -> ScoreJob | None:
        self.sent = [i for i, r in enumerate(self.results) if r is None]
        if not self.sent:
            return None
        return self.spec.model_copy(update={"requests": [self.spec.requests[i] for i in self.sent]})

    def resumed_at(self) -> str:
        return f"with the {len(self.sent)} lines not yet answered"

    def done(self, result: dict | None) -> list[dict]:
        rows = ScoreResult.model_validate(result).results if result is not None else []
        for i, row in zip(self.sent, rows):
            self.results[i] = row.model_dump()
        return self.results


class TuneState:
    def __init__(self, spec: TuneJob, on_step, on_prompt):
        self.spec, self.on_step, self.on_prompt = spec, on_step, on_prompt
        self.last: StepEvent | None = None  # the last step heard of, with its prompt
        self.fingerprint: str | None = None

    def on_event(self, data: dict) -> None:
        event = StepEvent.model_validate(data)
        if event.prompt is not None:
            self.last = event
            self.fingerprint = (event.fingerprint or self.fingerprint or "")[:64] or None
            if self.on_prompt:
                self.on_prompt(event)
        if self.on_step:
            self.on_step(event.step, event.loss)

    def rest(self) -> TuneJob | None:
        if self.last is None:
            return self.spec
        return self.spec.model_copy(update={"init_prompt": self.last.prompt, "first_step": self.last.step + 1})

    def resumed_at(self) -> str:
        if self.last is None:
            return "from its start"
        return f"at step {self.last.step + 1} from the prompt after step {self.last.step} (Adam's moments start afresh)"

    def done(self, result: dict | None) -> TuneResult:
        if result is not None:
            return TuneResult.model_validate(result)
        return TuneResult(prompt=self.last.prompt, fingerprint=self.fingerprint or "")
