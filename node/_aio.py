"""Running the servers' event loops: uvloop where it is installed (faster frame handling), asyncio otherwise."""

from __future__ import annotations

import asyncio


def run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
