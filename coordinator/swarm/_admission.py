"""Admission control, the one path both front doors take (WebSocket jobs and the HTTP API): a bounded
number of jobs in all (--max-jobs) and per client (--max-jobs-per-client), and the counts /status shows.

Thread-safe: the WebSocket server and the HTTP API run on different event loops."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from slowllm.protocol import BusyError


class Admission:
    def __init__(self, max_jobs: int, max_jobs_per_client: int):
        self.max_jobs, self.max_jobs_per_client = max_jobs, max_jobs_per_client
        self._lock = threading.Lock()
        self.active = 0
        self.by_client: dict[str, int] = {}
        self.done: dict[str, int] = {}  # finished jobs per user (or address)
        self.running: list[dict] = []  # who runs what, for /status

    @contextlib.contextmanager
    def job(self, client: str, kind: str, via: str = "ws") -> Iterator[None]:
        """Hold an admission slot while the job runs, or BusyError (one sentence: when to retry)."""
        with self._lock:
            if self.active >= self.max_jobs:
                raise BusyError(f"the coordinator is busy with {self.active} jobs; retry in 5 s.")
            if self.by_client.get(client, 0) >= self.max_jobs_per_client:
                raise BusyError(f"busy: {self.max_jobs_per_client} of your jobs are already running; retry in 5 s "
                                "(or when one finishes).")
            self.active += 1
            self.by_client[client] = self.by_client.get(client, 0) + 1
            entry = {"user": client, "job": kind, "via": via, "started": round(time.time(), 1)}
            self.running.append(entry)
        finished = False
        try:
            yield
            finished = True
        finally:
            with self._lock:
                self.running.remove(entry)
                self.active -= 1
                self.by_client[client] -= 1
                if not self.by_client[client]:
                    del self.by_client[client]
                if finished:
                    self.done[client] = self.done.get(client, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"active_jobs": self.active, "jobs": [dict(r) for r in self.running], "jobs_done": dict(self.done)}
