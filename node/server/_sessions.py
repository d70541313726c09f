"""A node's KV caches: one per generation session, under the --session-memory budget.

A step that would exceed the budget gets a "busy" error (retry later), one that could never fit a bad-input
error; sessions close when the coordinator says so or after an idle timeout. Never an out-of-memory crash.
"""

from __future__ import annotations

import threading
import time

from slowllm.node.engine._blocks import BlockCache
from slowllm.protocol import BusyError, InputError
from slowllm.utils._units import format_size


class Sessions:
    """Per-session KV caches with a byte budget, an idle timeout and explicit close.

    Used from the compute thread (steps, closes) and the event loop (heartbeat expiry, counts): every
    method holds the lock.
    """

    def __init__(self, budget: int, idle_timeout: float = 600.0):
        self.budget, self.idle_timeout = budget, idle_timeout
        self._caches: dict[str, dict[int, BlockCache]] = {}
        self._used: dict[str, float] = {}
        self._lock = threading.RLock()

    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes() for caches in self._caches.values() for c in caches.values())

    def get(self, session: str, layers: range, position_bytes: int, new: int, max_length: int) -> dict[int, BlockCache]:
        """The session's caches, with room for `new` more positions. Counts what is allocated: each
        block's buffers with their spare room, and while a buffer grows, the new one beside the old
        (`position_bytes`: keys and values of one position of one block, every row)."""
        return self.reserve(session, layers, position_bytes, new, max_length)[0]

    def reserve(self, session: str, layers: range, position_bytes: int, new: int, max_length: int,
                reserved: int = 0) -> tuple[dict[int, BlockCache], int]:
        """`get`, counting `reserved` bytes that steps merged into the same pass will add first; returns the
        caches and the bytes this step adds."""
        with self._lock:
            self.expire()
            caches = self._caches.get(session, {})
            need = (max((c.length for c in caches.values()), default=0) + new) * position_bytes * len(layers)
            if need > self.budget:
                raise InputError(f"a session of that length needs {format_size(need)} of KV cache on this node, "
                                 f"more than its --session-memory of {format_size(self.budget)}: use shorter or "
                                 "fewer prompts (or nodes with more memory).")
            # The blocks run one after another: while block i grows, its old and new buffers both exist,
            # blocks before it hold their new size and blocks after it their old one.
            held, peak = self.nbytes() + reserved, 0
            start = held
            for layer in layers:
                cache = caches.get(layer) or BlockCache(limit=max_length)
                before, after = cache.capacity * position_bytes, cache.capacity_for(new) * position_bytes
                if after != before:
                    peak = max(peak, held + after)
                    held += after - before
            if max(peak, held) > self.budget:
                raise BusyError(f"node is busy: its KV-cache budget of {format_size(self.budget)} is full; "
                                "retry in 10 s.")
            caches = self._caches.setdefault(session, {})
            for layer in layers:
                caches.setdefault(layer, BlockCache(limit=max_length)).limit = max_length
            self._used[session] = time.monotonic()
            return caches, held - start

    def past_length(self, session: str, layer: int) -> int:
        with self._lock:
            cache = self._caches.get(session, {}).get(layer)
            return 0 if cache is None else cache.length

    def truncate(self, session: str, layers: range, past: int) -> None:
        """Cut the session's caches of `layers` back to `past` positions (never forward)."""
        with self._lock:
            caches = self._caches.get(session, {})
            have = min((caches[layer].length if layer in caches else 0) for layer in layers)
            if past > have:
                raise InputError(f"session {session!r} holds {have} positions here, it cannot be rolled back to {past}.")
            for layer in layers:
                if layer in caches:
                    caches[layer].truncate(past)

    def close(self, session: str) -> bool:
        with self._lock:
            self._used.pop(session, None)
            return self._caches.pop(session, None) is not None

    def expire(self) -> None:
        with self._lock:
            now = time.monotonic()
            for s in [s for s, t in self._used.items() if now - t > self.idle_timeout]:
                self.close(s)

    def __len__(self) -> int:
        with self._lock:
            return len(self._caches)
