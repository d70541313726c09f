"""Adversarial peers written with slowllm.protocol, for tests and bench/fuzz.py.

`LyingNode` holds the real node secret and the real fingerprint (a volunteer who turned bad, or a broken
PC): it registers a range of blocks and answers every request with one kind of lie.
"""

from __future__ import annotations

import asyncio
import threading

import torch
import websockets

from slowllm.node import Checkpoint
from slowllm.node.engine._digests import block_digests
from slowllm.protocol import (Backward, CloseSession, Error, Forward, Limits, PeerHandshake, Register, Result, Results,
                              Step, Steps, decode_tensor, encode_tensor, pack)

# what a lying node answers instead of the blocks' output
LIES = {
    "zeros": lambda h: torch.zeros_like(h),
    "random": lambda h: torch.randn_like(h) * h.std(),
    "echo": lambda h: h,  # the input, unchanged
    "nudge": lambda h: h * 1.02,  # close to the input: off by 2%
    "collude": lambda h: h * 1.05 + 0.01 * h.roll(1, dims=-1),  # what two colluders agree on: 5%, input-dependent
    "nan": lambda h: torch.full_like(h, float("nan")),
    "inf": lambda h: torch.full_like(h, float("inf")),
    "int64": lambda h: torch.ones(h.shape, dtype=torch.int64),
    "short": lambda h: h[:, :-1] if h.shape[1] > 1 else h[:, :, :-1],  # one position (or feature) fewer
    "huge": lambda h: torch.zeros(h.shape[0], 8 << 10, h.shape[2]),  # megabytes nobody asked for
}
REFUSALS = {"busy": "busy", "internal": "internal",  # honest-looking trouble: fail over, don't ban
            "bad_input": "bad_input"}  # "your request is wrong": the job's error, unless it was only a check


class LyingNode:
    def __init__(self, url: str, secret: bytes | None, model, first: int, last: int, lie: str, name: str = "",
                 device: str = "cpu", dtype: str = "float32", speed: float = 1e9, quantization: str = "none"):
        self.url, self.secret, self.first, self.last, self.lie = url, secret, first, last, lie
        self.speed = speed
        self.name = name or f"liar-{lie}"
        self.device, self.dtype = device, dtype
        checkpoint = Checkpoint(model)
        self.fingerprint = checkpoint.fingerprint()
        self.quantization = quantization  # what it declares (int8: the looser tolerance between nodes)
        self.digests = block_digests(checkpoint, range(first, last + 1), quantization == "int8")  # real weights
        if lie == "off5":  # computes the blocks for real, then moves the answer by 5% (forwards only)
            from slowllm.node.engine._resident import ResidentBlocks
            self.blocks = ResidentBlocks(checkpoint, first, last, torch.float32)
        self.answered = 0
        self.received: list[tuple[str, str, str]] = []  # (message type, dtype, codec) of each hidden state
        self.banned = ""
        self.refused = ""
        self.registered = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> "LyingNode":
        self._thread.start()
        while not self.registered.wait(0.1):
            if self.done.is_set():
                raise RuntimeError(f"{self.name} did not register: {self.refused}")
        return self

    def _answer(self, msg):
        if isinstance(msg, CloseSession):
            return Result(id=msg.id)
        if self.lie in REFUSALS:
            return Error(id=msg.id, code=REFUSALS[self.lie], message="<script>alert(1)</script> trouble")
        self.received.append((msg.type, msg.hidden.dtype, msg.hidden.codec))
        hidden = decode_tensor(msg.hidden)
        if self.lie == "off5":
            out = self.blocks.forward(hidden, decode_tensor(msg.mask), msg.first, msg.last)
            return Result(id=msg.id, tensor=encode_tensor(out * 1.05))
        return Result(id=msg.id, tensor=encode_tensor(LIES[self.lie](hidden)))

    async def _run(self) -> None:
        try:
            async with websockets.connect(self.url, max_size=None) as ws:
                hs = PeerHandshake("node", self.secret, self.name)
                await ws.send(hs.hello())
                await ws.send(hs.on_challenge(await ws.recv()))
                hs.on_welcome(await ws.recv())
                channel = hs.channel
                await ws.send(channel.pack(Register(first=self.first, last=self.last, fingerprint=self.fingerprint,
                                                    name=self.name, device=self.device, dtype=self.dtype,
                                                    speed=self.speed, digests=self.digests,  # claims to be very fast
                                                    quantization=self.quantization)))
                reply = channel.unpack(await ws.recv(), Limits())
                if isinstance(reply, Error):
                    self.refused = reply.message
                    return
                self.registered.set()
                async for frame in ws:
                    msg = channel.unpack(frame, Limits())
                    if isinstance(msg, Error) and msg.code == "banned":
                        self.banned = msg.message
                        continue
                    if isinstance(msg, Steps):  # several sessions' steps: one lie each, in one Results
                        await ws.send(channel.seal(pack(Results(id=msg.id, items=[self._answer(m) for m in msg.items]))))
                        self.answered += len(msg.items)
                    elif isinstance(msg, (Forward, Backward, Step, CloseSession)):
                        await ws.send(channel.seal(pack(self._answer(msg))))
                        self.answered += 1
        except websockets.ConnectionClosed:
            pass
        finally:
            self.done.set()
