"""Jobs as clients send them and as coordinators answer them: typed parameters and results.

A `Job` message carries `job` (its kind) and `params`; `job_spec` reads them into one model of the
discriminated union `JobSpec` (generate, score, tune, status), and every wrong name, type or value is one
sentence naming the parameter. Both ends use these models: the client builds its `params` from them and
reads results through `GenerateResult`, `ScoreResult` and `TuneResult`; the coordinator validates with
them before a job starts. Values a job must judge itself (a sampling option's range, a scoring line's
shape with its line number) stay with the job's own checks, which say more than a type can.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ._errors import InputError
from ._messages import WireTensor

Compression = Literal["raw", "fp16", "bf16", "int8"]


class _Params(BaseModel):
    # strict: a number is never a string or a bool on the wire; an unknown name is a mistake worth a sentence
    model_config = ConfigDict(strict=True, extra="forbid")


class SoftPromptParam(_Params):
    """A soft prompt sent with a job: the tensor, and the file's metadata (the model it was made for)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    tensor: WireTensor
    meta: dict[str, Any] = {}


class GenerateJob(_Params):
    job: Literal["generate"] = "generate"
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    draft: bool | None = None  # use the coordinator's draft model (None: whenever it has one)
    draft_tokens: int | None = None
    soft_prompt: SoftPromptParam | None = None
    compression: Compression = "raw"
    # A job resumed on another coordinator: per prompt the tokens it had generated (its rows go on from
    # there), and each prompt's index in the original job (seeded sampling draws by it).
    resume: list[list[int]] | None = None
    rows: list[int] | None = None


class ScoreJob(_Params):
    job: Literal["score"] = "score"
    # each line {context, continuation} or {context, choices}: checked by the job, which names the line
    requests: list[Any] = Field(min_length=1)
    soft_prompt: SoftPromptParam | None = None
    compression: Compression = "raw"


class TuneJob(_Params):
    job: Literal["tune"] = "tune"
    data: list[Any]  # {context, continuation} objects: checked by the job, which names the line
    prompt_tokens: int | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    send_prompt: bool = False  # stream the prompt after every step (the client saves it as it goes)
    compression: Compression = "raw"
    # A job resumed on another coordinator: the prompt after the last step the client heard of, and the
    # step to go on from (the same batches follow; the optimizer's moments start afresh).
    init_prompt: WireTensor | None = None
    first_step: int | None = None


class StatusJob(_Params):
    job: Literal["status"] = "status"


JobSpec = Annotated[Union[GenerateJob, ScoreJob, TuneJob, StatusJob], Field(discriminator="job")]
_SPEC = TypeAdapter(JobSpec)


def job_params(spec: BaseModel) -> dict:
    """The `params` of a Job message for `spec` (its kind goes in `job`)."""
    return spec.model_dump(exclude={"job"}, exclude_none=True)


def job_spec(kind: str, params: dict) -> GenerateJob | ScoreJob | TuneJob | StatusJob:
    """The typed job a client asked for; InputError in one sentence when a parameter is wrong."""
    if not isinstance(params, dict):
        raise InputError("job parameters must be an object.")
    clean = {k: v for k, v in params.items() if v is not None}  # null means "the default", as before
    try:
        return _SPEC.validate_python({**clean, "job": kind})
    except ValidationError as e:
        raise InputError(_sentence(kind, e.errors()[0])) from None


def _sentence(kind: str, error: dict) -> str:
    where = ".".join(str(x) for x in error.get("loc", ()) if x != kind) or "params"
    value, kind_of = error.get("input"), error.get("type", "")
    if kind_of == "extra_forbidden":
        return f"{kind} has no parameter {where!r}."
    if kind_of == "missing":
        return f"{kind} needs the parameter {where!r}."
    if kind_of == "int_type" and isinstance(value, float):
        return f"job parameter {where!r} must be a whole number, not {value!r}."
    if kind_of in ("int_type", "float_type"):
        return f"job parameter {where!r} must be a number, not {type(value).__name__}."
    if kind_of == "bool_type":
        return f"job parameter {where!r} must be true, false or null."
    if kind_of == "too_short":
        return f"{kind} needs a non-empty list {where!r}."
    if kind_of == "literal_error" and where == "compression":
        return f"unknown compression {value!r}: use raw, fp16, bf16 or int8."
    return f"job parameter {where!r}: {error.get('msg', 'invalid')}."


# ---- results ------------------------------------------------------------------------------------------
class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer coordinators may say more


class GeneratedRow(_Result):
    text: str
    token_ids: list[int]
    finish_reason: str


class GenerateResult(_Result):
    results: list[GeneratedRow]


class ScoredLine(_Result):
    """One line's log-likelihood (`logprob`, `is_greedy`), or one per choice (`logprobs`, `is_greedy`, ...)."""

    is_greedy: bool | list[bool]


class ScoreResult(_Result):
    results: list[ScoredLine]


class TuneResult(_Result):
    prompt: WireTensor
    fingerprint: str


class TextEvent(_Result):
    """Generation as it streams: prompt `prompt`'s next tokens and the text they complete, or its end."""

    prompt: int
    text: str = ""
    token_ids: list[int] = []
    finish_reason: str | None = None  # once the prompt's row has ended: "eos", "length" or "stop"


class LineEvent(_Result):
    """A scored line as soon as its numbers are in (line: its index in the job, from 0)."""

    line: int
    result: ScoredLine


class StepEvent(_Result):
    """A tuning step's loss, and with `send_prompt` the prompt after it."""

    step: int
    loss: float
    prompt: WireTensor | None = None
    fingerprint: str | None = None
