"""Bytes <-> messages, and shared-secret files. No I/O beyond reading a secret file, never pickle.

Frames are msgpack maps (one WebSocket message each). Decoding checks, in order: frame size, msgpack
well-formedness, message schema (tensor byte counts and element limits: `_tensors`, when a tensor is
decoded); any failure is a `ProtocolError` with one sentence, which servers send back as an error reply
instead of dying. No torch here: a client that only sends text and reads results never imports it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import msgpack
from pydantic import ValidationError

from ._errors import AuthError, ProtocolError
from ._messages import MESSAGE

PEEK_BYTES = 4096


@dataclass(frozen=True)
class Limits:
    max_frame: int = 256 << 20  # bytes in one WebSocket message
    max_tensor_elements: int = 1 << 26
    max_batch_tokens: int = 1 << 16  # batch x length of one forward/backward/step


DEFAULT_LIMITS = Limits()


def pack(message) -> bytes:
    return msgpack.packb(message.model_dump(), use_bin_type=True)


def unpack(frame: bytes | str, limits: Limits = DEFAULT_LIMITS):
    if isinstance(frame, str):
        raise ProtocolError("text frames are not part of the protocol: send msgpack in binary frames.")
    if len(frame) > limits.max_frame:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {limits.max_frame}: send smaller batches.")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=limits.max_frame,
                              max_str_len=1 << 24, max_array_len=1 << 24, max_map_len=1 << 16)
    except Exception as e:
        raise ProtocolError(f"malformed msgpack frame ({type(e).__name__}): send one msgpack map per message.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ProtocolError("a message must be a msgpack map with a string 'type'.")
    try:
        return MESSAGE.validate_python(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ProtocolError(f"invalid {raw.get('type')!r} message: {where}: {first['msg']}.") from None


def peek(frame: bytes | str) -> tuple[str, int | None]:
    """A frame's `type` and `id` without decoding the rest (a reply's tensor stays untouched bytes).

    The event loop routes replies by id with this; the worker thread that waits for the reply does the
    full `unpack` (schema, tensor bytes) off the loop.
    """
    if not isinstance(frame, (bytes, memoryview)):
        raise ProtocolError("text frames are not part of the protocol: send msgpack in binary frames.")
    # only the head is read: honest senders put `type` and `id` first, and a 256 MB frame is not copied
    unpacker = msgpack.Unpacker(io.BytesIO(bytes(frame[:PEEK_BYTES])), raw=False, max_buffer_size=PEEK_BYTES)
    kind, msg_id = None, None
    try:
        for _ in range(min(unpacker.read_map_header(), 8)):
            key = unpacker.unpack()
            if key == "type":
                kind = unpacker.unpack()
            elif key == "id":
                msg_id = unpacker.unpack()
            else:
                unpacker.skip()
            if kind is not None and msg_id is not None:
                break
    except Exception:  # truncated, not a map, nested garbage: all the sender's fault
        raise ProtocolError("malformed msgpack frame: send one msgpack map per message.") from None
    if not isinstance(kind, str) or not (msg_id is None or type(msg_id) is int) or \
            (msg_id is not None and not -(2 ** 63) <= msg_id < 2 ** 63):
        raise ProtocolError("a message must be a msgpack map with a string 'type' and an integer 'id'.")
    return kind, msg_id


# ---- credentials ---------------------------------------------------------------------------------
def read_secret(path: str | os.PathLike | None) -> bytes | None:
    """The key in a secret file: the whole file, or KEY of a one-line `NAME KEY` (a user's client key)."""
    return read_credentials(path)[1]


def read_credentials(path: str | os.PathLike | None) -> tuple[str, bytes | None]:
    """(NAME, KEY) of a secret file holding `KEY` or `NAME KEY` (NAME is "" then)."""
    if path is None:
        return "", None
    try:
        secret = open(path, "rb").read().strip()
    except OSError as e:
        raise AuthError(f"cannot read secret file {path} ({e.strerror}): check --secret-file.") from None
    name = b""
    parts = secret.split()
    if len(parts) == 2 and b"\n" not in secret:  # `NAME KEY`, as a coordinator's --client-keys line
        name, secret = parts
    if len(secret) < 16:
        raise AuthError(f"secret file {path} holds fewer than 16 bytes: put a long random string in it "
                        "(e.g. `openssl rand -hex 32`).")
    return name.decode(errors="replace"), secret
