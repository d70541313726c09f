"""Model families: what differs between Bloom, GPT-NeoX and Llama-shaped checkpoints, in one place.

Everything else in slowllm (chains, sessions, jobs, the wire, failover, tuning, int8) is the same for
every family. A family says which transformers block class runs a layer (never reimplemented), how the
checkpoint names its tensors, how positions enter attention (Bloom's alibi biases, or rotary embeddings
for the others), which norms the ends apply, and whether the LM head is tied to the input embedding. It
is chosen from config.json's `model_type`.

Canonical tensor names drop the family's prefix (`transformer.`, `gpt_neox.`, `model.`): `h.3.mlp...`
for Bloom, `layers.3.mlp...` for the others; the ends keep their own names (`ln_f.weight`, `norm.weight`,
`embed_out.weight`, `lm_head.weight`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from slowllm.protocol import CheckpointError

# The attention function the rotary families' configs name (`config_from_dict`), registered with transformers
# when a layer is first built (`Family.new_layer`; node/engine/_attention.py).
ATTENTION = "slowllm"


@dataclass(frozen=True)
class Family:
    name: str  # config.json's model_type
    module: str  # transformers.models.<module>.modeling_<module>
    config_class: str
    layer_class: str
    rotary_class: str | None  # None: alibi (Bloom)
    prefix: str  # of every tensor but the untied head in save_pretrained's layout
    layers: str  # canonical block names: f"{layers}.{i}.{suffix}"
    embedding: str
    embedding_norm: tuple[str, ...]  # applied to the embeddings before block 0 (Bloom only)
    final_norm: tuple[str, ...]  # weight (, bias)
    head: str  # the LM head's name when it is not tied to the embedding
    rms_norm: bool  # RMSNorm (weight only) instead of LayerNorm
    eps: str  # the config field holding the norms' epsilon
    prepend_bos: bool  # the family's real tokenizers start every text with BOS (tiny test checkpoints copy it;
    # what a checkpoint does is read from its own tokenizer: coordinator/jobs/_ends.py)
    sliding_window: bool = field(default=False)  # the config's sliding_window restricts attention (Mistral)
    head_aliases: tuple[str, ...] = ()  # other names checkpoints give the untied head

    # ---- transformers classes ------------------------------------------------------------------
    def _load(self, name: str):
        return _transformers_class(self.module, name)

    @property
    def config_cls(self):
        import transformers

        return getattr(transformers, self.config_class)

    @property
    def layer_cls(self) -> type[nn.Module]:
        return self._load(self.layer_class)

    def new_layer(self, config) -> nn.Module:
        # Registers ATTENTION with transformers; imported here, not with this module, which coordinators and
        # clients import too: transformers' modeling code costs them ~2 s they need not spend.
        from . import _attention  # noqa: F401

        # layer_idx 0: every block gets a cache object of its own (`BlockCache`), never a shared one
        return self.layer_cls(config, layer_idx=0)

    def rotary(self, config) -> nn.Module:
        return self._load(self.rotary_class)(config=config)

    @property
    def bmm_attention(self) -> bool:
        """Whether its attention multiplies the cached keys and values with batched matmuls that take them
        in either layout (Bloom: `baddbmm(query, keys.transpose)`, `bmm(probs, values)`), so `BlockCache`
        chooses how to store them (`cache_layout`); sdpa (the rotary families) wants them as they are."""
        return self.rotary_class is None

    @property
    def cache_arg(self) -> str:
        """The keyword under which this transformers version's layer takes the cache (read once: every
        block of every step asks)."""
        return _cache_arg(self.layer_cls)

    # ---- names ---------------------------------------------------------------------------------
    def block_prefix(self, layer: int) -> str:
        return f"{self.layers}.{layer}."

    def canonical(self, key: str) -> str:
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def stored(self, key: str) -> str:
        """A canonical name as save_pretrained writes it (the untied head, and its int8 scales, sit outside
        the prefix)."""
        outside = {name.split(".")[0] for name in (self.head, *self.head_aliases)}
        return key if key.split(".")[0] in outside else self.prefix + key

    def end_names(self, head: str | None = None) -> list[str]:
        """The ends' tensors; `head`: the untied head's name in this checkpoint (None when tied)."""
        names = [self.embedding, *self.embedding_norm, *self.final_norm]
        return names if head is None else [*names, head]

    # ---- shapes --------------------------------------------------------------------------------
    def eps_of(self, config) -> float:
        return getattr(config, self.eps)

    def window(self, config) -> int | None:
        return getattr(config, "sliding_window", None) if self.sliding_window else None


@lru_cache(maxsize=None)
def _transformers_class(module: str, name: str):
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


@lru_cache(maxsize=None)
def _cache_arg(layer_cls) -> str:
    params = inspect.signature(layer_cls.forward).parameters
    for name in ("layer_past", "cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise RuntimeError(f"{layer_cls.__name__}.forward takes no cache argument in this transformers version")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bloom", "bloom", "BloomConfig", "BloomBlock", None, "transformer.", "h", "word_embeddings.weight",
           ("word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias"), ("ln_f.weight", "ln_f.bias"),
           "lm_head.weight", rms_norm=False, eps="layer_norm_epsilon", prepend_bos=False),
    Family("gpt_neox", "gpt_neox", "GPTNeoXConfig", "GPTNeoXLayer", "GPTNeoXRotaryEmbedding", "gpt_neox.", "layers",
           "embed_in.weight", (), ("final_layer_norm.weight", "final_layer_norm.bias"), "embed_out.weight",
           rms_norm=False, eps="layer_norm_eps", prepend_bos=False, head_aliases=("lm_head.weight",)),
    Family("llama", "llama", "LlamaConfig", "LlamaDecoderLayer", "LlamaRotaryEmbedding", "model.", "layers",
           "embed_tokens.weight", (), ("norm.weight",), "lm_head.weight", rms_norm=True, eps="rms_norm_eps",
           prepend_bos=True),
    Family("mistral", "mistral", "MistralConfig", "MistralDecoderLayer", "MistralRotaryEmbedding", "model.", "layers",
           "embed_tokens.weight", (), ("norm.weight",), "lm_head.weight", rms_norm=True, eps="rms_norm_eps",
           prepend_bos=True, sliding_window=True),
    Family("qwen2", "qwen2", "Qwen2Config", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding", "model.", "layers",
           "embed_tokens.weight", (), ("norm.weight",), "lm_head.weight", rms_norm=True, eps="rms_norm_eps",
           prepend_bos=False),
)}


# Real models of each family, by their config.json's shapes: docs/families.md's table of PCs per model is computed
# from these (`slowllm.node.engine._memory.family_table`), never typed by hand.
REAL_MODELS = (
    ("bigscience/bloom (176B)", "bloom", dict(hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880)),
    ("EleutherAI/gpt-neox-20b", "gpt_neox", dict(hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                                                 intermediate_size=24576, vocab_size=50432)),
    ("EleutherAI/pythia-12b", "gpt_neox", dict(hidden_size=5120, num_hidden_layers=36, num_attention_heads=40,
                                               intermediate_size=20480, vocab_size=50688)),
    ("meta-llama/Llama-3.1-8B", "llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                              num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                              tie_word_embeddings=False)),
    ("meta-llama/Llama-3.1-70B", "llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                               num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                                               tie_word_embeddings=False)),
    ("meta-llama/Llama-3.1-405B", "llama", dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                                                num_key_value_heads=8, intermediate_size=53248, vocab_size=128256,
                                                tie_word_embeddings=False)),
    ("mistralai/Mistral-7B-v0.3", "mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                                  num_key_value_heads=8, intermediate_size=14336, vocab_size=32768,
                                                  sliding_window=None, tie_word_embeddings=False)),
    ("Qwen/Qwen2.5-72B", "qwen2", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                       num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                                       tie_word_embeddings=False)),
)


def family_named(model_type: str | None) -> Family:
    """The family of a config.json `model_type`, or one sentence naming the supported ones."""
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not supported: slowllm runs "
                              f"{', '.join(FAMILIES)} checkpoints.")
    return FAMILIES[model_type]


def family_of(config) -> Family:
    return family_named(getattr(config, "model_type", None))


def check_config(family: Family, config) -> None:
    """Refuse, in one sentence, configurations the family's description does not cover."""
    if family.name == "qwen2" and "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise CheckpointError("this Qwen2 checkpoint uses sliding-window layers (use_sliding_window), which slowllm "
                              "does not run: use a checkpoint with full attention.")


