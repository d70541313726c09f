"""Typed messages of the slowllm protocol (pydantic), one model per `type`.

Conversation shapes:
  peer -> coordinator: Hello;  coordinator -> peer: Challenge;  peer: Auth;  coordinator: Welcome | Error
  node: Register -> Welcome | Error, then serves Forward / Backward / Step / CloseSession with Result | Error
        and Steps (several sessions' steps, merged into one pass) with Results; sends Heartbeat now and then
  client: Job -> Event* -> JobResult | Error
Every request carries an `id` that its reply repeats, so replies may come back in any order.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# 2: mutual authentication, authenticated frames; 3: Step.past (rollback); 4: quantization;
# 5: Steps/Results (multi-session steps), `job` tags for fair sharing, queue and batch sizes in heartbeats
# 6: the coordinator's proof covers the Welcome's info; nodes send per-block weight digests
PROTOCOL_VERSION = 6
MAX_STEPS = 256  # sessions' steps in one Steps message


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WireTensor(_Msg):
    """A tensor on the wire: dtype, shape, raw little-endian bytes, optionally compressed.

    codec "raw" keeps the dtype exactly; "fp16"/"bf16" halve fp32 (relative error <= 2**-11 / 2**-8);
    "int8" stores each block of 64 values as int8 times one fp32 scale (error <= max|block| / 254).
    """

    dtype: Literal["float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8", "int8"]
    shape: list[Annotated[int, Field(ge=0)]]
    codec: Literal["raw", "fp16", "bf16", "int8"] = "raw"
    data: bytes
    scales: bytes = b""


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    version: int
    role: Literal["node", "client"]
    name: str = Field("", max_length=200)
    nonce: bytes = Field(b"", max_length=64)  # the peer's contribution to the transcript both sides prove


class Challenge(_Msg):
    type: Literal["challenge"] = "challenge"
    version: int
    nonce: bytes = Field(max_length=64)
    auth_required: bool
    fingerprint: str = Field(max_length=64)  # no model path: a stranger learns nothing about the machine
    n_layer: int


class Auth(_Msg):
    type: Literal["auth"] = "auth"
    mac: bytes = Field(b"", max_length=64)


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    info: dict[str, Any] = {}
    proof: bytes = Field(b"", max_length=64)  # the coordinator's proof of the secret (mutual authentication)


class Error(_Msg):
    type: Literal["error"] = "error"
    id: int | None = None
    code: str = Field(max_length=64)
    message: str = Field(max_length=4096)


class Register(_Msg):
    type: Literal["register"] = "register"
    first: int
    last: int
    fingerprint: str = Field(max_length=64)
    device: str = Field("cpu", max_length=32)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # decides the --verify tolerance
    quantization: Literal["none", "int8"] = "none"  # int8: weights from an int8 copy (looser tolerance)
    speed: float = Field(0.0, ge=0, allow_inf_nan=False)  # measured tokens x blocks per second (its word)
    name: str = Field("", max_length=64)
    # per block first..last: SHA-256 of its weights (node/engine/_digests.py), checked against the coordinator's
    digests: list[Annotated[str, Field(max_length=64)]] = Field([], max_length=1 << 12)


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    load: int = Field(0, ge=0, le=1 << 20)
    sessions: int = Field(0, ge=0, le=1 << 20)
    queue: int = Field(0, ge=0, le=1 << 20)  # requests waiting for the compute thread now
    batch: float = Field(0.0, ge=0, le=1 << 20, allow_inf_nan=False)  # requests per pass, recent mean
    rows: float = Field(0.0, ge=0, le=1 << 20, allow_inf_nan=False)  # rows per pass, recent mean


class Forward(_Msg):
    """Run blocks first..last (within the node's range) on `hidden`; no state is kept."""

    type: Literal["forward"] = "forward"
    id: int
    first: int
    last: int
    hidden: WireTensor
    mask: WireTensor
    compression: Literal["raw", "fp16", "bf16", "int8"] = "raw"
    job: str = Field("", max_length=64)  # who asked (the coordinator's tag of a client): the node shares passes fairly


class Backward(_Msg):
    """Recompute blocks first..last from their input `hidden` and return the gradient w.r.t. it."""

    type: Literal["backward"] = "backward"
    id: int
    first: int
    last: int
    hidden: WireTensor
    mask: WireTensor
    grad: WireTensor
    job: str = Field("", max_length=64)  # who asked (the coordinator's tag of a client): the node shares passes fairly


class Step(_Msg):
    """One generation step of a session; the node keeps the session's KV cache for blocks first..last."""

    type: Literal["step"] = "step"
    id: int
    session: str = Field(max_length=64)
    first: int
    last: int
    hidden: WireTensor
    mask: WireTensor
    max_length: int = 2048
    # When set, the node first cuts the session's caches back to `past` positions (speculative decoding's
    # rejected drafts); the mask then covers those `past` positions plus the new ones.
    past: int | None = Field(None, ge=0)
    job: str = Field("", max_length=64)  # who asked (the coordinator's tag of a client): the node shares passes fairly


class Steps(_Msg):
    """Steps of several sessions at once (one each): the node runs them in one merged pass over its blocks
    and answers `Results`, one item per step in order (each a Result, or an Error for that step alone)."""

    type: Literal["steps"] = "steps"
    id: int
    items: list[Step] = Field(max_length=MAX_STEPS)


class CloseSession(_Msg):
    type: Literal["close_session"] = "close_session"
    id: int
    session: str = Field(max_length=64)


class Result(_Msg):
    type: Literal["result"] = "result"
    id: int
    tensor: WireTensor | None = None


class Results(_Msg):
    type: Literal["results"] = "results"
    id: int
    items: list[Annotated[Union[Result, Error], Field(discriminator="type")]] = Field(max_length=MAX_STEPS)


class Job(_Msg):
    type: Literal["job"] = "job"
    id: int
    job: Literal["generate", "score", "tune", "status"]
    params: dict[str, Any] = {}


class Event(_Msg):
    """Streamed progress of a job: generated tokens, tuning losses."""

    type: Literal["event"] = "event"
    id: int
    data: dict[str, Any]


class JobResult(_Msg):
    type: Literal["job_result"] = "job_result"
    id: int
    data: dict[str, Any]


Message = Annotated[
    Union[Hello, Challenge, Auth, Welcome, Error, Register, Heartbeat, Forward, Backward, Step, Steps, CloseSession,
          Result, Results, Job, Event, JobResult],
    Field(discriminator="type"),
]
MESSAGE = TypeAdapter(Message)
