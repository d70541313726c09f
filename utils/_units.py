"""Sizes as people write them ('12GB', '800MB') and as we print them; no heavy imports (used by --help paths)."""

from __future__ import annotations

import re

from slowllm.protocol._errors import InputError

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


def format_span(first: int, last: int) -> str:
    """A block range as users write it: '5' for one block, '3-7' for several."""
    return f"{first}" if first == last else f"{first}-{last}"


def span_blocks(spans: list[list[int]]) -> list[int]:
    """[[0, 2], [5, 5]] -> [0, 1, 2, 5]."""
    return [b for a, z in spans for b in range(a, z + 1)]


def format_ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}" if start == b else f"{start}-{b}")
            start = None
    return ", ".join(out)
