"""Bytes <-> messages, tensors <-> wire tensors, shared-secret authentication. No I/O, never pickle.

Frames are msgpack maps (one WebSocket message each). Decoding checks, in order: frame size, msgpack
well-formedness, message schema, tensor byte counts and element limits; any failure is a
`ProtocolError` with one sentence, which servers send back as an error reply instead of dying.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import msgpack
import torch
from pydantic import ValidationError

from ._errors import AuthError, ProtocolError
from ._messages import MESSAGE, WireTensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8}
_NAMES = {v: k for k, v in _DTYPES.items()}
_INT8_BLOCK = 64
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


def encode_tensor(t: torch.Tensor, codec: str = "raw") -> WireTensor:
    t = t.detach().cpu().contiguous()
    if codec != "raw" and t.dtype != torch.float32:
        codec = "raw"  # only fp32 is worth compressing; everything else goes as it is
    scales = b""
    if codec == "fp16":
        payload = t.to(torch.float16)
    elif codec == "bf16":
        payload = t.to(torch.bfloat16)
    elif codec == "int8":
        flat = t.reshape(-1)
        pad = (-flat.numel()) % _INT8_BLOCK
        blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, _INT8_BLOCK)
        scale = blocks.abs().amax(dim=1).clamp_min(1e-30) / 127.0
        payload = torch.round(blocks / scale[:, None]).to(torch.int8)
        scales = scale.numpy().astype("<f4").tobytes()
    else:
        payload = t
    data = payload.reshape(-1).view(torch.uint8).numpy().tobytes() if payload.numel() else b""
    return WireTensor(dtype=_NAMES[t.dtype], shape=list(t.shape), codec=codec, data=data, scales=scales)


def decode_tensor(w: WireTensor, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    dtype = _DTYPES[w.dtype]
    if len(w.shape) > 8:
        raise ProtocolError(f"tensor has {len(w.shape)} dimensions, more than 8.")
    numel = math.prod(w.shape)  # Python ints: a shape like [2**62 + 1, 4] cannot wrap around
    if numel > limits.max_tensor_elements:
        raise ProtocolError(f"tensor of {numel} elements exceeds the limit of {limits.max_tensor_elements}.")
    stored = {"raw": dtype, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[w.codec]
    if w.codec != "raw" and dtype != torch.float32:
        raise ProtocolError(f"codec {w.codec} applies to float32 tensors only.")
    padded = numel + (-numel) % _INT8_BLOCK if w.codec == "int8" else numel
    if len(w.data) != padded * stored.itemsize:
        raise ProtocolError(f"tensor data is {len(w.data)} bytes, but {w.dtype} {w.shape} needs {padded * stored.itemsize}.")
    if numel == 0:
        return torch.empty(w.shape, dtype=dtype)
    payload = torch.frombuffer(bytearray(w.data), dtype=torch.uint8).view(stored)
    if w.codec == "int8":
        if len(w.scales) != padded // _INT8_BLOCK * 4:
            raise ProtocolError("int8 tensor has the wrong number of scales.")
        scale = torch.frombuffer(bytearray(w.scales), dtype=torch.float32)
        out = (payload.reshape(-1, _INT8_BLOCK).float() * scale[:, None]).reshape(-1)[:numel]
        return out.reshape(w.shape)
    return payload.reshape(w.shape).to(dtype)


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
