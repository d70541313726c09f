"""Event loops and connections: uvloop where it is installed (faster frame handling), asyncio otherwise;
and one line explaining why a WebSocket connection failed, for nodes and clients alike."""

from __future__ import annotations

import asyncio
import ssl


def run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def why_connection_failed(e: BaseException, url: str) -> str:
    """One line for a failed connection, with the likely fix where there is one."""
    import websockets

    from slowllm.protocol import AuthError, ProtocolError

    if isinstance(e, websockets.InvalidStatus):
        return (f"answered HTTP {e.response.status_code} instead of a WebSocket (a proxy, or not a slowllm "
                "coordinator at this URL?)")
    if isinstance(e, ssl.SSLError) or (url.startswith("wss://") and isinstance(e, ConnectionResetError)):
        return f"TLS failed ({type(e).__name__}): is the coordinator serving wss://? if not, use ws://"
    if isinstance(e, websockets.InvalidMessage):
        cause = str(e.__cause__ or e)[:120] or type(e.__cause__).__name__
        hint = ": if it serves TLS, use wss://" if url.startswith("ws://") else ""
        return f"did not answer a WebSocket handshake ({cause}){hint}"
    if isinstance(e, websockets.InvalidHandshake):
        return f"WebSocket handshake failed ({e})"
    if isinstance(e, ProtocolError):
        return f"protocol error ({e})"
    if isinstance(e, AuthError):
        return f"authentication failed ({e})"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (not running yet, or wrong port?)"
    return f"unreachable ({type(e).__name__})"
