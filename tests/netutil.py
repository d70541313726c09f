"""Real coordinator and node processes on 127.0.0.1 for network tests (slowllm's own LocalCluster)."""

from __future__ import annotations

import socket

from slowllm.coordinator._launch import LocalCluster as Cluster  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
