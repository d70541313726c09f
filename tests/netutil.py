"""Start real coordinator and node processes on 127.0.0.1 for network tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from slowllm.coordinator import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, model, layouts: list[str], *, secret_file=None, tmp=None, extra_coord=(), node_model=True):
        self.model, self.secret_file = str(model), secret_file
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env = env
        cmd = [sys.executable, "-m", "slowllm.coordinator._server_cli", "--model", self.model, "--port",
               str(self.port), "--wait-for-nodes", "20", *extra_coord]
        if secret_file:
            cmd += ["--secret-file", str(secret_file)]
        self.coordinator = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.procs.append(self.coordinator)
        line = self.coordinator.stdout.readline()
        assert "ready" in line and self.url in line, line
        for i, layers in enumerate(layouts):
            self.start_node(layers, name=f"n{i}-{layers}", model=node_model)
        self.wait_covered(len(layouts))

    def start_node(self, layers: str, name: str, model=True, secret_file="default", extra=()):
        cmd = [sys.executable, "-m", "slowllm.node._cli", "--layers", layers, "--coordinator", self.url, "--name", name,
               *extra]
        if model:
            cmd += ["--model", self.model if model is True else str(model)]
        sf = self.secret_file if secret_file == "default" else secret_file
        if sf:
            cmd += ["--secret-file", str(sf)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        self.procs.append(proc)
        self.nodes[name] = proc
        return proc

    def client(self, **kw) -> Client:
        return Client(self.url, secret_file=self.secret_file, **kw)

    def wait_covered(self, count: int, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.client().status()
            if len(status["nodes"]) >= count and not status["missing"]:
                return status
            time.sleep(0.2)
        raise AssertionError(f"nodes did not register: {status}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
