"""The two backends of the OpenAI-compatible API: this process's chain, or a coordinator's swarm.

`LocalBackend`: this process's chain (`LocalRunner`: blocks streamed from disk, or all in RAM with
--keep-in-ram). `SwarmBackend`: the coordinator's nodes (`slowllm-coordinator --http-port`). The API
itself (`_app`) is written once over either; `slowllm serve` is in `cli/_serve.py`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

import torch

from slowllm.coordinator.jobs._ends import ModelEnds
from slowllm.coordinator.jobs._generate import Continuation, Generation, step_together
from slowllm.coordinator.jobs._options import Sampling
from slowllm.coordinator.jobs._runner import LocalRunner
from slowllm.coordinator.swarm._keys import KeyRing


class ApiBackend(Protocol):
    """What the API needs from a mode: the model's ends, a way to run a batch, and who may use it."""

    model_id: str
    ends: ModelEnds
    n_layer: int
    max_new_tokens: int

    def start(self, rows: list[Continuation], sampling: Sampling, soft_prompt: torch.Tensor | None) -> Generation:
        """A batch of rows, ready to step (its prompt pass is its first step)."""

    def step(self, jobs: list[Generation]) -> None:
        """One pass over the model for every job's next step."""

    def soft_prompt(self, path: Path) -> torch.Tensor: ...

    def missing(self) -> list[int]: ...

    def nodes(self) -> int: ...

    def admitted(self, user: str, kind: str):
        """A context holding an admission slot for one HTTP request (BusyError when none is free)."""
        ...

    def user(self, token: str | None) -> str | None:
        """The user a bearer token belongs to; "" when no key is needed; None when refused."""

    def warnings_since(self, started: float) -> list[str]:
        """What a response begun at `started` (time.time()) must warn of: nodes that served this API and
        were banned since (their answers may be wrong)."""
        return []


def served_name(model: str, name: str | None = None) -> str:
    """The id clients put in "model": a hub id as it is, a directory by its name, unless --served-model-name."""
    if name:
        return name
    path = Path(os.path.expanduser(model))
    return path.resolve().name if path.is_dir() else model


class LocalBackend:
    def __init__(self, runner: LocalRunner, model_id: str, api_keys: str | None = None, max_new_tokens: int = 4096):
        self.runner, self.model_id, self.ends = runner, model_id, runner.ends
        self.n_layer, self.max_new_tokens = runner.checkpoint.n_layer, max_new_tokens
        # --api-keys holds `NAME KEY` lines, read like the coordinator's --client-keys; KeyRing wants a node
        # secret beside them, and a random one that nobody knows accepts nothing more.
        self.keys = None if api_keys is None else KeyRing(os.urandom(32), api_keys)

    def start(self, rows: list[Continuation], sampling: Sampling, soft_prompt: torch.Tensor | None) -> Generation:
        r = self.runner
        return Generation(r.ends, r.chain, rows, sampling, soft_prompt, r.pick_draft())

    def step(self, jobs: list[Generation]) -> None:
        step_together(self.runner.chain, jobs)

    def soft_prompt(self, path: Path) -> torch.Tensor:
        return self.runner.soft_prompt(path)

    def warnings_since(self, started: float) -> list[str]:
        return []  # one process: no node to ban

    def missing(self) -> list[int]:
        return []

    def admitted(self, user: str, kind: str):
        return contextlib.nullcontext()  # one process, one user's server: the batcher's queue bounds it

    def nodes(self) -> int:
        return 0

    def user(self, token: str | None) -> str | None:
        if self.keys is None:
            return ""
        self.keys.maybe_reload()
        return None if token is None else self.keys.check_bearer(token)


class SwarmBackend:
    """The API through the coordinator's nodes: each batch is one job over a `RemoteChain`."""

    def __init__(self, coordinator):
        c = self.coordinator = coordinator
        self.model_id, self.ends = served_name(c.model), c.ends
        self.n_layer, self.max_new_tokens = c.checkpoint.n_layer, c.max_new_tokens
        from slowllm.coordinator.chains._remote import RemoteChain
        from slowllm.coordinator.swarm._jobs import job_tag

        self.chain = RemoteChain(c.router, c.limits, c.checkpoint.hidden_size, referee=c.referee, job=job_tag("http"),
                                 stepper=c.stepper)

    def start(self, rows: list[Continuation], sampling: Sampling, soft_prompt: torch.Tensor | None) -> Generation:
        from slowllm.coordinator.jobs._runner import Runner

        c = self.coordinator
        return Generation(c.ends, self.chain, rows, sampling, soft_prompt,
                          Runner(c.checkpoint, c.ends, self.chain, c.draft).pick_draft())

    def step(self, jobs: list[Generation]) -> None:
        step_together(self.chain, jobs)

    def soft_prompt(self, path: Path) -> torch.Tensor:
        from slowllm.coordinator.jobs._softprompt import load_soft_prompt

        return load_soft_prompt(path, self.coordinator.fingerprint, self.coordinator.checkpoint.hidden_size)

    def missing(self) -> list[int]:
        return self.coordinator.router.missing()

    def warnings_since(self, started: float) -> list[str]:
        return [f"node {name} that served this API was banned ({reason}): this answer may be wrong; ask again"
                for when, node, name, reason in self.coordinator.router.ban_events
                if when >= started and node in self.chain.served_by]

    def admitted(self, user: str, kind: str):
        return self.coordinator.admission.job(user, kind, via="http")  # counted with the WebSocket jobs

    def nodes(self) -> int:
        return len(self.coordinator.router.nodes)

    def user(self, token: str | None) -> str | None:
        keys = self.coordinator.keys
        if keys.open:
            return ""
        keys.maybe_reload()
        return None if token is None else keys.client_for(token)
