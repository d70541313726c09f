"""A coordinator's link to one node: its pending requests, its outbox that merges a wave's steps into
one `Steps` message, and what the node said of itself (range, dtype, speed, load).

Ownership: a link's pending requests and outbox belong to the event loop; job threads reach them only
through `step`/`request` coroutines run on it (`chains/_exchange.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import websockets

from slowllm.protocol import MAX_STEPS, Channel, Step, Steps, UnavailableError

# Steps whose hidden states are at most this many bytes go through the outbox (merged into Steps messages
# packed on the event loop); bigger ones (prefills) are packed by their job's thread and sent alone.
OUTBOX_STEP_BYTES = 1 << 20
# ... and at most this many positions (rows x new tokens): the most a node's decode kernels merge into one
# pass (16: the AMX build). A prompt beyond it runs in a pass of its own at every node, so it goes alone
# and is answered alone: while the next node runs it, this one runs the next prompt (sent in one Steps
# message, prompts that arrive together would reach the next node only once all of them had run here).
OUTBOX_STEP_POSITIONS = 16
GANG_WAIT_S = 0.02  # the longest an outbox holds a wave's steps for the rest of them (a failover moved one)


def merges(hidden) -> bool:
    """Whether a generation step of `hidden` [rows, new, H] goes through a node's outbox (merged)."""
    return hidden.shape[0] * hidden.shape[1] <= OUTBOX_STEP_POSITIONS and hidden.numel() * 4 <= OUTBOX_STEP_BYTES


class BatchReply:
    """The raw Results frame answering a Steps message, opened (authenticated, parsed) once by whichever
    job thread needs it first; every step in it reads its own item."""

    def __init__(self, frame: bytes, msg_id: int, count: int):
        self.frame, self.msg_id, self.count = frame, msg_id, count
        self._lock = threading.Lock()
        self._msg, self._error = None, None

    def open(self, channel: Channel, limits):
        with self._lock:
            if self._msg is None and self._error is None:
                try:
                    self._msg = channel.unpack(self.frame, limits)
                except Exception as e:  # (AuthError, ProtocolError): every step in it sees the same
                    self._error = e
                self.frame = None
            if self._error is not None:
                raise self._error
            return self._msg


