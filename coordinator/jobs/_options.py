"""The options of the jobs (generation's sampling, soft-prompt tuning), checked the same way wherever they
come from: the CLI, the Python API, a client's job message. No torch here: a client builds them without it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from slowllm.protocol import InputError


@dataclass
class Sampling:
    max_new_tokens: int = 20
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        _whole("max_new_tokens", self.max_new_tokens)
        _whole("seed", self.seed, optional=True)
        _whole("top_k", self.top_k, optional=True)
        _finite("temperature", self.temperature)
        _finite("top_p", self.top_p, optional=True)
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1.")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:
            raise InputError("--seed must fit in 64 bits.")
        if self.temperature < 0:
            raise InputError("--temperature must be 0 (greedy) or positive.")
        if self.top_k is not None and self.top_k < 1:
            raise InputError("--top-k must be at least 1.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError("--top-p must be in (0, 1].")


def _whole(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number, not {value!r}.")


def _finite(name: str, value, optional: bool = False) -> None:
    """A number that is not NaN or infinite (NaN slips through every `<` check)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value!r}.")


@dataclass
class TuneOptions:
    prompt_tokens: int = 8
    steps: int = 20
    lr: float = 1e-2
    batch_size: int = 4
    seed: int = 0

    def check(self) -> None:
        for name in ("prompt_tokens", "steps", "batch_size", "seed"):
            _whole(name, getattr(self, name))
        _finite("lr", self.lr)
        if self.lr > 1e3:
            raise InputError(f"lr {self.lr} is far too large (a soft prompt's steps are ~0.01-1): use a smaller one.")
        if self.prompt_tokens < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InputError("--prompt-tokens, --steps and --batch-size must be at least 1, and --lr positive.")
