"""A wave's decode steps, hop by hop from one thread.

The stepping loop hands a chain the steps of every generation running (`scheduler/_stepper.py`). Each
session's step could walk its own route on its own thread (as a step alone does), but then every hop of
every session is a hand-off from its thread to the event loop and back: with 8 sessions on 2 nodes that
is 16 thread wake-ups per token on a coordinator that shares its CPU with the nodes (measured: a wave's
hops took ~45 ms for ~20 ms of node compute). Here the wave moves together: at each hop, every session's
Step for a node is built on this thread and the node gets them in one Steps message (the node's outbox,
`swarm/_links.py`); one call to the event loop sends to every node of the hop and waits for the replies.

Each session keeps what it has alone: its own message (session id, mask, rollback cut, job tag), its own
checks of its item (`Exchanges.step_answer`: shape, finiteness, a lie bans the node), and failover: a
session whose node fails continues on its own thread from that hop (`RemoteSession.walk` rebuilds the span
by replay), the others go on. Steps that need more (a hop cut into several frames, a step too large to
merge, `--verify` re-running hops on other nodes) walk alone on their threads, as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from slowllm.coordinator.swarm._links import merges

from ._exchange import Cancelled, NodeFailed

if TYPE_CHECKING:
    from slowllm.coordinator.swarm._router import Router

    from ._session import RemoteSession


def together(session: "RemoteSession", hidden: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether this step can hop with the wave: one frame per hop, merged at the node."""
    return merges(hidden) and session.chain.step_positions(hidden.shape[0], mask.shape[1]) >= hidden.shape[1]


@dataclass(eq=False)
class _Walk:
    """One session's step on its way through its spans."""

    session: "RemoteSession"
    hidden: torch.Tensor  # the input of span `index`
    mask: torch.Tensor
    index: int = 0


def step_wave(router: "Router", steps: list, alone: concurrent.futures.Executor) -> list:
    """Each step's (session, hidden, mask) output, or the exception that answers it; sessions whose node
    fails go on with their failover on `alone`'s threads."""
    outcomes: list = [None] * len(steps)
    walks = {i: _Walk(session, hidden.float(), mask) for i, (session, hidden, mask) in enumerate(steps)}
    rebuilt: dict[int, concurrent.futures.Future] = {}  # sessions that went on alone
    while walks:
        hops = []  # (i, hop, check, node, msg_id, Step, timeout)
        for i, walk in list(walks.items()):
            session = walk.session
            if session.chain.cancel.is_set():
                outcomes[i] = Cancelled("the job was cancelled (its client went away).")
                del walks[i]
                continue
            span = session.enter(walk.index, walk.hidden, walk.mask)
            hop = session.hop(span, walk.hidden, walk.mask)
            node, msg_id = span.node, span.node.next_id()
            check = session.chain.verification.check(node, hop)  # (a re-run starts beside the hop)
            timeout = session.chain.exchanges.timeout(node, tuple(walk.hidden.shape), span.last - span.first + 1,
                                                      False)
            hops.append((i, hop, check, node, msg_id, hop.message(node, msg_id, 0, walk.hidden.shape[1]), timeout))
        replies = _exchange(router, [(node, msg, timeout) for *_, node, _, msg, timeout in hops])
        for (i, hop, check, node, msg_id, _, _), reply in zip(hops, replies):
            walk, x = walks[i], walks[i].session.chain.exchanges
            hop.span.cut = None  # the node has cut its cache
            try:
                out = x.step_answer(node, reply, msg_id, tuple(walk.hidden.shape))
                if check is not None:  # re-run elsewhere or judged: that wait is this session's alone
                    rebuilt[i] = alone.submit(_checked, walk, node, hop, out, check)
                    del walks[i]
                    continue
                walk.hidden = out
                walk.index += 1
                if walk.index == len(walk.session.spans):
                    outcomes[i] = walk.hidden
                    del walks[i]
            except NodeFailed as e:  # this session's span is rebuilt by replay, on its own
                rebuilt[i] = alone.submit(walk.session.walk, walk.hidden, walk.mask, walk.index, e.node)
                del walks[i]
            except BaseException as e:  # noqa: BLE001 - refused or cancelled: this step's job hears it
                outcomes[i] = e
                del walks[i]
    for i, future in rebuilt.items():
        try:
            outcomes[i] = future.result()
        except BaseException as e:  # noqa: BLE001
            outcomes[i] = e
    return outcomes


def _checked(walk: _Walk, node, hop, out: torch.Tensor, check) -> torch.Tensor:
    """A session's step once its checked hop's answer came: the check's verdict, then the spans after it."""
    out = walk.session.chain.verification.conclude(node, hop, out, check)
    return walk.session.walk(out, walk.mask, walk.index + 1)


def _exchange(router: "Router", items: list) -> list:
    """Send every (node, Step, timeout) through its node's outbox in one turn of the event loop (each
    node's steps leave as one Steps message); each one's (BatchReply, index) or exception."""
    async def send_all():
        return await asyncio.gather(*(node.step(msg, timeout=timeout) for node, msg, timeout in items),
                                    return_exceptions=True)
    return asyncio.run_coroutine_threadsafe(send_all(), router.loop).result()
