"""Memory budget arithmetic and a store that keeps tensors in RAM until the budget says disk.

Streaming Bloom-176B on a 16 GB PC only works if every byte is accounted for: blocks in flight, the
model's ends, activations, KV caches. `SpillStore` holds activations and caches: in RAM while they fit
its byte budget, otherwise in safetensors files under a temporary directory that is removed on close.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

from slowllm.node.kernels._kernels import kernels, native_bf16
from slowllm.utils._units import format_size, parse_size  # noqa: F401  (re-exported)


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


# ---- a node's memory: what `slowllm-node` checks before loading, and deploy/GUIDE.md's table -----------
NODE_RUNTIME_BYTES = 1 << 30  # interpreter, torch, transformers and one request's activations


def default_dtype(storage: torch.dtype, device: str, int8: bool = False) -> tuple[torch.dtype, str]:
    """The compute dtype a node or a local run takes when none is asked, and why (printed at start-up).

    A bf16 or int8 checkpoint computes in bf16 where the CPU computes bf16 natively (half the bytes of
    activations and KV caches). Elsewhere PyTorch's bf16 GEMMs, norms and GELU run slower than fp32, so
    activations are fp32 while the weights stay as stored wherever slowllm's kernels read them
    (`linear_dtype`): the bytes per token of bf16 with the numbers of fp32. On the AVX2 PC (bloom-1b7 shape,
    caches laid out for each path: `cache_layout`) an 843-token prompt takes 17 s in fp32 against 21 in
    bf16, decode after ~20 tokens 1.02x and after 843 0.99x fp32's time per token in bf16: fp32 stays the
    default, bf16 (`--dtype bfloat16`) halves the KV caches. fp32 checkpoints stay fp32 (exact)."""
    if device == "cuda":
        return torch.bfloat16, "the default on a GPU"
    if storage == torch.bfloat16 or int8:
        if native_bf16():
            return torch.bfloat16, "the checkpoint's dtype, and this CPU computes bfloat16 natively (--dtype float32 to change)"
        k = kernels()
        if k is not None:
            return torch.float32, (f"this CPU has no native bfloat16: activations in float32, weights read as stored by "
                                   f"slowllm's {k.isa} kernels; --dtype bfloat16 halves the KV caches")
        return torch.float32, "this CPU has no fast bfloat16 (--dtype bfloat16 halves RAM)"
    return torch.float32, "the checkpoint's dtype"


def linear_dtype(storage: torch.dtype, dtype: torch.dtype, device: str | torch.device, int8: bool = False) -> torch.dtype:
    """The dtype a block keeps its linear weights in (int8 checkpoints: int8, whatever this says).

    A bf16 checkpoint computed in fp32 on a CPU with slowllm's kernels keeps them in bf16: widening bf16
    to fp32 is exact, so the numbers are a float32 block's while RAM and the bytes read per token are
    half (the kernels widen in registers; prompts widen slices for fp32 GEMMs). Otherwise the compute
    dtype."""
    if (not int8 and storage == torch.bfloat16 and dtype == torch.float32 and torch.device(device).type == "cpu"
            and kernels() is not None):
        return torch.bfloat16
    return dtype


def weights_note(dtype: torch.dtype, linears: torch.dtype, int8: bool) -> str:
    """What a start-up line adds after the compute dtype about the linear weights' own dtype."""
    if int8:
        return " with int8 weights"
    return f" with {str(linears).removeprefix('torch.')} weights" if linears != dtype else ""


def node_dtype(storage: torch.dtype, device: str, asked: torch.dtype | None,
               int8: bool = False) -> tuple[torch.dtype, str]:
    """The dtype a node keeps its blocks in, and why (printed at start-up)."""
    if asked is not None:
        return asked, "as asked with --dtype"
    return default_dtype(storage, device, int8)


def node_memory_need(block_bytes: int, blocks: int, session_memory: int) -> int:
    """Bytes a node needs: its blocks in the kept dtype, the KV-cache budget, and the runtime."""
    return blocks * block_bytes + session_memory + NODE_RUNTIME_BYTES


