"""Verification of a hop: is a node's answer what the blocks compute?

A hop (`Hop`: a forward span, a backward span, a session's step) knows how to be sent to a node, re-run
elsewhere, and recomputed by the coordinator's referee. `Verification.verified` decides which of those a
hop gets, and its outcome is the answer the job may use:

- a node the coordinator has never checked itself (on probation) has its hop recomputed by the referee
  (with the arithmetic the node declares), once: a node that lies from its first hop is banned and its
  answer never used;
- otherwise, with probability --verify, the hop is re-run elsewhere at the same time (one node covering
  the span or a route of several; the check costs compute, not latency). On a disagreement the referee
  decides and bans whoever is wrong; when they agree, the referee still recomputes a --verify fraction of
  those hops (and every hop where a checker is on probation), so two nodes that tell the same lie are
  caught too.
A lying node never changes the output of a hop the referee judged: the answer is one the referee
confirmed, or its own fp32 computation.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from slowllm.coordinator.swarm._verify import Referee, agree, referee_tolerance, tolerance
from slowllm.protocol import SlowllmError

if TYPE_CHECKING:
    from slowllm.coordinator.swarm._links import NodeLink
    from slowllm.coordinator.swarm._router import Router

log = logging.getLogger("slowllm")

# verification re-runs run beside the hop they check (one thread each while it lasts; jobs are <= 32)
_CHECKS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="slowllm-verify")


@dataclass
class Rerun:
    """A hop re-run elsewhere: its output and the nodes that computed it."""

    output: torch.Tensor
    nodes: list


@dataclass
class _Check:
    """The checks one hop gets: the referee's (on probation, or to settle a re-run) and a re-run elsewhere."""

    judge: bool  # the referee may decide
    probation: bool = False  # the node was never checked by the referee: it judges this hop
    rerun: concurrent.futures.Future | None = None  # the hop re-run on other nodes (a `Rerun` or None)


class Hop(Protocol):
    """Blocks first..last of one request: what verification needs to know of it."""

    first: int
    last: int
    mask: torch.Tensor

    def send(self, node: "NodeLink") -> torch.Tensor:
        """The hop's answer from `node` (raises NodeFailed)."""

    def again(self, avoid: set) -> Rerun | None:
        """The hop re-run on other nodes than `avoid`; None when it cannot be re-sent (too large)."""

    def truth(self, dtype: str, int8: bool) -> torch.Tensor | None:
        """The referee's own computation of the hop, in `dtype` (int8 weights if asked); None if too large."""


class Verification:
    """A chain's checks of its hops (--verify, probation), and the referee's verdicts."""

    def __init__(self, router: "Router", referee: Referee | None):
        self.router, self.referee = router, referee
        self.rng = random.Random()
        self._local = threading.local()  # marks the threads that run verification re-runs

    @property
    def checking(self) -> bool:
        """Is this thread running a verification re-run (which is never verified again, nor waits)?"""
        return getattr(self._local, "checking", False)

    def _rerun(self, hop: Hop, avoid: set) -> Rerun | None:
        self._local.checking = True
        try:
            return hop.again(avoid)
        finally:
            self._local.checking = False

    def verified(self, node: "NodeLink", hop: Hop) -> torch.Tensor:
        """`hop.send(node)`, checked as the module's docstring says; the answer the job may use."""
        check = self.check(node, hop)
        return self.conclude(node, hop, hop.send(node), check)

    def check(self, node: "NodeLink", hop: Hop) -> "_Check | None":
        """What checks `hop` gets when sent to `node` (None: none); a re-run starts now, beside the hop."""
        router = self.router
        judge = self.referee is not None and router.verify > 0 and not self.checking
        if judge and node.refereed == 0:
            return _Check(judge, probation=True)
        if self.checking or router.verify <= 0 or self.rng.random() >= router.verify:
            return None
        # checked by healthy nodes only: a node being avoided (it failed or timed out lately) would make the
        # job wait for its timeout just to check a hop
        now = time.monotonic()
        avoid = {node} | {x for x in router.nodes if x.avoid_until > now}
        if router.missing(hop.first, hop.last, exclude=avoid):  # no other node covers some of the span
            router.record_verification(None, agreed=None)
            return None
        return _Check(judge, rerun=_CHECKS.submit(self._rerun, hop, avoid))

    def conclude(self, node: "NodeLink", hop: Hop, out: torch.Tensor, check: "_Check | None") -> torch.Tensor:
        """The answer the job may use, once `node` answered `out` to `hop` and `check` has run."""
        if check is None:
            return out
        if check.probation:
            return self.judge(node, hop, out)
        router = self.router
        try:
            rerun = check.rerun.result()
        except (SlowllmError, concurrent.futures.CancelledError) as e:
            # the check could not run (a checker failed, refused, was busy, or the job was cancelled): the
            # user's answer stands unchecked, as when no second node covers the span
            log.info("verification of blocks %d-%d could not run: %s", hop.first, hop.last, e)
            router.record_verification(None, agreed=None)
            return out
        if rerun is None:  # too large to re-send
            router.record_verification(None, agreed=None)
            return out
        agreed = agree(out, rerun.output, hop.mask, tolerance(node.precision, *(x.precision for x in rerun.nodes)))
        router.record_verification(node, agreed=agreed)
        if not check.judge:
            return out
        if agreed and all(x.refereed for x in rerun.nodes) and self.rng.random() >= router.verify:
            return out
        if agreed:
            router.record_collusion_check()
        answer = self.judge(node, hop, out)
        if len(rerun.nodes) == 1:  # (a re-run over several nodes is wrong somewhere: each is judged as a primary)
            self.judge(rerun.nodes[0], hop, rerun.output)
        return answer

    def judge(self, node: "NodeLink", hop: Hop, out: torch.Tensor) -> torch.Tensor:
        """The referee's verdict on `node`'s answer `out`: the answer when it is right (the node counts as
        checked), else the node is banned and the referee's own computation is the answer."""
        int8 = node.quantization == "int8"
        reference = hop.truth(node.dtype, int8)
        if reference is None:  # (a session too long to recompute in one request: judged at a later hop)
            return out
        own = ["int8"] if self.referee.checkpoint.int8 and not int8 else []  # cannot reproduce its arithmetic
        if agree(out, reference, hop.mask, referee_tolerance(node.dtype, *own)):
            self.router.record_refereed(node)
            return out
        why = f"its answer for blocks {hop.first}-{hop.last} disagreed with the coordinator's own computation"
        self.router.loop.call_soon_threadsafe(self.router.ban, node, why)
        # the hop's answer: the coordinator's own, in full precision from its weights (not the int8 or bf16
        # arithmetic the liar declared: nothing of the liar's choosing shapes the output)
        return reference if node.dtype == "float32" and not int8 else hop.truth("float32", False)
