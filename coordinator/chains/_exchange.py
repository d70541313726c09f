"""One request to one node and its reply, checked: what every hop of the remote chain is made of.

A job's worker thread packs the frame; the event loop only sends it and routes the reply's raw frame back
by id; the thread unpacks and checks it. The outcome is explicit: the reply's tensor (float, finite, of
the shape asked for), or `NodeFailed` - the node failed (gone, slow, busy: avoided for a while) or lied
(banned), and the hop fails over - or a `SlowllmError` when the node refused the request itself (a limit,
a bad session), which is the job's to hear.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import TYPE_CHECKING

import torch

from slowllm.protocol import (AuthError, Error, Limits, ProtocolError, Result, Results, SlowllmError, UnavailableError,
                              WireTensor, decode_tensor, encode_tensor, printable)

if TYPE_CHECKING:
    from slowllm.coordinator.swarm._links import NodeLink
    from slowllm.coordinator.swarm._router import Router

FRAME_OVERHEAD = 64 << 10  # msgpack keys, ids, shapes: generous, so a cut request always fits
FAILOVER_CODES = ("busy", "internal", "protocol", "unavailable")  # the node's trouble, not the request's
_HALF = {"bfloat16": (torch.bfloat16, "bf16"), "float16": (torch.float16, "fp16")}  # a node's dtype, its codec
# the stepping loop's wave a thread's step belongs to (its node outboxes wait for the whole wave)
current_wave = threading.local()


def encode_mask(mask: torch.Tensor):
    """The 0/1 token mask on the wire as uint8: a step re-sends the whole session's mask, which at 2,000
    positions was 16 KB per hop as int64, more than half a Bloom-176B token's hidden state in bf16."""
    return encode_tensor(mask.to(torch.uint8))


class NodeFailed(UnavailableError):
    """This hop's node failed or lied: the hop moves to another node."""

    def __init__(self, node: "NodeLink", message: str):
        super().__init__(message)
        self.node = node


class Cancelled(SlowllmError):
    code = "cancelled"


