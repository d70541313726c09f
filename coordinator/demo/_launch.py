"""A coordinator and nodes as child processes on 127.0.0.1: for the demo, the tests and the benchmarks."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
import time

from slowllm.coordinator.client._client import Client
from slowllm.protocol import SlowllmError


class LocalCluster:
    def __init__(self, model, layer_ranges: list[str], *, secret_file=None, coordinator_args=(),
                 node_args=(), node_model: bool = True, timeout: float = 120, port: int = 0,
                 cafile=None, client_secret_file=None):
        self.model, self.secret_file = str(model), secret_file
        self.client_secret_file = client_secret_file or secret_file  # a client key, with --client-keys
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen] = []
        self._lines: dict[int, collections.deque] = {}
        self._drains: dict[int, threading.Thread] = {}
        self.nodes: dict[str, subprocess.Popen] = {}
        self._coordinator_cmd = [sys.executable, "-m", "slowllm.coordinator.cli._coordinator", "--model", self.model,
                                 "--port", str(port), *coordinator_args]
        if secret_file:
            self._coordinator_cmd += ["--secret-file", str(secret_file)]
        self.cafile = cafile
        self.node_args = tuple(node_args) + (("--cafile", str(cafile)) if cafile else ())
        try:
            self.start_coordinator()
            for i, layers in enumerate(layer_ranges):
                self.start_node(layers, name=f"n{i}-{layers}", model=node_model)
            if layer_ranges:
                self.wait_covered(len(layer_ranges), timeout)
        except BaseException:
            self.stop()
            raise

    def start_coordinator(self) -> None:
        """Start (or, after it was stopped, restart on the same port) the coordinator."""
        self.coordinator = self._spawn(self._coordinator_cmd)
        deadline = time.time() + 120
        while not (found := re.search(r"ready at (wss?://\S+)", self.output(self.coordinator))):
            if self.coordinator.poll() is not None or time.time() > deadline:
                time.sleep(0.2)  # the last lines of a dead process are still being drained
                raise SlowllmError(f"the coordinator did not start: {self.output(self.coordinator).strip() or 'no output'}")
            time.sleep(0.05)
        self.ready_line = next(ln for ln in self.output(self.coordinator).splitlines() if "ready at" in ln)
        self.url = found.group(1)
        port = self.url.rsplit(":", 1)[1]
        self._coordinator_cmd[self._coordinator_cmd.index("--port") + 1] = port

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        self.procs.append(proc)
        # Drain the pipe all the time: a child whose pipe fills up (64 KB of log lines) blocks on its next
        # write, and a blocked coordinator or node looks exactly like a hung one.
        lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._lines[proc.pid] = lines
        drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True, name=f"drain-{proc.pid}")
        drain.start()
        self._drains[proc.pid] = drain
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        """`proc`'s exit status once it exits, with all its output drained into `output(proc)`."""
        code = proc.wait(timeout)
        self._drains[proc.pid].join(10)
        return code

    def output(self, proc: subprocess.Popen) -> str:
        """What `proc` printed so far (its last 2000 lines)."""
        return "".join(list(self._lines.get(proc.pid, ())))

    def start_node(self, layers: str, name: str, model=True, secret_file="default", extra=(),
                   coordinators: list[str] | None = None) -> subprocess.Popen:
        """A node of `layers` serving this cluster's coordinator (or `coordinators`, each given in turn)."""
        urls = [a for url in (coordinators or [self.url]) for a in ("--coordinator", url)]
        cmd = [sys.executable, "-m", "slowllm.node.server._cli", "--layers", layers, *urls,
               "--name", name, *self.node_args, *extra]
        if model:
            cmd += ["--model", self.model if model is True else str(model)]
        secret = self.secret_file if secret_file == "default" else secret_file
        if secret:
            cmd += ["--secret-file", str(secret)]
        self.nodes[name] = self._spawn(cmd)
        return self.nodes[name]

    def client(self, **kw) -> Client:
        return Client(self.url, secret_file=self.client_secret_file, **{"cafile": self.cafile, **kw})

    def wait_covered(self, count: int, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while True:
            status = self.client().status()
            if len(status["nodes"]) >= count and not status["missing"]:
                return status
            if time.time() > deadline:
                raise SlowllmError(f"{count} nodes did not register within {timeout:.0f} s (missing blocks "
                                   f"{status['missing']}).")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
