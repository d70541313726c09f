"""Run transformers' own `BloomBlock` on weights we load ourselves.

Attention, MLP and layer norms are transformers' code; this module only decides where the weights come
from, builds the alibi bias and the causal + padding mask once per batch (not once per block), and keeps
the per-block key/value cache that `BloomAttention` appends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BloomConfig
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from ._linears import use_gemv_linears, use_int8_linears


def new_block(config: BloomConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
              int8: bool = False) -> BloomBlock:
    """An empty block whose parameters are filled by `load_weights`.

    layer_idx is 0 because every block gets a cache object of its own (`BlockCache`). With `int8`, the
    four linears are `Int8Linear`s (an int8 checkpoint's weights and per-row scales); in bf16 they are
    `GemvLinear`s (decode steps through slowllm's GEMV kernel).
    """
    with torch.device("meta"):
        block = BloomBlock(config, layer_idx=0)
        if int8:
            use_int8_linears(block)
        elif dtype == torch.bfloat16:
            use_gemv_linears(block)
    block.to_empty(device=device).to(dtype)  # floating parameters only: int8 weights stay int8
    block.eval()
    block.requires_grad_(False)
    return block


def load_weights(block: BloomBlock, tensors: dict[str, torch.Tensor], layer: int) -> None:
    """Point or copy the block's parameters at one layer's tensors.

    When the checkpoint already holds the parameter's dtype on the same device (the compute dtype, or
    int8 weights), the parameters become the (memory-mapped) checkpoint tensors themselves: no copy, no
    allocation. Otherwise the tensors are converted into the block's existing parameter buffers, which is
    several times faster than converting into freshly allocated tensors.
    """
    for suffix, param in block.named_parameters():
        key = f"h.{layer}.{suffix}"
        if key not in tensors:
            raise ValueError(f"tensor {key} is missing: is this block int8 while the checkpoint is not, or the reverse?")
        src = tensors[key]
        if src.shape != block_param_shape(block, suffix):
            raise ValueError(f"tensor {key} has shape {tuple(src.shape)}, expected {block_param_shape(block, suffix)}")
        if src.dtype == param.dtype and src.device == param.device:
            param.data = src
        else:
            if param.data.shape != src.shape:  # released earlier: allocate the buffer once more
                param.data = torch.empty(src.shape, dtype=param.dtype, device=param.device)
            param.data.copy_(src)


def release_weights(block: BloomBlock) -> None:
    """Drop the block's references to checkpoint memory maps so their pages can be reclaimed."""
    for param in block.parameters():
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def block_param_shape(block: BloomBlock, suffix: str) -> tuple[int, ...]:
    h = block.self_attention.hidden_size
    inner = {"query_key_value": 3 * h, "dense_h_to_4h": 4 * h}
    name, kind = suffix.rsplit(".", 2)[-2:]
    rows = inner.get(name, h)
    if kind in ("bias", "weight_scale") or "layernorm" in suffix:
        return (rows,)
    return (rows, 4 * h) if name == "dense_4h_to_h" else (rows, h)


def block_nbytes(config: BloomConfig, dtype: torch.dtype, int8: bool = False) -> int:
    """Bytes of one block's parameters in memory: `dtype` floats, or int8 linear weights beside them."""
    h = config.hidden_size
    matrices = 12 * h * h
    vectors = 4 * h + 3 * h + h + 4 * h + h
    if int8:
        return matrices + (vectors + 9 * h) * dtype.itemsize  # + one scale per output row
    return (matrices + vectors) * dtype.itemsize


@dataclass
class AttentionInputs:
    """Alibi bias and additive mask for one batch, shared by every block it passes through."""

    alibi: torch.Tensor  # [batch * heads, 1, kv_len]
    mask: torch.Tensor  # [batch, 1, q_len, kv_len], 0 where attention is allowed, dtype-min elsewhere


def attention_inputs(attention_mask: torch.Tensor, q_len: int, n_head: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> AttentionInputs:
    """Build alibi and mask for queries that are the last `q_len` positions of `attention_mask` [B, T].

    Alibi positions count only real tokens (transformers' `build_alibi_tensor`), so a left-padded row
    gets exactly the biases of the same prompt unpadded. Every query may attend to itself, so rows of
    padding never see an all-masked softmax (which would give NaN and poison later steps' caches).
    """
    attention_mask = attention_mask.to(device)
    batch, kv_len = attention_mask.shape
    alibi = build_alibi_tensor(attention_mask, n_head, dtype)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None] & attention_mask.bool()[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    mask = torch.zeros(batch, 1, q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return AttentionInputs(alibi, mask)


class BlockCache:
    """Keys and values of one block for one generation session (the `Cache.update` that BloomAttention calls).

    Positions are written in place into buffers with spare room (grown by half when full), so a decode
    step copies one position, not the whole cache as concatenation (transformers' DynamicCache) does:
    at 2,000 cached positions of Bloom-176B that is 229 MB per block per token saved. `update` returns
    views of the filled part. `state`/`from_state` let the streaming executor move a cache to disk and
    back, spare room and all (so a streamed decode step does not copy the cache either).
    """

    GROW_MIN = 64  # positions added at least when a buffer grows

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 length: int | None = None):
        self._keys, self._values = keys, values
        self._length = (0 if keys is None else keys.shape[-2]) if length is None else length

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[..., : self._length, :]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[..., : self._length, :]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        new = keys.shape[-2]
        need = self._length + new
        if self._keys is None or need > self._keys.shape[-2]:
            if self._keys is None or self._length == 0:
                capacity = need if new > 1 else need + self.GROW_MIN  # a prompt pass: exact; decode: room
                old_k = old_v = None
            else:
                capacity = max(need, self._keys.shape[-2] + max(self.GROW_MIN, self._keys.shape[-2] // 2))
                old_k, old_v = self.keys, self.values
            shape = (*keys.shape[:-2], capacity, keys.shape[-1])
            self._keys = torch.empty(shape, dtype=keys.dtype, device=keys.device)
            self._values = torch.empty(shape, dtype=values.dtype, device=values.device)
            if old_k is not None:
                self._keys[..., : self._length, :] = old_k
                self._values[..., : self._length, :] = old_v
        self._keys[..., self._length: need, :] = keys
        self._values[..., self._length: need, :] = values
        self._length = need
        return self.keys, self.values

    @property
    def length(self) -> int:
        return self._length

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding's rejected drafts): the next
        update overwrites them in place."""
        self._length = min(self._length, max(0, length))

    def nbytes(self) -> int:
        """Memory held, spare room included."""
        return 0 if self._keys is None else 2 * self._keys.numel() * self._keys.element_size()

    def state(self) -> dict[str, torch.Tensor]:
        if self._keys is None or self._length == 0:
            return {}
        return {"keys": self._keys, "values": self._values, "length": torch.tensor(self._length)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "BlockCache":
        length = state.get("length")
        return cls(state.get("keys"), state.get("values"), None if length is None else int(length))


def run_block(block: BloomBlock, hidden: torch.Tensor, attn: AttentionInputs,
              cache: BlockCache | None = None) -> torch.Tensor:
    # a tuple whose first element is the output (its length differs across transformers versions)
    return block(hidden, alibi=attn.alibi, attention_mask=attn.mask, layer_past=cache, use_cache=cache is not None)[0]


# Bytes per attention-score element while one block runs: fp32 scores, the mask added to them, softmax in
# fp32 and its cast back, plus the additive mask itself (BloomAttention keeps about five such copies).
SCORE_BYTES = 20
DEFAULT_SCORE_BUDGET = 256 << 20


def query_chunk(batch: int, n_head: int, kv_len: int, score_budget: int) -> int:
    """Query positions per chunk so that one chunk's attention scores stay within `score_budget` bytes."""
    return max(1, score_budget // (batch * n_head * kv_len * SCORE_BYTES))


class Attention:
    """How one batch attends, for every block it passes through: its 0/1 mask [B, past + q] and the
    last q positions as queries.

    Attention scores are [B, heads, q, kv]: for one long prompt they are gigabytes (a 12k-token prompt
    at Bloom-176B's 112 heads: 65 GB in fp32). So queries run in chunks through a key/value cache (the
    session's, or a temporary one): the same keys and values under the causal mask, the same numbers up
    to float rounding, and memory linear in the length. Short inputs (every decode step) build alibi and
    mask once and share them across all blocks.
    """

    def __init__(self, mask: torch.Tensor, q_len: int, n_head: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", score_budget: int = DEFAULT_SCORE_BUDGET):
        self.mask, self.q_len, self.n_head, self.dtype, self.device = mask, q_len, n_head, dtype, device
        self.chunk = query_chunk(mask.shape[0], n_head, mask.shape[1], score_budget)
        self._whole = attention_inputs(mask, q_len, n_head, dtype, device) if q_len <= self.chunk else None

    def run(self, block: BloomBlock, hidden: torch.Tensor, cache: BlockCache | None = None) -> torch.Tensor:
        if self._whole is not None:
            return run_block(block, hidden, self._whole, cache)
        work = cache if cache is not None else BlockCache()  # a stateless pass keeps keys only per block
        past = self.mask.shape[1] - self.q_len
        outs = []
        for start in range(0, self.q_len, self.chunk):
            end = min(self.q_len, start + self.chunk)
            attn = attention_inputs(self.mask[:, : past + end], end - start, self.n_head, self.dtype, self.device)
            outs.append(run_block(block, hidden[:, start:end], attn, work))
        return torch.cat(outs, dim=1)