class Exchanges:
    """A chain's requests to nodes: sent from the job's thread, replies checked, failures named."""

    def __init__(self, router: "Router", limits: Limits, cancel: threading.Event):
        self.router, self.limits, self.cancel = router, limits, cancel
        self.served_by: set = set()  # nodes whose answers were used (told when one is banned later)

    @staticmethod
    def wire(node: "NodeLink", t: torch.Tensor, codec: str = "raw") -> WireTensor:
        """`t` as sent to `node`. A node computing in bf16 (or fp16) rounds what it receives to that dtype
        first, so it gets it in that dtype: half the bytes of fp32 and the very numbers it would compute
        from (the rounding is the same either side). A lossy codec the job chose still applies otherwise."""
        compute, same = _HALF.get(node.dtype, (None, None))
        if compute is not None and codec in ("raw", same):
            return encode_tensor(t.to(compute))
        return encode_tensor(t, codec)

    def call(self, coro):
        """Run `coro` on the event loop and wait for it here, giving up as soon as the job is cancelled."""
        future = asyncio.run_coroutine_threadsafe(coro, self.router.loop)
        # (not `future.result(timeout)` in a loop: its TimeoutError is also what a timed-out hop raises)
        while not concurrent.futures.wait([future], timeout=0.25).done:
            if self.cancel.is_set():
                future.cancel()
                raise Cancelled("the job was cancelled (its client went away).")
        return future.result()

    def failed(self, node: "NodeLink", why: str) -> NodeFailed:
        """The node failed this hop (gone, slow, busy, a bug): fail over, and avoid it for a while."""
        self.router.loop.call_soon_threadsafe(self.router.penalize, node)
        self.router.record_failover()
        return NodeFailed(node, f"node {node.name} failed ({why})")

    def lied(self, node: "NodeLink", why: str) -> NodeFailed:
        """The node answered what no honest node answers: banned, and the hop fails over."""
        self.router.loop.call_soon_threadsafe(self.router.ban, node, why)
        self.router.record_failover()
        return NodeFailed(node, f"node {node.name} was banned ({why})")

    def timeout(self, node: "NodeLink", expect: tuple[int, ...] | None, blocks: int, backward: bool) -> float:
        """--request-timeout, plus 4x what the node's measured speed says this request takes: at Bloom-176B
        width one 256 MB message is 4,679 positions, minutes of work for a CPU node."""
        if expect is None or node.speed <= 0:
            return self.router.request_timeout
        work = expect[0] * expect[1] * blocks * (3 if backward else 1)
        return self.router.request_timeout + min(3600.0, 4 * work / node.speed)  # (the speed is the node's word)

    def exchange(self, node: "NodeLink", make, expect: tuple[int, ...] | None, blocks: int = 1,
                 backward: bool = False, batched: bool = False) -> torch.Tensor | None:
        """One request (`make(msg_id)`) to `node`, its reply checked: a tensor of shape `expect` or None.

        `batched` (small generation steps): the request goes through the node's outbox, merged with the
        steps other jobs send it in the same wave, and its answer is its item of the reply.
        """
        if self.cancel.is_set():
            raise Cancelled("the job was cancelled (its client went away).")
        msg_id = node.next_id()
        timeout = self.timeout(node, expect, blocks, backward)
        if batched:
            try:
                reply = self.call(node.step(make(msg_id), timeout=timeout, wave=getattr(current_wave, "id", None)))
            except (UnavailableError, asyncio.TimeoutError, TimeoutError) as e:
                reply = e
            return self.step_answer(node, reply, msg_id, expect)
        try:
            reply = self.call(node.request(msg_id, node.channel.pack(make(msg_id)), timeout=timeout))
        except (UnavailableError, asyncio.TimeoutError, TimeoutError):
            raise self.failed(node, "disconnected or timed out") from None
        try:
            msg = node.channel.unpack(reply, self.limits)
        except AuthError:
            raise self._forged(node) from None
        except ProtocolError:
            raise self.lied(node, "sent a malformed reply") from None
        return self._answer(node, msg, msg_id, expect)

    def step_answer(self, node: "NodeLink", reply, msg_id: int, expect: tuple[int, ...] | None) -> torch.Tensor | None:
        """The answer to step `msg_id`, from what the node's outbox gave for it (`NodeLink.step`): its item
        of a shared Results reply, (BatchReply, index), checked; or the exception its exchange ended in."""
        if isinstance(reply, (UnavailableError, asyncio.TimeoutError, TimeoutError)):
            raise self.failed(node, "disconnected or timed out")
        if isinstance(reply, BaseException):
            raise reply
        shared, index = reply
        try:
            msg = shared.open(node.channel, self.limits)
        except AuthError:
            raise self._forged(node) from None
        except ProtocolError:
            raise self.lied(node, "sent a malformed reply") from None
        if not isinstance(msg, Results) or msg.id != shared.msg_id or len(msg.items) != shared.count:
            raise self.lied(node, f"answered {msg.type!r} with {len(getattr(msg, 'items', []))} items to "
                                  f"{shared.count} steps")
        return self._answer(node, msg.items[index], msg_id, expect)

    def _forged(self, node: "NodeLink") -> NodeFailed:
        """A reply failed authentication - altered on the way, not necessarily by the node: drop the link."""
        self.router.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(node.ws.close(1008, "bad frame")))
        return self.failed(node, "a reply failed authentication")

    def _answer(self, node: "NodeLink", msg, msg_id: int, expect: tuple[int, ...] | None) -> torch.Tensor | None:
        """The tensor a reply carries, if it is what an honest node answers to request `msg_id`."""
        if isinstance(msg, Error):
            if msg.code in FAILOVER_CODES:
                raise self.failed(node, f"answered {printable(msg.code, 32)}")
            # the request itself was refused (a limit, a bad session): tell the job, in the node's words
            raise SlowllmError(f"node {printable(node.name, 64)} refused the request: {printable(msg.message)}",
                               code="bad_input" if msg.code == "bad_input" else "error")
        if not isinstance(msg, Result) or msg.id != msg_id:
            raise self.lied(node, f"answered {msg.type!r} to a request")
        if msg.tensor is None:
            if expect is not None:
                raise self.lied(node, "answered no tensor")
            return None
        try:
            tensor = decode_tensor(msg.tensor, self.limits)
        except ProtocolError:
            raise self.lied(node, "sent an undecodable tensor") from None
        if expect is None or tuple(tensor.shape) != tuple(expect) or not tensor.is_floating_point():
            raise self.lied(node, f"sent a {msg.tensor.dtype} tensor of shape {list(tensor.shape)[:8]}, expected "
                                  f"{list(expect) if expect else 'none'}")
        if not torch.isfinite(tensor).all():
            raise self.lied(node, "sent non-finite values")
        self.served_by.add(node)
        return tensor.float()
