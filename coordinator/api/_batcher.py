"""The batcher: one thread that drives every running HTTP request, one pass over the weights at a time.

Requests share passes: compatible requests that arrive together become one `Generation`, and every running
generation's next step goes into the same pass (`step_together`), so a request that arrives while others
generate joins the next pass (what makes local streaming usable by several users).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import queue
import threading
import time
from typing import Callable

from slowllm.coordinator.jobs._generate import Continuation, Generation
from slowllm.coordinator.jobs._options import Sampling
from slowllm.utils._openmp import ComputeThread

from ._openai import ApiError


@dataclasses.dataclass
class _Pending:
    rows: list[Continuation]
    sampling: Sampling
    soft_name: str | None
    future: concurrent.futures.Future
    cancelled: threading.Event

    def key(self) -> tuple:
        s = self.sampling
        if s.temperature == 0:
            return (0, self.soft_name)
        # a seeded request must get the same samples whoever else is waiting: it runs alone
        return (s.temperature, s.top_k, s.top_p, id(self) if s.seed is not None else None, self.soft_name)


class Batcher:
    """One thread that drives every running request, one pass over the weights at a time.

    Between passes it takes what arrived: compatible requests become one `Generation` (one batch), and
    every running generation's next step goes into the same pass (`step_together`). So a request that
    arrives while others generate joins the next pass; only the first request of an idle server waits
    `window` seconds for company.
    """

    def __init__(self, start: Callable[[list[Continuation], Sampling, str | None], Generation],
                 step: Callable[[list[Generation]], None], window: float = 0.05, max_pending: int = 256,
                 compute: ComputeThread | None = None):
        self.start, self.step, self.window, self.max_pending = start, step, window, max_pending
        self.queue: queue.Queue[_Pending] = queue.Queue()
        self.batches = 0  # generations started (the bench and the tests read it)
        self.passes = 0
        # on the thread that loaded the model, where there is one (see utils/_openmp.py)
        (compute or ComputeThread("slowllm-http-batcher")).submit(self._loop)

    def submit(self, pending: _Pending) -> None:
        if self.queue.qsize() >= self.max_pending:
            raise ApiError(429, f"{self.max_pending} requests are already waiting: retry in a few seconds.",
                           type="rate_limit_error", headers={"Retry-After": "5"})
        self.queue.put(pending)

    def _arrivals(self, block: bool) -> list[_Pending]:
        waiting = []
        if block:
            waiting.append(self.queue.get())
            time.sleep(self.window)  # requests that arrive together are generated together
        with contextlib.suppress(queue.Empty):
            while True:
                waiting.append(self.queue.get_nowait())
        return [p for p in waiting if not p.cancelled.is_set()]

    def _loop(self) -> None:
        running: list[tuple[Generation, list[_Pending]]] = []
        while True:
            groups: dict[tuple, list[_Pending]] = {}
            for p in self._arrivals(block=not running):
                groups.setdefault(p.key(), []).append(p)
            for group in groups.values():
                try:
                    job = self.start([row for p in group for row in p.rows], group[0].sampling, group[0].soft_name)
                except BaseException as e:  # e.g. a bad soft prompt: those requests learn why
                    for p in group:
                        p.future.set_exception(e)
                    continue
                self.batches += 1
                running.append((job, group))
            if not running:
                continue
            try:
                self.step([job for job, _ in running])
                self.passes += 1
            except BaseException as e:  # every running request learns why
                for job, group in running:
                    job.close()
                    for p in group:
                        p.future.set_exception(e)
                running = []
                continue
            still = []
            for job, group in running:
                if not job.done:
                    still.append((job, group))
                    continue
                results, at = job.results(), 0
                for p in group:
                    p.future.set_result(results[at:at + len(p.rows)])
                    at += len(p.rows)
            running = still
