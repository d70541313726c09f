"""Real coordinator and node processes on 127.0.0.1 for network tests (slowllm's own LocalCluster)."""

from __future__ import annotations

import socket

from slowllm.coordinator.demo._launch import LocalCluster as Cluster  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- adversarial peers are written with slowllm.protocol's own handshake ---------------------------------
async def connect_as(url: str, secret: bytes | None, role: str = "client", name: str = "", **kwargs):
    """(ws, channel) of a connection authenticated as `role`, for tests that send their own frames."""
    import websockets

    from slowllm.protocol import PeerHandshake

    ws = await websockets.connect(url, max_size=None, **kwargs)
    hs = PeerHandshake(role, secret, name)
    await ws.send(hs.hello())
    await ws.send(hs.on_challenge(await ws.recv()))
    hs.on_welcome(await ws.recv())
    return ws, hs.channel


async def accept_as_coordinator(ws, secret: bytes | None, info: dict | None = None, fingerprint: str = "x",
                                n_layer: int = 6):
    """Play the coordinator's side of the handshake with a node that dialled in; returns the channel."""
    from slowllm.protocol import CoordinatorHandshake

    keys = None if secret is None else (lambda role: [(role, secret)])
    hs = CoordinatorHandshake(keys, fingerprint, n_layer)
    await ws.send(hs.on_hello(await ws.recv()))
    await ws.send(hs.on_auth(await ws.recv(), info or {}))
    return hs.channel
