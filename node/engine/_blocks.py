"""Run transformers' own blocks (`BloomBlock`, `GPTNeoXLayer`, `LlamaDecoderLayer`...) on weights we load ourselves.

Attention, MLP and norms are transformers' code; this module only decides where the weights come from,
builds the position inputs (Bloom's alibi, or rotary cos/sin) and the causal + padding mask once per
batch (not once per block), and keeps the per-block key/value cache that the attention appends to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bloom.modeling_bloom import BloomGelu, build_alibi_tensor

from slowllm.node.kernels._kernels import kernels
from slowllm.node.kernels._linears import use_gemv_linears, use_int8_linears

from ._attention import _HALF, onednn_attention
from ._attention_products import for_attention
from ._attention_products import usable as kernel_products
from ._families import Family, family_of, intermediate_size, layer_shapes


def new_block(config, dtype: torch.dtype, device: torch.device | str = "cpu", int8: bool = False,
              linears: torch.dtype | None = None) -> torch.nn.Module:
    """An empty block of the config's family whose parameters are filled by `load_weights`.

    With `int8`, the block's linears are `Int8Linear`s (an int8 checkpoint's weights and per-row scales);
    in bf16, or with bf16 `linears` under fp32 (`linear_dtype`), they are `GemvLinear`s (decode steps
    through slowllm's GEMV kernel). Bloom's GELU is PyTorch's fused one (`TanhGelu`).
    """
    family = family_of(config)
    bf16_weights = not int8 and torch.bfloat16 in (dtype, linears)
    with torch.device("meta"):
        block = family.new_layer(config)
        use_fused_gelu(block)
        if int8:
            use_int8_linears(block)
        elif bf16_weights:
            use_gemv_linears(block)
    block.to_empty(device=device).to(dtype)  # floating parameters only: int8 weights stay int8
    if bf16_weights and dtype != torch.bfloat16:  # fp32 compute on weights kept in bf16 (exact when widened)
        for linear in block.modules():
            if isinstance(linear, nn.Linear):
                linear.weight = nn.Parameter(linear.weight.to(torch.bfloat16), requires_grad=False)
    block.eval()
    block.requires_grad_(False)
    block.slowllm_family = family  # how to name its tensors and call it (`load_weights`, `run_block`)
    block.slowllm_shapes = {name: shape for name, shape, _ in layer_shapes(config)}
    return block


class TanhGelu(nn.Module):
    """Bloom's GELU, the tanh approximation, as PyTorch's one fused op (`F.gelu(approximate="tanh")`, with
    its own backward for tuning) instead of `BloomGelu`'s nine elementwise ops and autograd Function, each
    dispatched and allocated per block per step. The same function (Megatron's 0.79788456 is sqrt(2/pi)
    to 8 digits): fp32 outputs within 5e-7 of BloomGelu's, gradients within 1.1e-6 (inputs of |x| <= 16);
    in bf16, rounded once instead of after each op, nearer the fp32 truth (0.0078 against 0.0089). A
    bloom-1b7 decode step, one prompt, the two in turns in one process (6 turns each, Zen 4): 0.972x the
    time with fp32 activations on the AVX2 path (73.2 -> 71.4 ms), ~0.975x in bf16 on avx512bf16.

    bf16 without autograd (decoding, scoring) looks each element up in a table of that op's answer for
    every bf16 value (`bf16_lookup`, `_bf16_gelu_table`): the op's numbers bit for bit, a load per element
    instead of a widened tanh (8 prompts' [8, 8192]: 77 -> 22 us a block; one prompt's: 19 -> 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            k = kernels()
            if k is not None:
                return k.bf16_lookup(x, _bf16_gelu_table())
        return F.gelu(x, approximate="tanh")


@functools.cache
def _bf16_gelu_table() -> torch.Tensor:
    """`F.gelu(approximate="tanh")` of every bf16 value, indexed by its bits (65,536 x 2 bytes), computed
    once by PyTorch's own op in this process, in halves of 32,768: each one call on one thread (no more
    than PyTorch's grain), all of it whole vectors. (PyTorch's scalar loop, which it runs past the last
    whole vector of a thread's share, rounds a few values otherwise: GELU(-5.09375) is -1.5e-7 there and
    -0 in the vectors. Decode steps' activations, 8,192 or 57,344 a row, are whole vectors.)"""
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # bits 0..65535 (wrapped)
    with torch.inference_mode(False):  # a normal tensor, whichever pass asks first
        return torch.cat([F.gelu(half, approximate="tanh") for half in every.split(32768)])


def use_fused_gelu(block: nn.Module) -> None:
    """Replace the block's `BloomGelu` (Bloom's MLP activation) by `TanhGelu`; other families' activations
    are already one op each (ACT2FN)."""
    for name, module in list(block.named_modules()):
        if type(module) is BloomGelu:
            block.set_submodule(name, TanhGelu())


def load_weights(block: torch.nn.Module, tensors: dict[str, torch.Tensor], layer: int) -> None:
    """Point or copy the block's parameters at one layer's tensors.

    When the checkpoint already holds the parameter's dtype on the same device (the compute dtype, or
    int8 weights), the parameters become the (memory-mapped) checkpoint tensors themselves: no copy, no
    allocation. Otherwise the tensors are converted into the block's existing parameter buffers, which is
    several times faster than converting into freshly allocated tensors.
    """
    prefix = block.slowllm_family.block_prefix(layer)
    for suffix, param in block.named_parameters():
        key = prefix + suffix
        if key not in tensors:
            raise ValueError(f"tensor {key} is missing: is this block int8 while the checkpoint is not, or the reverse?")
        src = tensors[key]
        expected = block_param_shape(block, suffix)
        if src.shape != expected:
            raise ValueError(f"tensor {key} has shape {tuple(src.shape)}, expected {expected}")
        if src.dtype == param.dtype and src.device == param.device:
            param.data = src
        else:
            if param.data.shape != src.shape:  # released earlier: allocate the buffer once more
                param.data = torch.empty(src.shape, dtype=param.dtype, device=param.device)
            param.data.copy_(src)


def release_weights(block: torch.nn.Module) -> None:
    """Drop the block's references to checkpoint memory maps so their pages can be reclaimed."""
    for param in block.parameters():
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def block_param_shape(block: torch.nn.Module, suffix: str) -> tuple[int, ...]:
    if suffix.endswith("weight_scale"):  # an Int8Linear's per-row scales: one per row of its weight
        return block.slowllm_shapes[suffix.removesuffix("_scale")][:1]
    return block.slowllm_shapes[suffix]


def block_nbytes(config, dtype: torch.dtype, int8: bool = False, linears: torch.dtype | None = None) -> int:
    """Bytes of one block's parameters in memory: `dtype` floats, or int8 (with scales) or `linears`
    linear weights beside them."""
    total = 0
    for _, shape, linear in layer_shapes(config):
        n = torch.Size(shape).numel()
        itemsize = (linears or dtype).itemsize if linear else dtype.itemsize
        total += n + shape[0] * dtype.itemsize if int8 and linear else n * itemsize
    return total


def work_width(config) -> int:
    """Numbers per token alive inside one block at its peak (fused projections, context, MLP, residuals)."""
    return 8 * config.hidden_size + 2 * intermediate_size(config)


# Where attention runs through oneDNN (`onednn_attention`), every new shape of its two batched matrix
# products builds a new oneDNN primitive: ~1 ms per block, against ~0.1 ms to run it at decode sizes, and
# a decode step's key length is new at every token (measured: 4 of a node's 13 ms per pass at hidden
# 1024). So a cache's keys and values are seen through a view padded to a multiple of KV_BUCKET positions
# within the buffer's spare room (masked: the padding gets no weight), and shapes repeat. PyTorch's own
# loops (bf16 on an AVX2 PC) build nothing: there padding would only add work.
KV_BUCKET = 64


def kv_bucketed(length: int) -> int:
    """`length` rounded up to a multiple of KV_BUCKET."""
    return -(-length // KV_BUCKET) * KV_BUCKET


def pads_views(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether attention runs through oneDNN here (`onednn_attention`), so cached keys are seen padded."""
    return onednn_attention(dtype, device)


class KVLayout(NamedTuple):
    """How `BlockCache` stores keys and values: [..., positions, head_dim], or transposed [..., head_dim,
    positions]; attention always sees [..., positions, head_dim] views."""

    keys_transposed: bool = False
    values_transposed: bool = False


# Bloom's attention computes `baddbmm(query, keys.transpose)` and `bmm(probs, values)`, and how fast depends
# on which path runs them and how the cache stores the matrices (16 heads x 128 on Zen 4; docs/int8-and-kernels.md):
# - oneDNN (bf16 on AVX512 CPUs; one query, keys and values seen as L positions of buffers of 1.5 L, in L3):
#   keys stored transposed 2.7-2.9x faster than as rows at L = 512-2,048, values as rows 4-14x faster than
#   transposed (153 / 443 us and 111 / 453 at L = 512); prompts (128 queries) 1.3-2.8x. GPUs: the same.
# - PyTorch's own loops (no oneDNN for the type: bf16 and fp16 on an AVX2 PC): the reverse, by far more:
#   keys as rows 3.8-17x faster (L = 2,048: 539 us against 9,059), values transposed 5.6-11x (254 / 2,820);
#   8 queries 6-23x, prompts 6-23x (128 queries at L = 2,048: 54 ms against 1.23 s for the keys alone).
# - MKL (fp32: fp32 checkpoints, and an AVX2 PC's default activations): keys transposed 1.4-1.7x faster, and
#   values transposed too: a decode step's attention over 24 blocks' caches read from memory (as in a step,
#   whose weights push them out of L3), capped at AVX2, one query: at 200 / 600 / 1,500 positions 5.0 / 12.6
#   / 27.3 ms with values as rows, 5.1 / 10.0 / 18.9 transposed; 8 queries 6.7 / 16.6 / 43.2 against 7.4 /
#   17.1 / 42.1; prompts alike.
_TRANSPOSED_KEYS, _TRANSPOSED_VALUES = KVLayout(keys_transposed=True), KVLayout(values_transposed=True)
_BOTH_TRANSPOSED = KVLayout(keys_transposed=True, values_transposed=True)


def cache_layout(family: Family, dtype: torch.dtype, device: torch.device) -> KVLayout:
    """How a block's cache stores its keys and values for the family's attention on this path (above)."""
    if not family.bmm_attention:
        return KVLayout()
    if device.type != "cpu":
        return _TRANSPOSED_KEYS
    if dtype not in _HALF:  # (fp32: values as rows where slowllm's kernel multiplies decode steps' attention)
        return _TRANSPOSED_KEYS if kernel_products(dtype, device) else _BOTH_TRANSPOSED
    return _TRANSPOSED_KEYS if onednn_attention(dtype, device) else _TRANSPOSED_VALUES


def kv_view_length(length: int, dtype: torch.dtype, device: torch.device) -> int:
    """The key length attention sees for `length` cached positions: padded to KV_BUCKET where it pays."""
    return kv_bucketed(length) if pads_views(dtype, device) else length


# Steps of at most this many new positions (decoding, a speculative check) see a cache's whole buffer, spare
# room included (masked): oneDNN multiplies keys and values that fill their buffer ~2x faster than a view
# into a larger one (bf16, 16 heads, 1,088 positions in a buffer of 1,100: the scores 398 -> 207 us, the
# weighted values 329 -> 140 us; the whole of a buffer of 1,632 still beats 1,088 of it: 370 / 233 us), and
# its shape changes only when the buffer grows. Scores grow with the spare room (at most half as many
# positions again), so longer steps keep views padded to KV_BUCKET. Where slowllm's kernel multiplies a Bloom
# decode step's attention (_attention_products.py) the step sees exact views: the kernel's time follows the
# positions it is shown, whatever the buffer.
WHOLE_VIEW_MAX_NEW = 8


@dataclass
class AttentionInputs:
    """Position inputs and additive mask for one batch, shared by every block it passes through."""

    mask: torch.Tensor  # [batch, 1, q_len, kv_len], 0 where attention is allowed, dtype-min elsewhere
    alibi: torch.Tensor | None = None  # Bloom: [batch * heads, 1, kv_len]
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # others: cos, sin [batch, q_len, rotary dims]
    _padded: dict = field(default_factory=dict, repr=False)

    def padded(self, length: int) -> "AttentionInputs":
        """The same inputs for keys padded on the right to `length` slots (masked), built once per length."""
        extra = length - self.mask.shape[-1]
        if extra <= 0:
            return self
        if length not in self._padded:
            mask = F.pad(self.mask, (0, extra), value=torch.finfo(self.mask.dtype).min)
            alibi = None if self.alibi is None else F.pad(self.alibi, (0, extra))
            self._padded[length] = AttentionInputs(mask, alibi, self.rotary)
        return self._padded[length]


def positions(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids [B, q_len] of the last q_len slots: each row counts only its real tokens (mask 1), so a
    left-padded row, or one with holes, gets exactly the positions of the same tokens without them."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)[:, attention_mask.shape[1] - q_len:]


def attention_inputs(config, attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> AttentionInputs:
    """Build positions and mask for queries that are the last `q_len` slots of `attention_mask` [B, T].

    Positions count only real tokens (alibi: transformers' `build_alibi_tensor`; rotary: `positions`),
    as for the same prompt unpadded. Every query may attend to itself, so rows of padding never see an
    all-masked softmax (which would give NaN and poison later steps' caches).
    """
    family = family_of(config)
    attention_mask = attention_mask.to(device)
    batch, kv_len = attention_mask.shape
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None] & attention_mask.bool()[:, None, :]
    window = family.window(config)
    if window:  # Mistral: each query sees the last `window` slots only (transformers counts slots too)
        allowed &= (k_pos > q_pos - window)[None]
    allowed |= (k_pos == q_pos)[None]
    mask = torch.zeros(batch, 1, q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    if family.rotary_class is None:
        return AttentionInputs(mask, alibi=build_alibi_tensor(attention_mask, config.num_attention_heads, dtype))
    rotary = _rotary(family, config, device)
    return AttentionInputs(mask, rotary=rotary(torch.empty(0, dtype=dtype, device=device), positions(attention_mask, q_len)))


_ROTARY: dict[tuple, tuple] = {}


def _rotary(family: Family, config, device) -> torch.nn.Module:
    """The family's rotary embedding (no weights: frequencies from the config), built once per config
    object (kept beside it, so its id is never reused while the entry lives)."""
    key = (id(config), str(device))
    if key not in _ROTARY:
        with torch.inference_mode(False):  # normal buffers: shared by sessions' passes and the others
            _ROTARY[key] = (config, family.rotary(config).to(device))
    return _ROTARY[key][1]


def kv_buffer(shape: tuple, dtype: torch.dtype, device, transposed: bool) -> torch.Tensor:
    """An empty key or value buffer seen as `shape` [..., positions, head_dim]; stored [..., head_dim,
    positions] when `transposed` (`KVLayout`)."""
    if transposed:
        return torch.empty((*shape[:-2], shape[-1], shape[-2]), dtype=dtype, device=device).transpose(-1, -2)
    return torch.empty(shape, dtype=dtype, device=device)


class BlockCache:
    """Keys and values of one block for one generation session (the `Cache.update` its attention calls).

    Positions are written in place into buffers with spare room (grown by half when full), so a decode
    step copies one position, not the whole cache as concatenation (transformers' DynamicCache) does:
    at 2,000 cached positions of Bloom-176B that is 229 MB per block per token saved. `update` returns
    views of the filled part. `state`/`from_state` let the streaming executor move a cache to disk and
    back, spare room and all (so a streamed decode step does not copy the cache either). Keys and values
    are stored as the path that multiplies them reads them fastest (`cache_layout`; `lay_out`, which
    `run_block` calls before the first update): every view still has the shape [..., positions, head_dim].

    A session's passes run in inference mode (`ResidentBlocks.forward` with caches, `run_merged_steps`,
    `StreamingExecutor.step_sessions`: the only code that makes or writes a cache's tensors): the ~35
    PyTorch ops of each block then skip autograd's bookkeeping (version counters, views' tracking): a
    bloom-1b7 decode step 1.3-2.6% faster (paired turns), the same numbers. Passes without caches
    (scoring, and tuning, whose outputs get `requires_grad`) stay in `no_grad`.
    """

    GROW_MIN = 64  # positions added at least when a buffer grows
    products = False  # hand a decode step's keys and values to attention as DecodeKV (`run_block` sets it)

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 length: int | None = None, limit: int | None = None, layout: KVLayout = KVLayout()):
        self._keys, self._values = keys, values  # [..., capacity, head_dim] (views, whatever the storage)
        self._length = (0 if keys is None else keys.shape[-2]) if length is None else length
        self.limit = limit  # positions the session may ever hold: spare room never goes beyond it
        self.layout = layout

    def lay_out(self, layout: KVLayout) -> None:
        """Store keys and values so (`cache_layout`); kept once buffers exist."""
        if self._keys is None:
            self.layout = layout

    @property
    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[-2]

    def capacity_for(self, new: int) -> int:
        """Positions the buffers will have after `new` more (the current capacity when they fit)."""
        need = self._length + new
        if need <= self.capacity:
            return self.capacity
        if self._keys is None or self._length == 0:
            # A prompt pass: a scratch cache (no limit: no step follows) holds exactly the prompt; a
            # session's gets room for its first decode steps too, which would otherwise grow it at once and
            # copy the whole prompt's keys and values (8 prompts of the bloom-1b7 shape in fp32: 50-90 ms).
            room = need if new > 1 and self.limit is None else need + self.GROW_MIN
        else:
            room = max(need, self.capacity + max(self.GROW_MIN, self.capacity // 2))
        return max(need, min(room, self.limit)) if self.limit is not None else room

    def view_length(self, total: int, dtype: torch.dtype, device: torch.device) -> int:
        """The key length `update` returns when the session reaches `total` positions: where views are
        padded (`pads_views`), the whole buffer for a decode-sized step (`WHOLE_VIEW_MAX_NEW`), else
        `kv_view_length`'s, always within the buffers' room (which padding never grows: the KV budget counts
        what is allocated; a prompt pass's exact buffers are seen unpadded)."""
        capacity = self.capacity if total <= self.capacity else self.capacity_for(total - self._length)
        if not pads_views(dtype, device):
            return total
        if total - self._length <= WHOLE_VIEW_MAX_NEW:  # (slowllm's kernel reads what it is shown: exact)
            return total if self.products and kernel_products(dtype, device) else capacity
        return max(total, min(kv_bucketed(total), capacity))

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[..., : self._length, :]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[..., : self._length, :]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append the new positions; return the keys and values attention sees (`append`), for a Bloom
        block's decode step as `DecodeKV`: its two products then run slowllm's kernel
        (_attention_products.py)."""
        keys_seen, values_seen = self.append(keys, values)
        return for_attention(keys_seen, values_seen, keys.shape[-2]) if self.products else (keys_seen, values_seen)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions; return the keys and values attention sees: the filled part, padded
        to `kv_view_length` (`run_block` pads the mask alike). Slots past the filled part hold zeros or
        rolled-back positions: finite numbers under a masked score, so they get exactly zero weight."""
        new = keys.shape[-2]
        need = self._length + new
        view = self.view_length(need, keys.dtype, keys.device)
        if self._keys is None or need > self.capacity:
            capacity = self.capacity_for(new)
            old_k, old_v = (None, None) if self._keys is None or self._length == 0 else (self.keys, self.values)
            shape = (*keys.shape[:-2], capacity, keys.shape[-1])
            self._keys = kv_buffer(shape, keys.dtype, keys.device, self.layout.keys_transposed)
            self._values = kv_buffer(shape, values.dtype, values.device, self.layout.values_transposed)
            self._keys[..., need:, :] = 0  # (spare room a padded view may show: finite)
            self._values[..., need:, :] = 0
            if old_k is not None:
                self._keys[..., : self._length, :] = old_k
                self._values[..., : self._length, :] = old_v
        self._keys[..., self._length: need, :] = keys
        self._values[..., self._length: need, :] = values
        self._length = need
        return self._keys[..., :view, :], self._values[..., :view, :]

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
        keys_t, values_t = self.layout  # (the buffers themselves, as stored)
        return {"keys": self._keys.transpose(-1, -2) if keys_t else self._keys,
                "values": self._values.transpose(-1, -2) if values_t else self._values,
                "length": torch.tensor(self._length),
                "keys_transposed": torch.tensor(keys_t), "values_transposed": torch.tensor(values_t)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "BlockCache":
        length, keys, values = state.get("length"), state.get("keys"), state.get("values")
        layout = KVLayout(*(name in state and bool(state[name]) for name in ("keys_transposed", "values_transposed")))
        return cls(keys.transpose(-1, -2) if layout.keys_transposed else keys,
                   values.transpose(-1, -2) if layout.values_transposed else values,
                   None if length is None else int(length), layout=layout)


def run_block(block: torch.nn.Module, hidden: torch.Tensor, attn: AttentionInputs,
              cache: BlockCache | None = None) -> torch.Tensor:
    family = block.slowllm_family
    if cache is not None:  # (a session's cache may come from a store without its family: set each time)
        cache.products = family.bmm_attention
    if isinstance(cache, BlockCache):  # its keys come padded (`BlockCache.update`): the mask too
        if cache.capacity == 0:
            cache.lay_out(cache_layout(family, attn.mask.dtype, attn.mask.device))
        attn = attn.padded(cache.view_length(attn.mask.shape[-1], attn.mask.dtype, attn.mask.device))
    kwargs = {family.cache_arg: cache, "use_cache": cache is not None, "attention_mask": attn.mask}
    if attn.alibi is not None:
        kwargs["alibi"] = attn.alibi
    else:
        kwargs["position_embeddings"] = attn.rotary
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # a tuple in some families and transformers versions


# Bytes per attention-score element while one block runs: fp32 scores, the mask added to them, softmax in
# fp32 and its cast back, plus the additive mask itself (BloomAttention keeps about five such copies;
# sdpa, used for the rotary families, fewer: the same bound serves both).
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
    to float rounding, and memory linear in the length. Short inputs (every decode step) build positions
    and mask once and share them across all blocks.
    """

    def __init__(self, mask: torch.Tensor, q_len: int, config, dtype: torch.dtype,
                 device: torch.device | str = "cpu", score_budget: int = DEFAULT_SCORE_BUDGET):
        self.mask, self.q_len, self.config, self.dtype, self.device = mask, q_len, config, dtype, device
        self.chunk = query_chunk(mask.shape[0], config.num_attention_heads, mask.shape[1], score_budget)
        self._whole = attention_inputs(config, mask, q_len, dtype, device) if q_len <= self.chunk else None

    def run(self, block: torch.nn.Module, hidden: torch.Tensor, cache: BlockCache | None = None) -> torch.Tensor:
        if self._whole is not None:
            return run_block(block, hidden, self._whole, cache)
        work = cache if cache is not None else BlockCache()  # a stateless pass keeps keys only per block
        past = self.mask.shape[1] - self.q_len
        outs = []
        for start in range(0, self.q_len, self.chunk):
            end = min(self.q_len, start + self.chunk)
            attn = attention_inputs(self.config, self.mask[:, : past + end], end - start, self.dtype, self.device)
            outs.append(run_block(block, hidden[:, start:end], attn, work))
        return torch.cat(outs, dim=1)
