"""Tensors <-> wire tensors: dtype, shape and raw bytes, optionally compressed (fp32 as fp16, bf16, or int8
with one scale per 64 values). Decoding checks dimensions, element limits and byte counts before it
allocates anything, so a peer cannot make us build a tensor it did not pay for in bytes.
"""

from __future__ import annotations

import math

import torch

from ._errors import ProtocolError
from ._framing import DEFAULT_LIMITS, Limits
from ._messages import WireTensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8}
_NAMES = {v: k for k, v in _DTYPES.items()}
_INT8_BLOCK = 64


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
