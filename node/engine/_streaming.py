"""The disk-streaming executor: Bloom with one block in RAM at a time.

Every input goes through block i before block i+1 is needed, so each pass reads the weights once,
however many inputs there are. A reader thread pulls the next block into the page cache while the
current one computes (IO overlaps compute without taking a core: see `touch`). Activations, the inputs
saved for backward and generation KV caches live in `SpillStore`s: in RAM within the budget, on disk
beyond it, so the number of inputs is not bounded by memory.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from ._batch import Batch
from ._blocks import DEFAULT_SCORE_BUDGET, Attention, BlockCache, load_weights, new_block, release_weights
from ._checkpoint import Checkpoint, touch
from ._memory import SpillStore, linear_dtype


class BlockStream:
    """Yields (layer, block) for a sequence of layers, reading the next block while the caller computes.

    The yielded block is only valid until the next iteration. When the checkpoint's dtype is the compute
    dtype the block's parameters are the memory-mapped checkpoint tensors (zero copy): two blocks are in
    flight. Otherwise weights are converted into one reusable block: that block plus one raw block.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: str = "cpu", prefetch: bool = True):
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = torch.device(device)
        self.prefetch = prefetch
        # the linears map the checkpoint itself when it stores their dtype (bf16 under fp32 too: exact)
        linears = linear_dtype(checkpoint.storage_dtype(), dtype, self.device, checkpoint.int8)
        self.zero_copy = checkpoint.storage_dtype() == linears and self.device.type == "cpu"
        self._block = new_block(checkpoint.config, dtype, self.device, int8=checkpoint.int8, linears=linears)
        if self.zero_copy:
            release_weights(self._block)

    def blocks(self, layers: Sequence[int], desc: str = "blocks", tokens: int = 0,
               progress: bool | None = None) -> Iterator[tuple[int, torch.nn.Module]]:
        slots = threading.Semaphore(2 if self.zero_copy and self.prefetch else 1)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        def load(layer: int):
            try:
                tensors = self.checkpoint.read_block(layer)
                touch(list(tensors.values()))
                return layer, tensors, None
            except BaseException as e:  # handed to the consumer, which raises it
                return layer, None, e

        def reader() -> None:
            for layer in layers:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = load(layer)
                ready.put(item)
                if item[2] is not None:
                    return

        if self.prefetch:
            threading.Thread(target=reader, name="slowllm-block-reader", daemon=True).start()
        bar = tqdm(total=len(layers), desc=desc, unit="block", file=sys.stderr, leave=False,
                   disable=None if progress is None else not progress)
        start = time.perf_counter()
        try:
            for i, layer in enumerate(layers):
                if self.prefetch:
                    item = ready.get()
                else:
                    slots.acquire()
                    item = load(layer)
                layer, tensors, error = item
                del item
                if error is not None:
                    raise error
                load_weights(self._block, tensors, layer)
                del tensors
                if not self.zero_copy:
                    slots.release()  # converted into the block: the raw pages may go
                yield layer, self._block
                if self.zero_copy:
                    release_weights(self._block)
                    slots.release()
                bar.update(1)
                if tokens:
                    bar.set_postfix_str(f"{tokens * (i + 1) / (time.perf_counter() - start):.0f} tok-blocks/s")
        finally:
            stop.set()
            bar.close()
            if self.zero_copy:
                release_weights(self._block)


@dataclass
class Tape:
    """What a backward pass needs from its forward: each block's input (in a SpillStore) and the mask."""

    saved: SpillStore
    mask: torch.Tensor

    def close(self) -> None:
        self.saved.close()


