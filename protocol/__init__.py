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
)

__all__ = [
    "AuthError",
    "BusyError",
    "CheckpointError",
    "InputError",
    "MemoryBudgetError",
    "ProtocolError",
    "SlowllmError",
    "UnavailableError",
]
