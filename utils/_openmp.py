"""How slowllm's processes share CPU cores; applied by each command before torch is imported.

torch's CPU parallelism is OpenMP (libgomp in the PyPI wheels). After each parallel region libgomp's
worker threads spin for GOMP_SPINCOUNT iterations (default 300,000: milliseconds) before they sleep. When
one PC runs several slowllm processes (a coordinator beside its nodes, two nodes, the tests), a process
that has just answered keeps both cores spinning while the next process in the chain computes. Measured
on 2 cores, a coordinator + 3 bf16 nodes on loopback: 1.55x the in-process time per token with the
default, 1.15-1.27x with 10,000 (~0.1-0.3 ms; one process computing alone changes by under 2%). fp32
nodes are the exception: MKL's fp32 GEMV leaves a core idle, and there 100,000 measured 1.09-1.14x
against 1.24-1.29x (docs/swarm.md's "CPU threads" says so); the node cannot know its dtype before torch is
imported, so that is left to the user. An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept as set.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future

SPIN_COUNT = 10_000


def share_cores(threads: int | None = None, alone: bool = False) -> None:
    """Before torch is imported: the spin count above, and `threads` compute threads if given (--threads).

    `alone`: this process is the only one computing (`--local` jobs), so its workers keep libgomp's own
    spinning: nothing else needs the cores between its parallel regions, and a worker woken from sleep
    costs each region its wake-up (bloom-1b7 shape in one process, bf16, 1 prompt, interleaved runs of
    two processes: 92.8 ms/token median with 10,000, 88.9 with libgomp's 300,000).

    On a PC in use, fewer threads than cores can be faster: every parallel region waits for its slowest
    thread, and a thread on a core another program keeps busy is slow. Measured on 2 cores, bloom-1b7
    shape, 8 blocks, bf16, one token: idle, 2 threads 91 ms and 1 thread 160; beside a CPU-bound process,
    2 threads 181 ms and 1 thread 160 (transformers, 2 threads: 108 idle, 383 busy). So the default stays
    all cores, and `--threads` is the cores a volunteer can spare."""
    if "OMP_WAIT_POLICY" not in os.environ and not alone:
        os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)


def positive_threads(text: str) -> int:
    """argparse type of --threads."""
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: give a whole number of threads, 1 or more.")
    return int(text)


class ComputeThread:
    """One daemon thread that runs the process's torch work in order: load on it, then compute on it.

    torch's CPU parallelism is an OpenMP team per thread that starts parallel work; once a process has
    two teams, libgomp sees more threads than cores and makes every team's workers sleep between parallel
    regions instead of spinning, and each of a decode step's hundreds of small regions then waits for a
    futex wake-up (24 bf16 blocks at hidden 1024: 60 ms per token instead of 37 after loading on another
    thread). A daemon thread, unlike a ThreadPoolExecutor's, lets the process exit while a long-running
    task (a server's batch loop) is on it.
    """

    def __init__(self, name: str = "slowllm-compute"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the caller's to handle, as with an executor
                future.set_exception(e)