class StreamingExecutor:
    """Forward, backward and generation steps of blocks [0, n_layer) streamed from a checkpoint."""

    def __init__(self, checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 activation_budget: int = 1 << 62, prefetch: bool = True, spill_dir: str | None = None,
                 progress: bool | None = None, score_budget: int = DEFAULT_SCORE_BUDGET):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.n_layer = checkpoint.n_layer
        self.dtype = dtype
        self.device = device
        self.stream = BlockStream(checkpoint, dtype, device, prefetch)
        self.activation_budget = activation_budget
        self.spill_dir = spill_dir
        self.progress = progress
        self.score_budget = score_budget
        self.passes = 0  # weight passes made (the figure that streaming tries to minimise)

    def attention(self, mask: torch.Tensor, q_len: int, score_budget: int | None = None) -> Attention:
        return Attention(mask.to(self.device), q_len, self.config, self.dtype, self.device,
                         self.score_budget if score_budget is None else score_budget)

    @torch.no_grad()
    def forward(self, batches: Iterable[Batch], tape: SpillStore | None = None,
                desc: str = "forward") -> Iterator[torch.Tensor]:
        """Pass every batch through all blocks, one block at a time; yield outputs in batch order.

        With `tape`, every block's input is kept there (key (layer, batch index)) for a backward pass.
        """
        acts = SpillStore(self.activation_budget // (2 if tape is not None else 1), self.spill_dir)
        try:
            count, tokens = 0, 0
            for batch in batches:  # consumed lazily: the caller may build embeddings batch by batch
                acts.put(count, {"h": batch.hidden.to(self.device, self.dtype), "m": batch.mask})
                count += 1
                tokens += batch.hidden.shape[0] * batch.hidden.shape[1]
            self.passes += 1
            for layer, block in self.stream.blocks(range(self.n_layer), desc, tokens, self.progress):
                for j in range(count):
                    entry = acts.get(j)
                    if tape is not None:
                        tape.put((layer, j), {"h": entry["h"]})
                    out = self.attention(entry["m"], entry["h"].shape[1]).run(block, entry["h"])
                    acts.put(j, {**entry, "h": out})
            for j in range(count):
                yield acts.get(j)["h"]
                acts.pop(j)
        finally:
            acts.close()

    def forward_for_backward(self, batch: Batch) -> tuple[torch.Tensor, Tape]:
        tape = Tape(SpillStore(self.activation_budget // 2, self.spill_dir), batch.mask)
        try:
            (out,) = list(self.forward([batch], tape.saved))
        except BaseException:
            tape.close()
            raise
        return out, tape

    def backward(self, tape: Tape, grad: torch.Tensor, desc: str = "backward") -> torch.Tensor:
        """Gradient w.r.t. the input of the forward that made `tape`.

        Streams the blocks in reverse and recomputes each block's forward from its saved input, so no
        block's internals are kept between the passes.
        """
        grad = grad.to(self.device, self.dtype)
        attn = self.attention(tape.mask, grad.shape[1], score_budget=1 << 62)  # one graph per block
        self.passes += 1
        try:
            layers = list(reversed(range(self.n_layer)))
            for layer, block in self.stream.blocks(layers, desc, grad.shape[0] * grad.shape[1], self.progress):
                x = tape.saved.get((layer, 0))["h"].detach().requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(attn.run(block, x), x, grad)
                tape.saved.pop((layer, 0))
        finally:
            tape.close()
        return grad

    def session(self, max_length: int | None = None) -> "StreamingSession":
        """A generation session that may hold up to `max_length` positions (its caches' limit)."""
        return StreamingSession(self, max_length)

    @torch.inference_mode()  # sessions' passes (see `BlockCache`)
    def step_sessions(self, steps: Sequence[tuple["StreamingSession", torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Generation steps of several sessions in ONE pass over the weights: each block, once read, runs
        every session's new positions against that session's cache."""
        work = []
        for session, hidden, mask in steps:
            past = mask.shape[1] - hidden.shape[1]
            if past != session.length:
                raise ValueError(f"mask covers {past} past positions, the session holds {session.length}")
            work.append([session, hidden.to(self.device, self.dtype), self.attention(mask, hidden.shape[1]), past])
        self.passes += 1
        tokens = sum(h.shape[0] * h.shape[1] for _, h, _, _ in work)
        for layer, block in self.stream.blocks(range(self.n_layer), "step", tokens, self.progress):
            for item in work:
                session, hidden, attn, past = item
                store = session.caches
                cache = BlockCache.from_state(store.get(layer)) if layer in store else BlockCache()
                cache.limit = session.max_length
                cache.truncate(past)  # a rollback is applied here, as each cache comes in anyway
                item[1] = attn.run(block, hidden, cache)
                store.put(layer, cache.state())
        for (session, _, mask), item in zip(steps, work):
            session.length = mask.shape[1]
        return [item[1] for item in work]


class StreamingSession:
    """A generation session: KV caches per block, one pass over the weights per step for the whole batch."""

    def __init__(self, executor: StreamingExecutor, max_length: int | None = None):
        self.executor, self.max_length = executor, max_length
        self.caches = SpillStore(executor.activation_budget, executor.spill_dir)
        self.length = 0

    def step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the new positions `hidden` [B, q, H]; `mask` [B, past + q] covers past and new tokens."""
        return self.executor.step_sessions([(self, hidden, mask)])[0]

    def rollback(self, n: int) -> None:
        """Forget the last `n` positions. Free: the caches (possibly spilled to disk) are cut when the
        next step reads them in, which it does for every block anyway."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} positions")
        self.length -= n

    def close(self) -> None:
        self.caches.close()
