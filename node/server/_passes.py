"""The node's compute thread: requests queue for it, and each pass runs what is waiting, merged.

Each pass takes what arrived while the previous one ran (an idle node starts at once): every generation
step queued, of any session, merged into one pass over the blocks (`engine/_merge.py`), then one forward
batch (with others of the same blocks merged in), chosen round robin by the coordinator's job tags so a
bulk scoring job cannot starve a prompt. Each request's failure is an error reply for that request alone;
a failure of a merged pass answers each request in it.

`ComputePasses` is the half of `NodeServer` that runs on the compute thread (mixed in: it reads the node's
blocks, sessions and limits); `_Queue` is one connection's waiting requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from dataclasses import dataclass, field

import torch

from slowllm.node.engine._families import kv_width
from slowllm.node.engine._merge import (StepPart, merge_rows, plan_block_steps, plan_forwards, run_merged_forwards,
                                        run_merged_steps)
from slowllm.protocol import (Backward, Channel, CloseSession, Error, Forward, InputError, Limits, ProtocolError,
                              Result, Results, SlowllmError, Step, Steps, decode_tensor, encode_tensor)

log = logging.getLogger("slowllm.node")
HANG = object()  # failure injection: the request is never answered
_PENDING = object()  # a request not run yet


@dataclass(eq=False)
class _Frame:
    """A received request frame: its message and what runs of it (one item, or each step of a Steps)."""

    future: asyncio.Future  # resolved on the event loop with (message, reply frame) or an exception
    msg: object
    works: list = field(default_factory=list)


@dataclass(eq=False)
class _Work:
    """One request the compute thread runs: a message, or one step of a Steps message."""

    msg: object
    frame: _Frame
    outcome: object = _PENDING  # the output tensor, None, or the exception that answers it
    inputs: tuple | None = None  # decoded (hidden, mask), once it runs


@dataclass(eq=False)
class _Queue:
    """One connection's requests: frames the event loop received, and what the compute thread has opened
    and not yet run (`backlog`, touched by the compute thread only, between passes by nobody else)."""

    channel: Channel
    limits: Limits = field(default_factory=Limits)  # what its coordinator announced
    tag: str = ""  # namespaces its coordinator's session ids in the node's shared KV budget
    waiting: list = field(default_factory=list)  # (frame, future), appended by the event loop
    backlog: list = field(default_factory=list)
    worker: asyncio.Task | None = None
    served: dict = field(default_factory=dict)  # job tag -> the pass that last ran one of its forwards
    passes: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))  # (requests, rows)

    def depth(self) -> int:
        return len(self.waiting) + len(self.backlog)

    def session_key(self, session: str) -> str:
        """A session of this connection's coordinator in the node's KV caches, which every coordinator's
        sessions share: apart from another coordinator's session of the same id."""
        return self.tag + session