@dataclass(eq=False)
class NodeLink:
    """A registered node and its in-flight requests (futures resolved with the reply's raw frame).

    Generation steps from every job go through its outbox: the steps that arrive in one turn of the event
    loop leave as ONE Steps message, so the node runs them in one merged pass (and it merges whatever else
    waits when its previous pass ends)."""

    ws: object
    name: str
    first: int
    last: int
    device: str
    dtype: str
    speed: float
    load: int = 0
    sessions: int = 0
    assigned: int = 0  # requests the coordinator has in flight on this node
    pending: dict = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    since: float = field(default_factory=time.time)
    failures: int = 0
    avoid_until: float = 0.0  # monotonic time until which the router prefers other nodes
    connected: bool = True
    channel: Channel = field(default_factory=Channel)  # authenticates every frame of this link
    address: str = ""
    routed: int = 0  # times the router chose it (its share of traffic is kept proportional to its reach)
    verified: int = 0  # of its hops re-run on another node and found equal
    refereed: int = 0  # of its hops the coordinator recomputed itself and found right (0: on probation)
    banned: str = ""  # why it was banned ("" while trusted)
    quantization: str = "none"  # "int8": its weights are an int8 copy (declared at registration)
    weights_proven: bool = True  # its digests matched every block (False: some block could not be checked here)
    queue: int = 0  # its requests waiting for compute (heartbeat)
    batch: float = 0.0  # requests per pass, recent mean (heartbeat)
    rows: float = 0.0  # rows per pass, recent mean (heartbeat)
    outbox: list = field(default_factory=list)  # (Step, future, timeout) waiting for this loop turn's flush
    flushing: bool = False
    expected: dict = field(default_factory=dict)  # wave -> its steps still to come here (the stepping loop's word)
    gang_timer: object = None
    steps_sent: int = 0  # steps sent through the outbox
    step_messages: int = 0  # Steps messages they went in

    @property
    def precision(self) -> str:
        """What decides how far its honest answers may stray: its dtype, or int8 weights."""
        return "int8" if self.quantization == "int8" else self.dtype

    def next_id(self) -> int:
        return next(self.ids)  # itertools.count is atomic under the GIL: worker threads take ids

    async def request(self, msg_id: int, frame: bytes, timeout: float | None = None) -> bytes:
        """Send a frame packed by the caller's thread and wait for the reply's raw frame."""
        if self.banned or not self.connected:
            raise UnavailableError(f"node {self.name} is gone.")
        future = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        self.assigned += 1

        async def exchange():
            await self.ws.send(frame)
            return await future

        try:  # the send is inside the timeout too: a hung node may have stopped reading
            return await asyncio.wait_for(exchange(), timeout)
        except websockets.ConnectionClosed:
            raise UnavailableError(f"node {self.name} disconnected during the request.") from None
        finally:
            self.pending.pop(msg_id, None)
            self.assigned -= 1

    async def step(self, item: Step, timeout: float | None = None, wave: int | None = None) -> tuple[BatchReply, int]:
        """Send one generation step with whatever other steps for this node arrive in this turn of the
        loop (or, for a step of the stepping loop's `wave`, once all of that wave's steps for this node
        are here); returns the shared reply and the step's index in it."""
        if self.banned or not self.connected:
            raise UnavailableError(f"node {self.name} is gone.")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.outbox.append((item, future, timeout))
        self.assigned += 1
        if wave in self.expected:
            self.expected[wave] -= 1
            if self.expected[wave] <= 0:
                del self.expected[wave]
        if wave not in self.expected:
            if not self.flushing:
                self.flushing = True
                loop.call_soon(self._flush)
        elif self.gang_timer is None:  # the rest of the wave is on its way: wait for it, not forever
            self.gang_timer = loop.call_later(GANG_WAIT_S, self._flush)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.assigned -= 1

    def expect(self, wave: int, count: int) -> None:
        """The stepping loop's word: `count` steps of `wave` will come here (sent together once all did)."""
        self.expected[wave] = count
        while len(self.expected) > 64:  # waves whose steps never all came (failed over elsewhere)
            del self.expected[next(iter(self.expected))]

    def _flush(self) -> None:
        self.flushing = False
        if self.gang_timer is not None:
            self.gang_timer.cancel()
            self.gang_timer = None
        waiting, self.outbox = [x for x in self.outbox if not x[1].done()], []
        while waiting:
            batch, waiting = waiting[:MAX_STEPS], waiting[MAX_STEPS:]
            if self.banned or not self.connected:
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(UnavailableError(f"node {self.name} is gone."))
                continue
            msg_id = self.next_id()
            frame = self.channel.pack(Steps(id=msg_id, items=[item for item, _, _ in batch]))
            self.steps_sent += len(batch)
            self.step_messages += 1
            timeouts = [t for _, _, t in batch]
            asyncio.ensure_future(self._exchange_steps(msg_id, frame, batch,
                                                       None if None in timeouts else max(timeouts)))

    async def _exchange_steps(self, msg_id: int, frame: bytes, batch: list, timeout: float | None) -> None:
        reply = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = reply
        try:
            await self.ws.send(frame)
            raw = await asyncio.wait_for(reply, timeout)
        except Exception as e:  # gone, closed or silent: every step in it fails over on its own
            why = e if isinstance(e, UnavailableError) else UnavailableError(
                f"node {self.name} disconnected or timed out during the request.")
            for index, (_, future, _) in enumerate(batch):
                if not future.done():
                    future.set_exception(why)
            return
        finally:
            self.pending.pop(msg_id, None)
        shared = BatchReply(raw, msg_id, len(batch))
        for index, (_, future, _) in enumerate(batch):
            if not future.done():
                future.set_result((shared, index))

    def resolve(self, msg_id: int, frame: bytes) -> None:
        future = self.pending.get(msg_id)
        if future is not None and not future.done():
            future.set_result(frame)

    def fail_all(self) -> None:
        self.connected = False
        for future in self.pending.values():
            if not future.done():
                future.set_exception(UnavailableError(f"node {self.name} disconnected."))
