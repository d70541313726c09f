"""Small random-weight Bloom checkpoints with a real tokenizer, made offline.

`slowllm demo`, the tests and the benchmarks use these: nothing is ever downloaded. The weights are
drawn with a larger standard deviation than Bloom's default init, because at the default init every
prompt collapses to one repeated token, which would hide KV-cache and padding bugs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

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


def tiny_config(n_layer: int = 6, hidden: int = 64, n_head: int = 4, vocab_size: int = 384,
                std: float = 0.25) -> BloomConfig:
    return BloomConfig(vocab_size=vocab_size, hidden_size=hidden, n_layer=n_layer, n_head=n_head,
                       initializer_range=std, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       hidden_dropout=0.0, attention_dropout=0.0)


def make_checkpoint(path: str | os.PathLike, config: BloomConfig | None = None, *, seed: int = 0,
                    fmt: str = "safetensors", sharded: bool = True, prefix: bool = True,
                    dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                    model: BloomForCausalLM | None = None) -> Path:
    """Write a random Bloom checkpoint to `path`.

    fmt "safetensors" with prefix=True is transformers' own `save_pretrained`; the other layouts (keys
    without `transformer.` as in bigscience/bloom, `.bin` shards) are written by hand as those repos have them.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if model is None:
        config = config or tiny_config()
        torch.manual_seed(seed)
        model = BloomForCausalLM(config)
    config = model.config
    model = model.to(dtype)
    if fmt == "safetensors" and prefix:
        shard = "20KB" if sharded else "10GB"
        if sharded:  # about one shard per block, like bigscience/bloom
            per_block = sum(p.numel() for p in model.transformer.h[0].parameters()) * dtype.itemsize
            shard = f"{max(per_block // 1000 + 1, 1)}KB"
        model.save_pretrained(path, max_shard_size=shard)
    else:
        _write_by_hand(model, path, fmt=fmt, sharded=sharded, prefix=prefix)
        config.save_pretrained(path)
    if tokenizer:
        tok = train_tokenizer(config.vocab_size)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>", pad_token="<pad>")
        fast.save_pretrained(path)
    return path


def _write_by_hand(model: BloomForCausalLM, path: Path, *, fmt: str, sharded: bool, prefix: bool) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parts = key.removeprefix("transformer.").split(".")
        group = f"h{parts[1]}" if parts[0] == "h" else "ends"
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


def make_draft_pair(target: str | os.PathLike, draft: str | os.PathLike, config: BloomConfig | None = None, *,
                    draft_layers: int = 2, damping: float = 0.1, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """A big model and a draft that agrees with it to a degree `damping` controls.

    The big model's blocks after the first `draft_layers` write into the residual stream through output
    projections scaled by `damping` (attention's dense and the MLP's dense_4h_to_h); the draft is the big
    model without those blocks (same embeddings, final norm and tokenizer). damping 0: the two agree on
    every token; larger: the big model's last blocks matter more and the draft is right less often.
    """
    config = config or tiny_config()
    torch.manual_seed(seed)
    big = BloomForCausalLM(config)
    with torch.no_grad():
        for block in big.transformer.h[draft_layers:]:
            for linear in (block.self_attention.dense, block.mlp.dense_4h_to_h):
                linear.weight.mul_(damping)
                linear.bias.mul_(damping)
    small_config = BloomConfig(**{**config.to_dict(), "n_layer": draft_layers})
    small = BloomForCausalLM(small_config)
    state = {k: v for k, v in big.state_dict().items()
             if not k.startswith("transformer.h.") or int(k.split(".")[2]) < draft_layers}
    small.load_state_dict(state)
    return (make_checkpoint(target, model=big, dtype=dtype), make_checkpoint(draft, model=small, dtype=dtype))
