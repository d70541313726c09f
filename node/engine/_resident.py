"""Blocks held in memory (RAM or GPU) for as long as the process lives: a node's range, or all of them.

Forward, backward (recomputing the span from its input) and cached generation steps over a contiguous
range of transformers' blocks, with the inputs checked before anything runs.
"""

from __future__ import annotations

import time

import torch

from slowllm.protocol import InputError

from ._blocks import DEFAULT_SCORE_BUDGET, SCORE_BYTES, Attention, BlockCache, load_weights, new_block
from ._checkpoint import Checkpoint
from ._memory import HUGE_PAGE, in_huge_pages, linear_dtype, steady_allocator


class ResidentBlocks:
    """Blocks first..last held in memory (RAM or GPU) in the compute dtype (linear weights in int8 for an
    int8 checkpoint, in bf16 for a bf16 one computed in fp32 on a CPU with slowllm's kernels)."""

    def __init__(self, checkpoint: Checkpoint, first: int, last: int, dtype: torch.dtype, device: str = "cpu",
                 score_budget: int = DEFAULT_SCORE_BUDGET):
        if not 0 <= first <= last < checkpoint.n_layer:
            raise InputError(f"--layers {first}-{last} is outside the model's blocks 0-{checkpoint.n_layer - 1}.")
        steady_allocator()
        self.checkpoint, self.first, self.last = checkpoint, first, last
        self.config = checkpoint.config
        self.dtype, self.device = dtype, torch.device(device)
        self.blocks: dict[int, torch.nn.Module] = {}
        self.score_budget = score_budget  # attention scores of one block: bounds a request's working memory
        self.linears = linear_dtype(checkpoint.storage_dtype(), dtype, self.device, checkpoint.int8)
        for layer in range(first, last + 1):
            block = new_block(self.config, dtype, self.device, int8=checkpoint.int8, linears=self.linears)
            load_weights(block, checkpoint.read_block(layer), layer)
            for p in block.parameters():  # own the memory: no page-cache-backed maps left behind
                if p.data.device.type == "cpu" and (p.data.nbytes >= HUGE_PAGE or p.data.dtype in (dtype, self.linears, torch.int8)):
                    p.data = in_huge_pages(p.data)  # the weights: read every token, in 2 MB pages
            self.blocks[layer] = block

    def check_range(self, first: int, last: int) -> None:
        if not self.first <= first <= last <= self.last:
            raise InputError(f"blocks {first}-{last} requested, but this node serves {self.first}-{self.last}.")

    def check_inputs(self, hidden: torch.Tensor, mask: torch.Tensor, past: int = 0) -> None:
        h = self.config.hidden_size
        if hidden.ndim != 3 or hidden.shape[-1] != h or not hidden.is_floating_point():
            raise InputError(f"hidden states must be a float tensor [batch, length, {h}], got {list(hidden.shape)}.")
        if mask.ndim != 2 or mask.shape[0] != hidden.shape[0] or mask.shape[1] != past + hidden.shape[1]:
            raise InputError(f"mask must be [batch, past + length] = [{hidden.shape[0]}, {past + hidden.shape[1]}], "
                             f"got {list(mask.shape)}.")

    def attention(self, mask: torch.Tensor, q_len: int) -> Attention:
        return Attention(mask, q_len, self.config, self.dtype, self.device, self.score_budget)

    @torch.no_grad()
    def forward(self, hidden, mask, first, last, caches: dict[int, BlockCache] | None = None) -> torch.Tensor:
        hidden = hidden.to(self.device, self.dtype)
        attn = self.attention(mask.to(self.device), hidden.shape[1])
        with torch.inference_mode(caches is not None):  # a session's pass (see `BlockCache`)
            for layer in range(first, last + 1):
                hidden = attn.run(self.blocks[layer], hidden, None if caches is None else caches[layer])
            return hidden.cpu()

    def max_backward_length(self, batch: int) -> int:
        """Longest input whose backward fits the score budget: autograd keeps one block's scores whole."""
        return int((self.score_budget / (batch * self.config.num_attention_heads * SCORE_BYTES * 2)) ** 0.5)

    def backward(self, hidden, mask, grad, first, last) -> torch.Tensor:
        limit = self.max_backward_length(hidden.shape[0])
        if hidden.shape[1] > limit:
            raise InputError(f"backward of {hidden.shape[1]} positions x {hidden.shape[0]} rows exceeds this node's "
                             f"limit of {limit} positions for that many rows (attention memory): use shorter "
                             "tuning examples or --batch-size 1.")
        hidden = hidden.to(self.device, self.dtype)
        attn = self.attention(mask.to(self.device), hidden.shape[1])
        whole = Attention(mask.to(self.device), hidden.shape[1], self.config, self.dtype, self.device,
                          score_budget=1 << 62)  # within the limit above: one graph per block
        inputs = []
        with torch.no_grad():  # recompute the span's forward, keeping each block's input
            for layer in range(first, last + 1):
                inputs.append(hidden)
                hidden = attn.run(self.blocks[layer], hidden)
        grad = grad.to(self.device, self.dtype)
        for layer, x in zip(reversed(range(first, last + 1)), reversed(inputs)):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(whole.run(self.blocks[layer], x), x, grad)
        return grad.cpu()

    def measure_speed(self) -> float:
        """Tokens x blocks per second on a small batch (the router prefers faster nodes)."""
        x = torch.zeros(1, 16, self.config.hidden_size)
        start = time.perf_counter()
        self.forward(x, torch.ones(1, 16, dtype=torch.long), self.first, self.last)
        return 16 * (self.last - self.first + 1) / max(time.perf_counter() - start, 1e-6)
