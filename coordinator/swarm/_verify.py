"""Verification by recomputation: is a node's answer what the blocks compute?

`--verify F` re-runs a random fraction F of hops on a second node covering the same blocks and compares
the two answers with a tolerance derived from the two nodes' dtypes. The coordinator's own computation
(`Referee`, from its checkpoint, one block in memory at a time, in the arithmetic the judged node
declares) decides:
- every node's first hop (a node on probation: one span computed here per node that joins), so a node
  that lies from the start never has an answer used, even alone on its span;
- every disagreement between two nodes (whoever is wrong is banned);
- a fraction F of the hops where two nodes AGREED, and every such hop while a checker is on probation:
  two colluding nodes telling the same lie are caught too. At the default F = 0.05 that is 0.25% of
  hops recomputed here; at F = 1 every hop is (an audit setting: the coordinator computes the model).
Only positions the mask marks real are compared (padding positions are never used downstream).

Between nodes, a lie smaller than the tolerance passes (it moves each hidden state by less than two
honest machines of different dtypes differ by). Against the referee the tolerance is the measured spread
of the same arithmetic (`REFEREE_TOLERANCE`): a 5% lie is caught whatever dtype or int8 the node declares.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from slowllm.node import Checkpoint

if TYPE_CHECKING:
    from slowllm.node.engine._blocks import Attention

# Relative error per position (L2 over the hidden dimension) two honest nodes stay within: fp32 nodes
# differ by summation order (threads, query chunking); a bf16 node rounds every block's weights and
# activations to 8 bits of mantissa (2**-8 = 0.4% per rounding, accumulated over a span of blocks).
# An int8 node (weights from `slowllm quantize`) differs from bf16 by its weight rounding: measured 2-5%
# per position over 4-6 blocks of random models (tiny and bloom-1b7-shaped); 0.15 leaves 3x margin. So
# verification is coarser wherever an int8 node takes part: a lie under 15% passes there.
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 5e-2, "int8": 0.15}
# The referee judges a node against the very arithmetic the node declares (its dtype, and int8 weights
# quantized from the coordinator's checkpoint exactly as `slowllm quantize` does), so only summation
# order and batch composition separate an honest answer from the referee's. Measured by
# bench/referee_tolerance.py (docs/trust.md): these leave a margin above it, and stay below a 5% lie.
REFEREE_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 2e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tolerance(*dtypes: str) -> float:
    return max(TOLERANCE.get(d, 5e-2) for d in dtypes)


def referee_tolerance(dtype: str, *also: str) -> float:
    """How far the referee lets a node's answer stray from its own computation in the node's arithmetic
    (`also`: "int8" when the coordinator's own weights are an int8 copy it cannot un-round)."""
    return max([REFEREE_TOLERANCE.get(dtype, 2e-2)] + [TOLERANCE[d] for d in also])


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
        from slowllm.node.engine._blocks import Attention

        return Attention(mask, q_len, self.config, dtype, "cpu", budget)

    def _blocks(self, layers, dt: torch.dtype, int8: bool):
        """The blocks in `dt`, one at a time; with `int8`, linear weights quantized as `slowllm quantize`
        makes them from this checkpoint (deterministic), the arithmetic an int8 node declares."""
        from slowllm.node.engine._streaming import BlockStream

        if not int8 or self.checkpoint.int8:
            yield from (block for _, block in BlockStream(self.checkpoint, dt, "cpu", prefetch=False).blocks(
                layers, "verify", progress=False))
            return
        from slowllm.node.engine._blocks import load_weights, new_block
        from slowllm.node.engine._checkpoint import SCALE
        from slowllm.node.engine._quantize import quantize_slices

        for layer in layers:
            tensors = dict(self.checkpoint.read_block(layer))
            for key in self.checkpoint.quantized_keys(layer):
                parts = list(quantize_slices(tensors[key]))
                tensors[key], tensors[key + SCALE] = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            block = new_block(self.config, dt, "cpu", int8=True)
            load_weights(block, tensors, layer)
            yield block

    @torch.no_grad()
    def forward(self, first: int, last: int, hidden: torch.Tensor, mask: torch.Tensor,
                dtype: str = "float32", int8: bool = False) -> torch.Tensor:
        with self._lock:
            self.disputes += 1
            dt = DTYPES[dtype]
            attn = self._attention(mask, hidden.shape[1], dt)
            hidden = hidden.to(dt)
            for block in self._blocks(range(first, last + 1), dt, int8):
                hidden = attn.run(block, hidden)
            return hidden.float()

    def backward(self, first: int, last: int, hidden: torch.Tensor, mask: torch.Tensor,
                 grad: torch.Tensor, dtype: str = "float32", int8: bool = False) -> torch.Tensor:
        with self._lock:
            self.disputes += 1
            dt = DTYPES[dtype]
            attn = self._attention(mask, hidden.shape[1], dt)
            whole = self._attention(mask, hidden.shape[1], dt, budget=1 << 62)
            inputs, hidden = [], hidden.to(dt)
            with torch.no_grad():
                for block in self._blocks(range(first, last + 1), dt, int8):
                    inputs.append(hidden)
                    hidden = attn.run(block, hidden)
            grad = grad.to(dt)
            layers = list(range(first, last + 1))
            for block, x in zip(self._blocks(list(reversed(layers)), dt, int8), reversed(inputs)):
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(whole.run(block, x), x, grad)
            return grad.float()
