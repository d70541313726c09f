"""`slowllm quantize`: write an int8 copy of a Bloom checkpoint, one block at a time.

What is int8 and what is not (chosen for bytes per token and for fidelity):
- the four linear weights of every block: int8, symmetric, one scale per output row (`quantize_rows`);
  they are 97% of a block's bytes;
- the word embedding, which Bloom also uses as its LM head: int8 with one scale per vocabulary row (a
  row is both one token's embedding and one logit's weights, so the same scales serve both); it is 1/3
  of bloom-1b7's bytes and the coordinator's largest tensor (7.2 GB -> 3.6 GB for Bloom-176B);
- layer norms, biases, scales: bf16 (a few thousand values per block).
Shards hold one block each (plus one for the ends), so a node reads only its own files. The output's
config.json says it is quantized and records the original's fingerprint, which the int8 copy shares:
an int8 node serves a coordinator that holds the bf16 original.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from slowllm.protocol import CheckpointError

from ._checkpoint import (BLOCK_SUFFIXES, EMBEDDING, QUANTIZATION_KEY, QUANTIZED_SUFFIXES, SCALE, TOKENIZER_FILES,
                          Checkpoint)
from ._linears import quantize_rows

_CHUNK_BYTES = 256 << 20  # fp32 work per slice of rows: a 176B MLP matrix is 3.3 GB in fp32


def quantize_matrix(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` a slice of rows at a time (bounded memory, same result: rows are independent)."""
    rows = max(1, _CHUNK_BYTES // (weight.shape[1] * 4))
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.bfloat16)
    for start in range(0, weight.shape[0], rows):
        q[start:start + rows], scale[start:start + rows] = quantize_rows(weight[start:start + rows])
    return q, scale


def _stored(key: str) -> str:
    return key if key.startswith("lm_head") else "transformer." + key


def quantize_checkpoint(model: str | os.PathLike, out: str | os.PathLike, *, bits: int = 8,
                        progress: bool | None = None) -> Path:
    """Write the int8 checkpoint of `model` to the new directory `out`; returns its path."""
    if bits != 8:
        raise CheckpointError(f"--bits {bits} is not supported: slowllm quantizes to 8 bits only (--bits 8).")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory: choose a new output folder.")
    source = Checkpoint(model)
    if source.int8:
        raise CheckpointError(f"{model} is already an int8 checkpoint: quantize the original bf16/fp32 one.")
    config = source.config
    if getattr(config, "slow_but_exact", False) and config.pretraining_tp > 1:
        raise CheckpointError("this checkpoint's config sets slow_but_exact with pretraining_tp > 1, which slices "
                              "float weights at run time: set slow_but_exact false in its config.json first.")
    fingerprint = source.fingerprint()
    partial = out.with_name(out.name + ".partial")  # renamed into place when complete: never half a model
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    n = source.n_layer
    names = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
    weight_map: dict[str, str] = {}
    total = 0

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    bar = tqdm(total=n + 1, desc="quantize", unit="block", file=sys.stderr, disable=None if progress is None else not progress)
    try:
        for layer in range(n):
            tensors = source.read(source.block_keys(layer))
            shard: dict[str, torch.Tensor] = {}
            for suffix in BLOCK_SUFFIXES:
                key = f"h.{layer}.{suffix}"
                if suffix in QUANTIZED_SUFFIXES:
                    shard[_stored(key)], shard[_stored(key + SCALE)] = quantize_matrix(tensors[key])
                else:
                    shard[_stored(key)] = tensors[key].to(torch.bfloat16).contiguous()
            del tensors
            write(names[layer], shard)
            del shard
            bar.update(1)
        ends: dict[str, torch.Tensor] = {}
        for key in source.end_keys():
            (tensor,) = source.read([key]).values()
            if key in (EMBEDDING, source.head_key):
                ends[_stored(key)], ends[_stored(key + SCALE)] = quantize_matrix(tensor)
            else:
                ends[_stored(key)] = tensor.to(torch.bfloat16).contiguous()
            del tensor
        write(names[n], ends)
        bar.update(1)
    finally:
        bar.close()

    raw = json.loads(source.file("config.json").read_text())
    for key in ("torch_dtype", "dtype"):  # transformers 4 writes the first, 5 the second
        if key in raw:
            raw[key] = "bfloat16"
    raw[QUANTIZATION_KEY] = {
        "method": "int8", "bits": 8, "scheme": "symmetric, one bf16 scale per output row (weight-only)",
        "quantized": ["block linear weights", "word embedding / LM head"],
        "source": str(model), "fingerprint": fingerprint,
    }
    (partial / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        try:
            shutil.copyfile(source.file(name), partial / name)
        except (CheckpointError, OSError):
            if name == "tokenizer.json":
                raise CheckpointError(f"{model} has no tokenizer.json to copy: put the tokenizer files beside its "
                                      "config.json and run again.") from None
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
