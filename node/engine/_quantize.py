"""`slowllm quantize`: write an int8 copy of a checkpoint (any family), one block at a time.

What is int8 and what is not (chosen for bytes per token and for fidelity):
- the linear weights of every block (Bloom's four, Llama's seven): int8, symmetric, one scale per output
  row (`quantize_rows`); they are 97% of a block's bytes;
- the word embedding, which Bloom also uses as its LM head: int8 with one scale per vocabulary row (a
  row is both one token's embedding and one logit's weights, so the same scales serve both); it is 1/3
  of bloom-1b7's bytes and the coordinator's largest tensor (7.2 GB -> 3.6 GB for Bloom-176B); an
  untied head (GPT-NeoX, most Llamas) is int8 the same way;
- norms, biases, scales: bf16 (a few thousand values per block).
Shards hold one block each (plus one for the ends), so a node reads only its own files. The output's
config.json says it is quantized and records the original's fingerprint, which the int8 copy shares:
an int8 node serves a coordinator that holds the bf16 original.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from slowllm.node.kernels._linears import quantize_rows
from slowllm.protocol import CheckpointError

from ._checkpoint import QUANTIZATION_KEY, SCALE, TOKENIZER_FILES, Checkpoint, slices_weights_at_run_time

_CHUNK_BYTES = 256 << 20  # fp32 work per slice of rows: a 176B MLP matrix is 3.3 GB in fp32


def quantize_slices(weight: torch.Tensor):
    """`quantize_rows` of a slice of rows at a time (bounded memory; rows are independent, so the result is
    the same): yields (q slice, scale slice)."""
    rows = max(1, _CHUNK_BYTES // (weight.shape[1] * 4))
    for start in range(0, weight.shape[0], rows):
        yield quantize_rows(weight[start:start + rows])


_DTYPE_NAMES = {torch.int8: "I8", torch.bfloat16: "BF16"}


class ShardWriter:
    """A safetensors file written tensor by tensor, slice by slice: the header (names, dtypes, shapes) is
    known up front, so the bytes go to disk as they are computed and a shard (a Bloom-176B block is 2.5 GB
    in int8) never sits in memory whole."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in plan:
            size = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size, self.written = offset, 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, piece: torch.Tensor) -> None:
        data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.written += data.nbytes

    def close(self) -> None:
        self.file.close()
        if self.written != self.size:  # a bug, never a silently short shard
            raise RuntimeError(f"shard has {self.written} bytes of data, its header promises {self.size}")


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
    if slices_weights_at_run_time(config):
        raise CheckpointError("this checkpoint's config sets slow_but_exact with pretraining_tp > 1, which slices "
                              "float weights at run time: set slow_but_exact false in its config.json first.")
    fingerprint = source.fingerprint()
    partial = out.with_name(out.name + ".partial")  # renamed into place when complete: never half a model
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    n = source.n_layer
    stored_name = source.family.stored  # names as save_pretrained writes them (`transformer.h.0...`, `model.layers.0...`)
    names = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
    weight_map: dict[str, str] = {}
    total = 0

    def write(name: str, keys: list[str], quantized: set[str]) -> None:
        """One shard: `quantized` keys as int8 + scales, the rest bf16; one source tensor in memory at a time."""
        nonlocal total
        source.nbytes(keys)  # every shape and dtype from one opening of each source shard
        plan = []
        for key in keys:
            shape = source.meta(key)[0]
            plan.append((stored_name(key), torch.int8 if key in quantized else torch.bfloat16, shape))
            if key in quantized:
                plan.append((stored_name(key + SCALE), torch.bfloat16, shape[:1]))
        writer = ShardWriter(partial / name, plan)
        try:
            for key in keys:
                (tensor,) = source.read([key]).values()  # a fresh memory map, dropped after this tensor
                if key in quantized:
                    scales = []
                    for q, scale in quantize_slices(tensor):
                        writer.write(q)
                        scales.append(scale)
                    writer.write(torch.cat(scales))
                else:
                    writer.write(tensor.to(torch.bfloat16))
                del tensor
        finally:
            writer.close()
        for stored, dtype, shape in plan:
            weight_map[stored] = name
            total += torch.Size(shape).numel() * dtype.itemsize

    bar = tqdm(total=n + 1, desc="quantize", unit="block", file=sys.stderr, disable=None if progress is None else not progress)
    try:
        for layer in range(n):
            write(names[layer], source.layer_keys(layer), set(source.quantized_keys(layer)))
            bar.update(1)
        write(names[n], source.end_keys(), {source.embedding_key, source.head_key})
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
