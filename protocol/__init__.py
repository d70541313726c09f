"""slowllm's wire protocol, sans-I/O: typed messages, msgpack framing, tensor codec, authentication.

Nothing here touches a socket or an event loop; the node and the coordinator feed bytes in and get
messages out (and the reverse), like the `websockets` library's protocol core.

Names load on first use (PEP 562), so `slowllm --help` and argument errors never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._errors": ["AuthError", "BusyError", "CheckpointError", "InputError", "MemoryBudgetError", "ProtocolError", "SlowllmError", "UnavailableError", "error_from_reply"],
    "._framing": ["DEFAULT_LIMITS", "Limits", "pack", "peek", "read_credentials", "read_secret", "unpack"],
    "._handshake": ["HANDSHAKE_LIMITS", "Channel", "CoordinatorHandshake", "PeerHandshake", "printable"],
    "._tensors": ["decode_tensor", "encode_tensor"],
    "._jobs": ["GenerateJob", "GenerateResult", "JobSpec", "LineEvent", "ScoreJob", "ScoreResult", "SoftPromptParam", "StatusJob", "StepEvent", "TextEvent", "TuneJob", "TuneResult", "job_params", "job_spec"],
    "._messages": ["MAX_STEPS", "PROTOCOL_VERSION", "Auth", "Backward", "Challenge", "CloseSession", "Error", "Event", "Forward", "Heartbeat", "Hello", "Job", "JobResult", "Register", "Result", "Results", "Step", "Steps", "Welcome", "WireTensor"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._errors import AuthError, BusyError, CheckpointError, InputError, MemoryBudgetError, ProtocolError, SlowllmError, UnavailableError, error_from_reply  # noqa: F401
    from ._framing import DEFAULT_LIMITS, Limits, pack, peek, read_credentials, read_secret, unpack  # noqa: F401
    from ._handshake import HANDSHAKE_LIMITS, Channel, CoordinatorHandshake, PeerHandshake, printable  # noqa: F401
    from ._tensors import decode_tensor, encode_tensor  # noqa: F401
    from ._jobs import GenerateJob, GenerateResult, JobSpec, LineEvent, ScoreJob, ScoreResult, SoftPromptParam, StatusJob, StepEvent, TextEvent, TuneJob, TuneResult, job_params, job_spec  # noqa: F401
    from ._messages import MAX_STEPS, PROTOCOL_VERSION, Auth, Backward, Challenge, CloseSession, Error, Event, Forward, Heartbeat, Hello, Job, JobResult, Register, Result, Results, Step, Steps, Welcome, WireTensor  # noqa: F401