def config_from_dict(raw: dict):
    """A transformers config of the right class for a config.json's content, set up to run blocks alone."""
    family = family_named(raw.get("model_type"))
    config = family.config_cls.from_dict(raw)
    if family.rotary_class is not None:
        # transformers' sdpa (its default for these families: attention without [heads x q x kv] weights in
        # memory), or the family's eager attention for decode steps where that is faster (`_attention`); the
        # mask slowllm builds (causal, padding, holes, window) is passed in full.
        config._attn_implementation = ATTENTION
    check_config(family, config)
    return config


@lru_cache(maxsize=32)
def _layer_shapes(family: Family, config_json: str) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    import json

    config = config_from_dict(json.loads(config_json))
    with torch.device("meta"):
        layer = family.new_layer(config)
    linears = {f"{name}.weight" for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    return tuple((name, tuple(p.shape), name in linears) for name, p in layer.named_parameters())


def layer_shapes(config) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    """(suffix, shape, is a linear weight) of every parameter of one block, in the layer's own order."""
    return _layer_shapes(family_of(config), config.to_json_string(use_diff=False))


def kv_width(config) -> int:
    """Numbers per position per block in each of the key and value caches (fewer than hidden with GQA)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def intermediate_size(config) -> int:
    return getattr(config, "intermediate_size", None) or 4 * config.hidden_size