class ComputePasses:
    """What runs on the node's compute thread (`NodeServer` mixes it in)."""

    def _pass(self, queue: _Queue, frames: list) -> list[tuple[asyncio.Future, object]]:
        """Open the new frames, run one pass over what is waiting, and return each answered frame's
        outcome: (request, reply frame), (notice, None), (request, HANG), or the exception to answer."""
        done: list[tuple[asyncio.Future, object]] = []
        frames.reverse()
        while frames:  # each raw frame is dropped once opened: a flood of 4 MB frames is held once, not twice
            frame, future = frames.pop()
            try:
                msg = queue.channel.unpack(frame, queue.limits)
            except BaseException as e:  # noqa: BLE001 - a malformed or forged frame answers itself
                done.append((future, e))
                continue
            finally:
                del frame
            if isinstance(msg, Error) and msg.id is None:
                done.append((future, (msg, None)))
                continue
            if not isinstance(msg, (Forward, Backward, Step, Steps, CloseSession)):
                done.append((future, ProtocolError(f"a node does not accept {msg.type!r} messages.")))
                continue
            self.requests += 1
            if self.fault and self.requests >= self.fault[1]:
                if self.fault[0] == "exit":
                    os._exit(137)
                done.append((future, (msg, HANG)))
                continue
            record = _Frame(future, msg)
            record.works = [_Work(m, record) for m in (msg.items if isinstance(msg, Steps) else [msg])]
            if not record.works:
                done.append((future, (msg, queue.channel.pack(Results(id=msg.id, items=[])))))
            queue.backlog.extend(record.works)
        chosen = self._choose(queue)
        if chosen:
            queue.passes += 1
            self._run(queue, chosen)
            chosen = [w for w in chosen if w.outcome is not _PENDING]  # (the rest wait for the next pass)
            rows = sum(w.inputs[0].shape[0] for w in chosen if w.inputs is not None)
            queue.recent.append((len(chosen), rows))
        answered = {id(w.frame): w.frame for w in chosen}
        queue.backlog = [w for w in queue.backlog if w.outcome is _PENDING]
        for record in answered.values():
            if all(w.outcome is not _PENDING for w in record.works):
                done.append((record.future, self._reply(queue.channel, record)))
        return done

    def _choose(self, queue: _Queue) -> list[_Work]:
        """What this pass runs: every close and every generation step waiting (interactive work goes first,
        merged), then one forward or backward (the job served longest ago first, round robin) with the
        waiting forwards of the same blocks that merge with it."""
        chosen = [w for w in queue.backlog if isinstance(w.msg, (Step, CloseSession))]
        bulk = [w for w in queue.backlog if isinstance(w.msg, (Forward, Backward))]
        if not bulk:
            return chosen
        first = min(bulk, key=lambda w: queue.served.get(w.msg.job, -1))  # (min keeps arrival order on ties)
        queue.served[first.msg.job] = queue.passes
        if len(queue.served) > 1024:  # tags are the coordinator's word: keep the recent ones, bounded
            queue.served = dict(sorted(queue.served.items(), key=lambda kv: kv[1])[-512:])
        if not isinstance(first.msg, Forward) or len(first.msg.mask.shape) != 2:
            return chosen + [first]
        # merged with waiting forwards of the same blocks, planned from the shapes their headers declare
        # (decoded only once they run: a flood of queued forwards is never held decoded)
        candidates = [first] + [w for w in bulk if w is not first and isinstance(w.msg, Forward)
                                and (w.msg.first, w.msg.last) == (first.msg.first, first.msg.last)
                                and len(w.msg.mask.shape) == 2]
        group = plan_forwards([tuple(w.msg.mask.shape) for w in candidates], queue.limits.max_batch_tokens)[0]
        return chosen + [candidates[i] for i in group]

    def _run(self, queue: _Queue, chosen: list[_Work]) -> None:
        """Give every chosen request its outcome."""
        steps: dict[tuple[int, int], list[tuple[_Work, StepPart]]] = {}
        forwards: list[_Work] = []
        reserved, stepping = 0, set()
        now = self._steps_now(chosen)
        for w in chosen:
            if isinstance(w.msg, Step):
                key = queue.session_key(w.msg.session)
                if id(w) not in now or key in stepping:  # a prompt's turn, or a second step: a later pass
                    continue
                stepping.add(key)
            try:
                if isinstance(w.msg, CloseSession):
                    if not self.sessions.close(queue.session_key(w.msg.session)):
                        raise InputError(f"unknown session {w.msg.session!r}: it was closed or expired.")
                    w.outcome = None
                elif isinstance(w.msg, Step):
                    part, grows = self._step_part(queue, w.msg, reserved)
                    reserved += grows
                    w.inputs = (part.hidden, part.mask)
                    steps.setdefault((w.msg.first, w.msg.last), []).append((w, part))
                elif isinstance(w.msg, Forward):
                    w.inputs = self._tensors(queue.limits, w.msg)
                    forwards.append(w)
                else:
                    hidden, mask = w.inputs = self._tensors(queue.limits, w.msg)
                    grad = decode_tensor(w.msg.grad, queue.limits)
                    if grad.shape != hidden.shape:
                        raise InputError(f"gradient shape {list(grad.shape)} differs from hidden shape "
                                         f"{list(hidden.shape)}.")
                    w.outcome = self.blocks.backward(hidden, mask, grad, w.msg.first, w.msg.last)
            except BaseException as e:  # noqa: BLE001 - this request's answer; the others run
                w.outcome = e
        groups = []  # (positions, first, last, [(work, part)])
        for (first, last), entries in steps.items():
            parts = [p for _, p in entries]
            for group in plan_block_steps(self.blocks, parts, self.dtype, self.score_budget,
                                          queue.limits.max_batch_tokens, self._merge_rows()):
                chosen_entries = [entries[i] for i in group]
                positions = sum(p.hidden.shape[0] * p.hidden.shape[1] for _, p in chosen_entries)
                groups.append((positions, first, last, chosen_entries))
        # One merged pass of steps per pass, the smallest first (decode steps before prompts): the rest wait
        # for the next pass, with whatever arrives meanwhile. Each request is answered as soon as it ran, so
        # while this node runs one session's prompt, the next node already runs the one before (prompts that
        # arrive together cross a chain as a pipeline, not as one lump that every stage waits for).
        groups.sort(key=lambda g: g[0])
        for _, first, last, entries in groups[1:]:
            for w, _ in entries:
                w.inputs = None  # decoded and checked again when its pass comes
        if groups:
            _, first, last, entries = groups[0]
            self._answer_together([w for w, _ in entries],
                                  lambda: run_merged_steps(self.blocks, [p for _, p in entries], first, last))
        if forwards:
            self._answer_together(forwards, lambda: run_merged_forwards(
                self.blocks, [w.inputs for w in forwards], forwards[0].msg.first, forwards[0].msg.last))

    def _steps_now(self, chosen: list[_Work]) -> set[int]:
        """The steps this pass may run, from the shapes their headers declare (none is decoded yet): every
        step the kernels can merge, or else the smallest prompt (the first of equals). A prompt waiting for
        its turn is decoded and checked only when it comes: queued prompts are not decoded pass after pass
        (at Bloom-176B width a 2,000-token prompt is 57 MB)."""
        steps = [w for w in chosen if isinstance(w.msg, Step)]
        limit = self._merge_rows()
        small = [w for w in steps if _positions(w.msg) <= limit]
        return {id(w) for w in small or sorted(steps, key=lambda w: _positions(w.msg))[:1]}

    def _merge_rows(self) -> int:
        """The most rows one merged decode pass may hold (`merge_rows`)."""
        return merge_rows(self.blocks)

    @staticmethod
    def _answer_together(works: list[_Work], run) -> None:
        """Run a merged pass; its failure answers every request in it."""
        try:
            outs = run()
        except BaseException as e:  # noqa: BLE001
            if not isinstance(e, SlowllmError):
                log.exception("a merged pass of %d requests failed", len(works))
            for w in works:
                w.outcome = e
            return
        for w, out in zip(works, outs):
            w.outcome = out

    def _reply(self, channel: Channel, record: _Frame):
        """The reply to an answered frame: (request, frame), or the exception that answers a single request."""
        if isinstance(record.msg, Steps):
            items = []
            for w in record.works:
                if isinstance(w.outcome, BaseException):
                    items.append(_error(w.msg.id, w.outcome))
                else:
                    items.append(Result(id=w.msg.id, tensor=encode_tensor(w.outcome)))
            return record.msg, channel.pack(Results(id=record.msg.id, items=items))
        outcome = record.works[0].outcome
        if isinstance(outcome, BaseException):
            return outcome
        codec = record.msg.compression if isinstance(record.msg, Forward) else "raw"
        return record.msg, channel.pack(Result(id=record.msg.id,
                                               tensor=None if outcome is None else encode_tensor(outcome, codec)))

    def _tensors(self, limits: Limits, msg, past: int = 0):
        hidden = decode_tensor(msg.hidden, limits)
        mask = decode_tensor(msg.mask, limits)
        self.blocks.check_range(msg.first, msg.last)
        self.blocks.check_inputs(hidden, mask, past)
        if hidden.shape[0] * mask.shape[1] > limits.max_batch_tokens:
            raise InputError(f"batch x length {hidden.shape[0] * mask.shape[1]} exceeds this node's limit of "
                             f"{limits.max_batch_tokens}: send smaller batches.")
        return hidden, mask

    def _step_part(self, queue: _Queue, msg: Step, reserved: int) -> tuple[StepPart, int]:
        """A step checked and its caches reserved (the mask covers the session's past tokens plus the new
        ones); and the KV bytes it will add."""
        layers = range(msg.first, msg.last + 1)
        key = queue.session_key(msg.session)
        self.blocks.check_range(msg.first, msg.last)
        if msg.past is not None:
            self.sessions.truncate(key, layers, msg.past)
        lengths = {self.sessions.past_length(key, layer) for layer in layers}
        if len(lengths) > 1:  # stepped over other blocks before: its caches cannot serve one pass
            raise InputError(f"session {msg.session!r} holds {min(lengths)}-{max(lengths)} positions in blocks "
                             f"{msg.first}-{msg.last}: step a session over the same blocks every time.")
        past = lengths.pop()
        hidden, mask = self._tensors(queue.limits, msg, past)
        if mask.shape[1] > msg.max_length:
            raise InputError(f"session {msg.session!r} reached its max length of {msg.max_length} tokens.")
        # keys and values of one position of one block, every row (GQA: fewer numbers than hidden)
        position_bytes = 2 * kv_width(self.blocks.config) * self.dtype.itemsize * hidden.shape[0]
        caches, grows = self.sessions.reserve(key, layers, position_bytes, hidden.shape[1], msg.max_length,
                                              reserved)
        return StepPart(hidden, mask, caches, key), grows


def _positions(msg: Step) -> int:
    """Rows x new positions a step declares (a malformed shape counts 0: its error comes first)."""
    shape = msg.hidden.shape
    return shape[0] * shape[1] if len(shape) == 3 else 0


def _error(msg_id: int, e: BaseException) -> Error:
    """One step's failure as an item of a Results reply."""
    if isinstance(e, SlowllmError):
        return Error(id=msg_id, code=e.code, message=str(e)[:4000])
    log.error("request failed: %r", e)
    return Error(id=msg_id, code="internal", message=f"node failed on this request: {type(e).__name__}")
