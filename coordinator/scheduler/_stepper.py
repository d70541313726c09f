"""The stepping loop: every running generation of the coordinator advances in the same waves.

Orca's iteration-level scheduling across a swarm. Each generation job (a client's CLI or Python job, or
the HTTP API's batcher) runs in its own thread and, per token, hands its pending steps to `Stepper.run`.
The stepper starts a wave once every generation currently running has handed in its steps (or
`GATHER_S` after the first did, so one slow job never holds the others for long): all of the wave's
sessions step at once, and each node is told how many of the wave's steps to expect, so its outbox sends
them as ONE Steps message and the node runs them as one merged pass (one weight read for all sessions).
New jobs join at the next wave; a finished one leaves at once (it stops handing in steps).

Each session's step keeps its own failover, replay, verification and cancellation (`RemoteSession.step`):
a step that fails answers its own job only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slowllm.coordinator.chains._chain import with_heads

if TYPE_CHECKING:
    from slowllm.coordinator.chains._remote import RemoteChain

GATHER_S = 0.05  # the longest a wave waits for running generations that have not handed in their steps


@dataclass(eq=False)
class _Entry:
    chain: "RemoteChain"
    steps: list  # (session, hidden, mask)
    heads: list | None  # per step, the logits it wants (`Head`) or None
    member: bool
    done: threading.Event = field(default_factory=threading.Event)
    outs: list | None = None
    error: BaseException | None = None


class Stepper:
    def __init__(self, gather: float = GATHER_S):
        self.gather = gather
        self._cond = threading.Condition()
        self._members = 0  # generations running now (inside `member()`)
        self._waiting: list[_Entry] = []
        self._local = threading.local()
        self._flying = 0  # member entries in waves in flight
        self.waves = 0  # (status and tests)
        # Waves run on kept threads: a wave's LM head is parallel work, and each new thread that starts
        # some builds its own OpenMP team (worker threads created, then left behind when it ends).
        self._wave_threads = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="slowllm-wave")
        self.steps = 0
        threading.Thread(target=self._loop, daemon=True, name="slowllm-stepper").start()

    @contextlib.contextmanager
    def member(self):
        """A running generation: the next wave waits (up to `gather`) for its steps."""
        with self._cond:
            self._members += 1
        self._local.member = True
        try:
            yield
        finally:
            self._local.member = False
            with self._cond:
                self._members -= 1
                self._cond.notify_all()

    def run(self, chain: "RemoteChain", steps: list, heads: list | None = None) -> list:
        """Outputs of `steps` [(session, hidden, mask)], stepped in the next wave; with `heads`, each as
        (hidden, logits), the wave's heads computed together (`with_heads`)."""
        entry = _Entry(chain, list(steps), None if heads is None else list(heads), getattr(self._local, "member", False))
        with self._cond:
            alone = entry.member and self._members == 1 and not self._waiting and not self._flying and len(steps) == 1
            if alone:
                self._flying += 1  # (a generation that starts meanwhile must not wait for this one's steps)
            else:
                self._waiting.append(entry)
                self._cond.notify_all()
        if alone:  # the only generation running: no wave to gather, no thread hand-offs (one client's latency)
            session, hidden, mask = steps[0]
            try:
                return with_heads([session.step(hidden, mask)], heads)
            finally:
                with self._cond:
                    self._flying -= 1
                    self._cond.notify_all()
        entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.outs

    def _loop(self) -> None:
        """Start a wave when every running generation not already in flight has handed in its steps (or
        `gather` after the first did). On a chain of D stages up to D waves are in flight, each with about
        1/D of the generations: while one group is at the second node, the next is at the first, and the
        coordinator's own work (heads, sampling) for one group overlaps the nodes' work for another."""
        waves = 0  # waves in flight
        while True:
            with self._cond:
                while not self._waiting or waves >= self._depth():
                    self._cond.wait()
                deadline = time.monotonic() + self.gather
                while (sum(e.member for e in self._waiting) < self._members - self._flying
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                cap = max(1, -(-self._members // self._depth()))
                wave, rest, taken = [], [], 0
                for entry in self._waiting:
                    if entry.member and taken >= cap:
                        rest.append(entry)
                        continue
                    taken += entry.member
                    wave.append(entry)
                self._waiting = rest
                self._flying, waves = self._flying + taken, waves + 1

            def run(wave=wave, taken=taken) -> None:
                nonlocal waves
                try:
                    self._wave(wave)
                except BaseException as e:  # noqa: BLE001 - a bug here must answer the jobs, not hang them
                    for entry in wave:
                        if not entry.done.is_set():
                            entry.error = e
                            entry.done.set()
                finally:
                    with self._cond:
                        self._flying, waves = self._flying - taken, waves - 1
                        self._cond.notify_all()
            self._wave_threads.submit(run)

    def _depth(self) -> int:
        chain = self._waiting[0].chain if self._waiting else None
        return max(1, chain.pipeline_depth) if chain is not None else 1

    def _wave(self, wave: list[_Entry]) -> None:
        self.waves += 1
        steps = [(entry, step) for entry in wave for step in entry.steps]
        self.steps += len(steps)
        outcomes = wave[0].chain.step_gang([step for _, step in steps])  # (every chain: the same router)
        # every generation's logits in as few calls as leave each its own: one read of the head for the wave
        paired = with_heads(outcomes, [head for entry in wave for head in (entry.heads or [None] * len(entry.steps))])
        outcomes = [p if entry.heads is not None or isinstance(p, BaseException) else p[0]
                    for (entry, _), p in zip(steps, paired)]
        i = 0
        for entry in wave:
            mine = outcomes[i: i + len(entry.steps)]
            i += len(entry.steps)
            failed = next((x for x in mine if isinstance(x, BaseException)), None)
            if failed is not None:
                entry.error = failed
            else:
                entry.outs = mine
            entry.done.set()
