"""Per-block weight digests: how a node proves it holds the coordinator's weights, not a sibling's.

The fingerprint covers the config and tensor shapes only, so a fine-tune, another seed or bloomz beside
bloom would register silently. A block's digest is SHA-256 over its tensors in canonical form: names
without the layer prefix, sorted; floating tensors rounded to bf16 (a bf16 and an fp32 copy of one model
are interchangeable, and rounding to nearest even gives both the same bytes); an int8 node's weights and
scales as `slowllm quantize` makes them from the original (deterministic: the coordinator reproduces
them from its own copy).

Reading 352 GB at every start is not an option: digests are cached per block in
`~/.cache/slowllm/digests/`, keyed by the checkpoint and by the name, size and modification time of the
shard files that hold the block, so a block is hashed once per copy (a node: while it loads anyway;
the coordinator: the first time a node registers for it). A block whose files the coordinator does not
have locally (a hub id it never downloaded) is not fetched: that node's weights are listed as unproven.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch

from ._checkpoint import SCALE, Checkpoint

_LOCK = threading.Lock()


def _cache_dir() -> Path:
    return Path(os.environ.get("SLOWLLM_CACHE", Path.home() / ".cache" / "slowllm")) / "digests"


def _feed(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    h.update(t.contiguous().view(torch.uint8).numpy().data if t.numel() else b"")


def compute_block_digest(checkpoint: Checkpoint, layer: int, int8: bool) -> str:
    """The digest of block `layer` as a node computing with these weights holds it (`int8`: quantized)."""
    from ._quantize import quantize_slices

    prefix = checkpoint.family.block_prefix(layer)
    quantized = set(checkpoint.quantized_keys(layer)) if int8 else set()
    h = hashlib.sha256(b"slowllm block digest 1|")
    for key in sorted(checkpoint.layer_keys(layer)):
        name = key.removeprefix(prefix)
        (t,) = checkpoint.read([key]).values()
        if key in quantized:
            if checkpoint.int8:
                q = t
                (scale,) = checkpoint.read([key + SCALE]).values()
            else:
                parts = list(quantize_slices(t))
                q, scale = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            _feed(h, name, q)
            _feed(h, name + SCALE, scale.to(torch.bfloat16))
        else:
            _feed(h, name, t.to(torch.bfloat16) if t.is_floating_point() else t)
        del t
    return h.hexdigest()[:32]


def _files_of(checkpoint: Checkpoint, layer: int, local_only: bool) -> list | None:
    """(name, size, mtime) of the shard files holding the block; None when one is not here (`local_only`)."""
    names = sorted({checkpoint.weight_map[k][0] for k in checkpoint.block_keys(layer)})
    out = []
    for name in names:
        path = checkpoint.local_file(name) if local_only else checkpoint.file(name)
        if path is None:
            return None
        st = path.stat()
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def block_digests(checkpoint: Checkpoint, layers: range, int8: bool | None = None, *, local_only: bool = False,
                  progress=None) -> list[str | None]:
    """The digest of each block in `layers` (None for a block whose files are not here, with `local_only`),
    from the cache where its files have not changed. `progress(i, n)` after each block hashed."""
    int8 = checkpoint.int8 if int8 is None else int8
    where = checkpoint.path or checkpoint.model_id
    key = hashlib.sha256(f"{where}|{checkpoint.fingerprint()}".encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.json"
    with _LOCK:
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    out: list[str | None] = []
    for i, layer in enumerate(layers):
        files = _files_of(checkpoint, layer, local_only)
        if files is None:
            out.append(None)
            continue
        entry = cache.get(f"{layer}|{'int8' if int8 else 'bf16'}")
        if not (isinstance(entry, dict) and entry.get("files") == files and isinstance(entry.get("digest"), str)):
            entry = {"files": files, "digest": compute_block_digest(checkpoint, layer, int8)}
            cache[f"{layer}|{'int8' if int8 else 'bf16'}"] = entry
            _save(path, cache)
            if progress:
                progress(i + 1, len(layers))
        out.append(entry["digest"])
    return out


def _save(path: Path, cache: dict) -> None:
    with _LOCK:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: digests are recomputed next time, nothing else changes
