"""slowllm's wire protocol, sans-I/O: typed messages, msgpack framing, tensor codec, authentication.

Nothing here touches a socket or an event loop; the node and the coordinator feed bytes in and get
messages out (and the reverse), like the `websockets` library's protocol core.
"""

from ._errors import (
    AuthError,
    BusyError,
    CheckpointError,
    InputError,
    MemoryBudgetError,
    ProtocolError,
    SlowllmError,
    UnavailableError,
    error_from_reply,
)
from ._framing import DEFAULT_LIMITS, Limits, decode_tensor, encode_tensor, new_nonce, pack, read_secret, sign, unpack, verify
from ._messages import (
    PROTOCOL_VERSION,
    Auth,
    Backward,
    Challenge,
    CloseSession,
    Error,
    Event,
    Forward,
    Heartbeat,
    Hello,
    Job,
    JobResult,
    Register,
    Result,
    Step,
    Welcome,
    WireTensor,
)

__all__ = [
    "AuthError", "Auth", "Backward", "BusyError", "Challenge", "CheckpointError", "CloseSession", "DEFAULT_LIMITS",
    "Error", "Event", "Forward", "Heartbeat", "Hello", "InputError", "Job", "JobResult", "Limits",
    "MemoryBudgetError", "PROTOCOL_VERSION", "ProtocolError", "Register", "Result", "SlowllmError", "Step",
    "UnavailableError", "Welcome", "WireTensor", "decode_tensor", "encode_tensor", "error_from_reply", "new_nonce", "pack",
    "read_secret", "sign", "unpack", "verify",
]
