"""Small random-weight checkpoints (Bloom, GPT-NeoX, Llama) with a real tokenizer, made offline.

`slowllm demo`, the tests and the benchmarks use these: nothing is ever downloaded. The weights are
drawn with a larger standard deviation than the default init, because at the default init every
prompt collapses to one repeated token, which would hide KV-cache and padding bugs.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, BloomConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from slowllm.node.engine._families import family_of

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # Bloom's ids 0..3

CORPUS = """\
The quick brown fox jumps over the lazy dog. A slow model still answers if you wait for it.
Bloom is a large language model trained on many languages. Each block holds attention and a small
network; the blocks run one after another, and the last one feeds the head that picks the next word.
Is the sky blue? Yes. Is fire cold? No. Which is larger, a mouse or an elephant? An elephant.
Volunteers lend their computers, and a coordinator routes the activations through them in order.
Once upon a time there was a researcher without a cluster, who read every block from disk in turn.
Questions and answers, stories and lists: one, two, three, four, five, six, seven, eight, nine, ten.
The capital of France is Paris. The capital of Italy is Rome. Water boils at one hundred degrees.
"""


def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    return tok


TINY_FAMILIES = ("bloom", "gpt_neox", "llama")


def tiny_config(n_layer: int = 6, hidden: int = 64, n_head: int = 4, vocab_size: int = 384,
                std: float = 0.25, family: str = "bloom", **overrides):
    """A small config of `family` (`overrides`: any other config field). GPT-NeoX: rotary on a quarter of
    each head, parallel residual, untied head (as gpt-neox-20b). Llama: grouped-query attention (half as
    many KV heads), untied head, SwiGLU at 2.5x width (as Llama 3)."""
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=std, vocab_size=vocab_size,
               hidden_size=hidden, num_attention_heads=n_head, num_hidden_layers=n_layer)
    if family == "bloom":
        return BloomConfig(**{**ids, "hidden_dropout": 0.0, "attention_dropout": 0.0, **overrides})
    if family == "gpt_neox":
        return GPTNeoXConfig(**{**ids, "intermediate_size": 4 * hidden, "tie_word_embeddings": False,
                                "use_parallel_residual": True, "max_position_embeddings": 2048,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.25}, **overrides})
    if family == "llama":
        return LlamaConfig(**{**ids, "intermediate_size": 5 * hidden // 2, "num_key_value_heads": max(1, n_head // 2),
                              "tie_word_embeddings": False, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, **overrides})
    if family in ("mistral", "qwen2"):  # Llama's shape; Mistral's window off unless overridden, Qwen2's qkv biased
        cls = MistralConfig if family == "mistral" else Qwen2Config
        return cls(**{**ids, "intermediate_size": 5 * hidden // 2, "num_key_value_heads": max(1, n_head // 2),
                      "tie_word_embeddings": False, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                      "sliding_window": None, **overrides})
    raise ValueError(f"no tiny config for family {family!r}: choose one of bloom, gpt_neox, llama, mistral, qwen2")


def _blocks_of(model) -> torch.nn.ModuleList:
    family = family_of(model.config)
    return model.get_submodule(family.prefix + family.layers)


def make_checkpoint(path: str | os.PathLike, config=None, *, seed: int = 0,
                    fmt: str = "safetensors", sharded: bool = True, prefix: bool = True,
                    dtype: torch.dtype = torch.float32, tokenizer: bool = True, model=None) -> Path:
    """Write a random checkpoint of the config's family (Bloom by default) to `path`.

    fmt "safetensors" with prefix=True is transformers' own `save_pretrained`; the other layouts (keys
    without the `transformer.` / `model.` prefix as in bigscience/bloom, `.bin` shards) are written by hand
    as those repos have them.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if model is None:
        config = config or tiny_config()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    config = model.config
    model = model.to(dtype)
    if fmt == "safetensors" and prefix:
        shard = "20KB" if sharded else "10GB"
        if sharded:  # about one shard per block, like bigscience/bloom
            per_block = sum(p.numel() for p in _blocks_of(model)[0].parameters()) * dtype.itemsize
            shard = f"{max(per_block // 1000 + 1, 1)}KB"
        model.save_pretrained(path, max_shard_size=shard)
    else:
        _write_by_hand(model, path, fmt=fmt, sharded=sharded, prefix=prefix)
        config.save_pretrained(path)
    if tokenizer:
        tok = train_tokenizer(config.vocab_size)
        if family_of(config).prepend_bos:  # as real Llama and Mistral tokenizers do: BOS before every text
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", config.bos_token_id)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>", pad_token="<pad>")
        fast.save_pretrained(path)
    return path


def _write_by_hand(model, path: Path, *, fmt: str, sharded: bool, prefix: bool) -> None:
    family = family_of(model.config)
    tied = getattr(model.config, "tie_word_embeddings", True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == family.head)}
    if not prefix:
        state = {k.removeprefix(family.prefix): v for k, v in state.items()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parts = key.removeprefix(family.prefix).split(".")
        group = f"h{parts[1]}" if parts[0] == family.layers else "ends"
        groups.setdefault(group if sharded else "all", {})[key] = tensor
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map, total = {}, 0
    for i, (_, tensors) in enumerate(groups.items()):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}" if sharded else f"{stem}.{ext}"
        if ext == "safetensors":
            save_file(tensors, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, path / name)
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


# The projections through which a block writes into the residual stream, per family
_OUTPUT_PROJECTIONS = {"bloom": ("self_attention.dense", "mlp.dense_4h_to_h"),
                       "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
                       "llama": ("self_attn.o_proj", "mlp.down_proj")}


def make_draft_pair(target: str | os.PathLike, draft: str | os.PathLike, config=None, *,
                    draft_layers: int = 2, damping: float = 0.1, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """A big model and a draft that agrees with it to a degree `damping` controls (any tiny family).

    The big model's blocks after the first `draft_layers` write into the residual stream through output
    projections scaled by `damping` (attention's and the MLP's last linear); the draft is the big model
    without those blocks (same embeddings, final norm and tokenizer). damping 0: the two agree on every
    token; larger: the big model's last blocks matter more and the draft is right less often.
    """
    config = config or tiny_config()
    family = family_of(config)
    torch.manual_seed(seed)
    big = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for block in _blocks_of(big)[draft_layers:]:
            for name in _OUTPUT_PROJECTIONS[family.name]:
                linear = block.get_submodule(name)
                linear.weight.mul_(damping)
                if linear.bias is not None:
                    linear.bias.mul_(damping)
    small_config = copy.deepcopy(config)
    small_config.num_hidden_layers = draft_layers  # (Bloom's n_layer, through its attribute map)
    small = AutoModelForCausalLM.from_config(small_config)
    blocks = family.prefix + family.layers + "."
    state = {k: v for k, v in big.state_dict().items()
             if not k.startswith(blocks) or int(k[len(blocks):].split(".")[0]) < draft_layers}
    small.load_state_dict(state)
    return (make_checkpoint(target, model=big, dtype=dtype), make_checkpoint(draft, model=small, dtype=dtype))
