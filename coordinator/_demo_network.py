"""The network half of `slowllm demo` (coordinator + three nodes on 127.0.0.1)."""

from __future__ import annotations


def run_network(model, local: dict) -> int:
    print("network mode: not yet available in this version; local mode passed.")
    return 0
