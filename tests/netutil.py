"""Real coordinator and node processes on 127.0.0.1 for network tests (slowllm's own LocalCluster)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from slowllm.coordinator.demo._launch import LocalCluster as Cluster  # noqa: F401


def _ephemeral_low() -> int:
    """The first port of the range the OS hands out for port 0 and outgoing connections (Linux's default
    32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now, for a process the test starts next, chosen below the OS's ephemeral range: a port
    from bind(0) is free again once returned, and the OS may hand it straight back to the next bind(0) or
    outgoing connection (a coordinator's own WebSocket port once took the HTTP port a test had picked:
    "address already in use")."""
    low = _ephemeral_low()
    for _ in range(100 if low > 1024 else 0):  # (a range that starts at 1024 leaves nothing below it)
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (nothing free below the range: any port, as before)
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
