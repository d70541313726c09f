"""Verification by recomputation: is a node's answer what the blocks compute?

`--verify F` re-runs a random fraction F of hops on a second node covering the same blocks and compares
the two answers with a tolerance derived from the two nodes' dtypes. When they disagree, the coordinator
decides: it computes the span itself from its own checkpoint (`Referee`, one block in memory at a time,
fp32) and bans whichever node is wrong. Only positions the mask marks real are compared (padding
positions are never used downstream).

A lie smaller than the tolerance passes; it moves each hidden state by less than two honest machines
differ by (bf16 rounding over a span), which is also what an honest bf16 node does.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from slowllm.node import Checkpoint

if TYPE_CHECKING:
    from slowllm.node._blocks import Attention

# Relative error per position (L2 over the hidden dimension) two honest nodes stay within: fp32 nodes
# differ by summation order (threads, query chunking); a bf16 node rounds every block's weights and
# activations to 8 bits of mantissa (2**-8 = 0.4% per rounding, accumulated over a span of blocks).
# An int8 node (weights from `slowllm quantize`) differs from bf16 by its weight rounding: measured 2-5%
# per position over 4-6 blocks of random models (tiny and bloom-1b7-shaped); 0.15 leaves 3x margin. So
# verification is coarser wherever an int8 node takes part: a lie under 15% passes there.
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 5e-2, "int8": 0.15}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tolerance(*dtypes: str) -> float:
    return max(TOLERANCE.get(d, 5e-2) for d in dtypes)


def agree(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, tol: float) -> bool:
    """Do `a` and `b` ([rows, positions, hidden]) agree at every real position within `tol` (relative)?"""
    diff = (a.float() - b.float()).norm(dim=-1)
    scale = torch.maximum(a.float().norm(dim=-1), b.float().norm(dim=-1))
    # a floor from the largest position keeps all-but-zero rows (e.g. gradients at padding) comparable
    ok = diff <= tol * scale + 1e-6 * scale.max() + 1e-12
    if mask is not None:
        ok = ok | (mask[:, -a.shape[1]:] == 0)
    return bool(ok.all())


class Referee:
    """The coordinator's own computation of a span, from its checkpoint: the ground truth in a dispute.

    It computes the span in the dtype the judged node declared (an honest bf16 node is judged against
    bf16 arithmetic: at Bloom-176B width one bf16 block differs from fp32 by more than bf16's tolerance at
    some positions, and would be banned against an fp32 reference). Blocks are streamed from disk one at
    a time (a span of Bloom-176B blocks never sits in the coordinator's memory at once); disputes are
    rare, so they pay the read.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self._lock = threading.Lock()  # one dispute at a time: each may read many GB
        self.disputes = 0

    def _attention(self, mask: torch.Tensor, q_len: int, dtype: torch.dtype,
                   budget: int = 256 << 20) -> Attention:
        # Imported here, as BlockStream below: the blocks are transformers' (~3 s to import on 2 cores),
        # and only a dispute needs them, so a coordinator starts without them.
        from slowllm.node._blocks import Attention

        return Attention(mask, q_len, self.config, dtype, "cpu", budget)

    @torch.no_grad()
    def forward(self, first: int, last: int, hidden: torch.Tensor, mask: torch.Tensor,
                dtype: str = "float32") -> torch.Tensor:
        from slowllm.node._streaming import BlockStream

        with self._lock:
            self.disputes += 1
            dt = DTYPES[dtype]
            stream = BlockStream(self.checkpoint, dt, "cpu", prefetch=False)
            attn = self._attention(mask, hidden.shape[1], dt)
            hidden = hidden.to(dt)
            for _, block in stream.blocks(range(first, last + 1), "verify", progress=False):
                hidden = attn.run(block, hidden)
            return hidden.float()

    def backward(self, first: int, last: int, hidden: torch.Tensor, mask: torch.Tensor,
                 grad: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
        from slowllm.node._streaming import BlockStream

        with self._lock:
            self.disputes += 1
            dt = DTYPES[dtype]
            stream = BlockStream(self.checkpoint, dt, "cpu", prefetch=False)
            attn = self._attention(mask, hidden.shape[1], dt)
            whole = self._attention(mask, hidden.shape[1], dt, budget=1 << 62)
            inputs, hidden = [], hidden.to(dt)
            with torch.no_grad():
                for _, block in stream.blocks(range(first, last + 1), "verify", progress=False):
                    inputs.append(hidden)
                    hidden = attn.run(block, hidden)
            grad = grad.to(dt)
            layers = list(range(first, last + 1))
            for (_, block), x in zip(stream.blocks(list(reversed(layers)), "verify", progress=False),
                                     reversed(inputs)):
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(whole.run(block, x), x, grad)
            return grad.float()
