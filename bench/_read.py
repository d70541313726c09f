"""The cold-read baseline the streaming benchmarks divide by: every byte of the files, read with as many
readers at once as slowllm's streaming uses (node/engine/_checkpoint.py `touch`), so the ratio compares like
with like (a single reader understates what the disk gives: slowllm would look better than it is)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIECE = 64 << 20


def read_files(paths: list[Path], threads: int | None = None) -> int:
    """Read the files in 64 MB pieces with `threads` readers (default: slowllm's); returns the bytes read."""
    from slowllm.node.engine._checkpoint import _TOUCH_THREADS

    pieces = [(p, at) for p in paths for at in range(0, p.stat().st_size, PIECE)]

    def one(piece) -> int:
        path, at = piece
        fd = os.open(path, os.O_RDONLY)
        try:
            return len(os.pread(fd, PIECE, at))
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=threads or _TOUCH_THREADS) as pool:
        return sum(pool.map(one, pieces))
