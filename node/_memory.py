"""Memory budget arithmetic and a store that keeps tensors in RAM until the budget says disk.

Streaming Bloom-176B on a 16 GB PC only works if every byte is accounted for: blocks in flight, the
model's ends, activations, KV caches. `SpillStore` holds activations and caches: in RAM while they fit
its byte budget, otherwise in safetensors files under a temporary directory that is removed on close.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

from slowllm.protocol import InputError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'16GB', '1.5g', '512MiB', '1000000' -> bytes (binary units: 1 GB = 2**30 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read size {text!r}: write it like 12GB, 800MB or 1.5GiB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def default_max_ram() -> int:
    """A safe share of what the machine has free now: 80% of available memory."""
    return int(psutil.virtual_memory().available * 0.8)


def process_rss() -> int:
    return psutil.Process().memory_info().rss


class SpillStore:
    """Tensors by key, in RAM while under `budget` bytes, otherwise spilled to temporary files."""

    def __init__(self, budget: int, directory: str | os.PathLike | None = None):
        self.budget = budget
        self._parent = directory
        self._dir: Path | None = None
        self._ram: dict[object, dict[str, torch.Tensor]] = {}
        self._disk: dict[object, Path] = {}
        self._ram_bytes = 0
        self.spilled_bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(tensors: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def put(self, key, tensors: dict[str, torch.Tensor]) -> None:
        self.pop(key)
        size = self._size(tensors)
        with self._lock:
            if self._ram_bytes + size <= self.budget:
                self._ram[key] = tensors
                self._ram_bytes += size
                return
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="slowllm-spill-", dir=self._parent))
            path = self._dir / f"{len(self._disk)}-{abs(hash(key))}.safetensors"
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
        with self._lock:
            self._disk[key] = path
            self.spilled_bytes += size

    def get(self, key) -> dict[str, torch.Tensor]:
        with self._lock:
            if key in self._ram:
                return self._ram[key]
            path = self._disk[key]
        return load_file(str(path))

    def pop(self, key) -> None:
        with self._lock:
            if key in self._ram:
                self._ram_bytes -= self._size(self._ram.pop(key))
            elif key in self._disk:
                self._disk.pop(key).unlink(missing_ok=True)

    def __contains__(self, key) -> bool:
        return key in self._ram or key in self._disk

    def close(self) -> None:
        with self._lock:
            self._ram.clear()
            self._disk.clear()
            self._ram_bytes = 0
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
