"""The one error type users see.

Every failure a user can cause or fix (a bad path, a malformed line, too little memory, a wrong secret)
is raised as a `SlowllmError` whose message is one sentence saying what is wrong and what to do. The CLI
prints it without a traceback; the servers send it as an error reply with its `code`.
"""

from __future__ import annotations


class SlowllmError(Exception):
    """A user-facing error: `str(err)` is one sentence; `code` is a short machine-readable name."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class CheckpointError(SlowllmError):
    code = "bad_checkpoint"


class InputError(SlowllmError):
    code = "bad_input"


class MemoryBudgetError(SlowllmError):
    code = "memory"


class ProtocolError(SlowllmError):
    code = "protocol"


class AuthError(SlowllmError):
    code = "auth"


class BusyError(SlowllmError):
    code = "busy"


class UnavailableError(SlowllmError):
    code = "unavailable"


def error_from_reply(code: str, message: str) -> SlowllmError:
    """The typed error for an error reply, so callers can catch e.g. `BusyError` and retry."""
    for cls in (CheckpointError, InputError, MemoryBudgetError, ProtocolError, AuthError, BusyError, UnavailableError):
        if cls.code == code:
            return cls(message)
    return SlowllmError(message, code=code)
