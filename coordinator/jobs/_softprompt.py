"""Soft-prompt files: safetensors holding `prompt` [tokens, hidden] and the model it was made for."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slowllm.protocol import InputError

FORMAT = "slowllm-soft-prompt/1"


def save_soft_prompt(path: str | os.PathLike, prompt: torch.Tensor, fingerprint: str, model_id: str) -> None:
    """Write atomically: a crash or error never leaves a partial file at `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({"prompt": prompt.detach().float().contiguous()}, str(tmp), metadata={
            "format": FORMAT, "model_fingerprint": fingerprint, "model": model_id,
            "prompt_tokens": str(prompt.shape[0])})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_soft_prompt(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """The prompt tensor and its metadata, unchecked (the client sends both to a coordinator)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"soft prompt {path} does not exist: pass a file written by `slowllm tune --out`.")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"soft prompt {path} is not a readable safetensors file ({e}): re-run `slowllm tune`.") from None
    prompt = tensors.get("prompt")
    if meta.get("format") != FORMAT or prompt is None or prompt.ndim != 2:
        raise InputError(f"{path} is not a slowllm soft prompt: pass a file written by `slowllm tune --out`.")
    return prompt.float(), meta


def check_soft_prompt(prompt: torch.Tensor, meta: dict, fingerprint: str, hidden_size: int, source: str) -> torch.Tensor:
    if prompt.ndim != 2 or meta.get("model_fingerprint") != fingerprint or prompt.shape[1] != hidden_size:
        raise InputError(
            f"soft prompt {source} was made for another model ({str(meta.get('model', '?'))[:100]}): tune one for "
            "this model."
        )
    return check_finite_prompt(prompt, source).float()


def check_finite_prompt(prompt: torch.Tensor, source: str) -> torch.Tensor:
    if not prompt.is_floating_point() or not torch.isfinite(prompt).all():
        raise InputError(f"soft prompt {source} holds non-finite or non-float values: tune it again.")
    return prompt


def load_soft_prompt(path: str | os.PathLike, fingerprint: str, hidden_size: int) -> torch.Tensor:
    prompt, meta = read_soft_prompt(path)
    return check_soft_prompt(prompt, meta, fingerprint, hidden_size, str(path))