def blocks_that_fit(block_bytes: int, available: int, session_memory: int) -> int:
    return max(0, (available - session_memory - NODE_RUNTIME_BYTES) // block_bytes)


def guide_table(block_bytes_bf16: int, block_bytes_fp32: int, n_layer: int, session_memory: int = 2 << 30,
                block_bytes_int8: int | None = None) -> str:
    """The table of deploy/GUIDE.md: Bloom-176B blocks per PC by RAM (85% of it free for the node), and
    with `block_bytes_int8`, the same for an int8 copy (`slowllm quantize`)."""
    int8 = block_bytes_int8 is not None
    rows = ["| PC RAM | blocks in bfloat16 | blocks in float32 | PCs for all 70 blocks (bf16) |"
            + (" blocks in int8 | PCs for all 70 blocks (int8) |" if int8 else ""),
            "|---|---|---|---|" + ("---|---|" if int8 else "")]
    for ram_gb in (16, 32, 64, 128, 256):
        available = int(ram_gb * (1 << 30) * 0.85)
        bf16 = min(n_layer, blocks_that_fit(block_bytes_bf16, available, session_memory))
        fp32 = min(n_layer, blocks_that_fit(block_bytes_fp32, available, session_memory))
        pcs = f"{-(-n_layer // bf16)}" if bf16 else "-"
        row = f"| {ram_gb} GB | {bf16} | {fp32} | {pcs} |"
        if int8:
            q = min(n_layer, blocks_that_fit(block_bytes_int8, available, session_memory))
            row += f" {q} | {-(-n_layer // q) if q else '-'} |"
        rows.append(row)
    return "\n".join(rows)


def family_table(session_memory: int = 2 << 30, ram_gb: int = 16) -> str:
    """docs/families.md's table: for real models of every family, blocks per `ram_gb` PC and PCs for the whole model
    (bf16 and int8, by the node formula above), the coordinator's ends and one local pass's disk read."""
    import torch

    from ._blocks import block_nbytes
    from ._families import REAL_MODELS, family_named

    available = int(ram_gb * (1 << 30) * 0.85)
    rows = [f"| model | family | blocks | one block (bf16) | blocks per {ram_gb} GB PC: bf16 | PCs: bf16 | "
            "blocks per PC: int8 | PCs: int8 | coordinator's ends (bf16) | one `--local` pass reads (bf16) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, model_type, shape in REAL_MODELS:
        config = family_named(model_type).config_cls(**shape)
        n = config.num_hidden_layers
        bf16, int8 = block_nbytes(config, torch.bfloat16), block_nbytes(config, torch.bfloat16, int8=True)
        fit16, fit8 = (min(n, blocks_that_fit(b, available, session_memory)) for b in (bf16, int8))
        matrices = 1 if getattr(config, "tie_word_embeddings", True) else 2
        ends = matrices * config.vocab_size * config.hidden_size * 2
        rows.append(f"| {name} | `{model_type}` | {n} | {bf16 / 1e9:.2f} GB | {fit16} | "
                    f"{-(-n // fit16) if fit16 else '-'} | {fit8} | {-(-n // fit8) if fit8 else '-'} | "
                    f"{ends / 1e9:.1f} GB | {n * bf16 / 1e9:.0f} GB |")
    return "\n".join(rows)


_M_MMAP_THRESHOLD = -3


def steady_allocator(threshold: int = 1 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more from its own mapping, returned on free.

    glibc raises its mmap threshold (up to 32 MB) each time such a block is freed, after which blocks
    of growing size - key/value caches extended chunk by chunk, 4 MB request frames - come from the heap
    and their freed predecessors cannot be reused: peak RSS of a chunked 8k-token prompt was 380 MB where
    about twice 4k's is expected. A fixed threshold keeps it linear (34 / 59 / 113 MB for 2k / 4k / 8k).
    """
    import sys

    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass  # not glibc (musl, ...): nothing to tune


# ---- weights in 2 MB pages ---------------------------------------------------------------------------
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages() -> str | None:
    """Linux's transparent huge page mode ("always", "madvise", "never"), None where there is none."""
    try:
        text = _THP_SETTING.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1: text.index("]")] if "[" in text else None


def page_note() -> str:
    """What a start-up line says about the pages weights are kept in (and how to get 2 MB ones)."""
    mode = huge_pages()
    if mode in ("always", "madvise"):
        return "weights in 2 MB pages"
    if mode is None:
        return "weights in 4 KB pages"
    return ("weights in 4 KB pages: transparent huge pages are off, `echo madvise | sudo tee "
            f"{_THP_SETTING}` decodes ~5% faster")


def huge_page_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in memory Linux backs with transparent 2 MB pages where it can.

    Decoding reads every weight once per token, a new 4 KB page every 4 KB: each costs a page-table walk,
    which a virtual machine doubles (guest and host tables), and the tables' entries are gone from the
    caches by the next linear. Measured on the bloom-1b7 shape, int8, 2 cores of a KVM guest: the block
    linears alone 52.6 ms with 4 KB pages, 50.8 ms with 2 MB ones; with 1 ms of other work between them
    (what attention is) 61.4 vs 54.0; decode 95-97 vs 91-92 ms/token. The buffer is 2 MB larger than asked
    and the tensor starts at its first 2 MB boundary, so every whole 2 MB of it can be one page; the
    unaligned ends are never touched, so they take no memory. A plain tensor where there is no such memory
    (not Linux, huge pages off, small tensors)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or huge_pages() not in ("always", "madvise"):
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -base.data_ptr() % HUGE_PAGE
    advised = (base.numel() - start) // HUGE_PAGE * HUGE_PAGE
    try:  # before anything is written: the first touch of each 2 MB then takes a huge page
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(base.data_ptr() + start),
                                                   ctypes.c_size_t(advised), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass  # no madvise to call: 4 KB pages, as before
    return base[start:start + nbytes].view(dtype).view(shape)


def in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor in 2 MB pages (`huge_page_empty`); a plain copy of a small one."""
    out = huge_page_empty(tensor.shape, tensor.dtype)
    out.copy_(tensor)
    return out
