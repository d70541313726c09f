"""The two backends of the OpenAI-compatible API, and `slowllm serve --local --model MODEL`.

`LocalBackend`: this process's chain (`LocalRunner`: blocks streamed from disk, or all in RAM with
--keep-in-ram). `SwarmBackend`: the coordinator's nodes (`slowllm-coordinator --http-port`). The API
itself (`_http.make_app`) is written once over either.
"""

from __future__ import annotations

import contextlib

import os
import sys
import threading
from pathlib import Path

import torch

from slowllm.node._openmp import ComputeThread
from slowllm.protocol import InputError

from ._generate import Continuation, Generation, step_together
from ._options import Sampling
from ._keys import KeyRing, is_loopback
from ._runner import LocalRunner


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


def serve(args) -> int:
    from ._http import make_app, server

    if args.api_keys is None and not is_loopback(args.host) and not args.insecure:
        raise InputError(f"refusing to serve on {args.host} without keys: pass --api-keys FILE (lines `NAME KEY`), "
                         "or --insecure if this network is trusted.")
    if args.max_new_tokens < 1 or args.max_prompt_tokens < 1:
        raise InputError("--max-new-tokens and --max-prompt-tokens must be at least 1.")
    if args.max_request_bytes is not None and args.max_request_bytes < 1024:
        raise InputError("--max-request-bytes must be at least 1024.")
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read --chat-template {args.chat_template}: {e.strerror}.") from None
    if args.soft_prompts and not Path(args.soft_prompts).is_dir():
        raise InputError(f"--soft-prompts {args.soft_prompts} is not a directory.")
    from ._cli import _backend

    args.no_progress = True  # a server's log is no place for a progress bar per pass
    # the same LocalRunner as every --local job, loaded on the thread that will run every pass
    compute = ComputeThread()
    runner = compute.submit(_backend, args).result()
    backend = LocalBackend(runner, served_name(args.model, args.served_model_name), args.api_keys, args.max_new_tokens)
    app = make_app(backend, soft_prompts=args.soft_prompts, chat_template=template,
                   max_prompt_tokens=args.max_prompt_tokens, max_request_bytes=args.max_request_bytes, compute=compute)
    http = server(app, args.host, args.port)

    def announce():  # once uvicorn listens (port 0 picks one): the line scripts wait for
        while not http.started:
            if http.should_exit:
                return
            threading.Event().wait(0.05)
        port = http.servers[0].sockets[0].getsockname()[1]
        print(f"slowllm serve: {backend.model_id} ready at http://{args.host}:{port}/v1", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    http.run()
    print("slowllm serve: stopped", flush=True)
    sys.stderr.flush()
    # Straight out: the batcher thread may be inside a long pass (a 16k-token prompt), and interpreter
    # shutdown would wait for it or abort in a native read; nothing is left to save.
    os._exit(0)


class SwarmBackend:
    """The API through the coordinator's nodes: each batch is one job over a `RemoteChain`."""

    def __init__(self, coordinator):
        c = self.coordinator = coordinator
        self.model_id, self.ends = served_name(c.model), c.ends
        self.n_layer, self.max_new_tokens = c.checkpoint.n_layer, c.max_new_tokens
        from ._remote import RemoteChain
        from ._server import job_tag

        self.chain = RemoteChain(c.router, c.limits, c.checkpoint.hidden_size, referee=c.referee, job=job_tag("http"),
                                 stepper=c.stepper)

    def start(self, rows: list[Continuation], sampling: Sampling, soft_prompt: torch.Tensor | None) -> Generation:
        from ._runner import Runner

        c = self.coordinator
        return Generation(c.ends, self.chain, rows, sampling, soft_prompt,
                          Runner(c.checkpoint, c.ends, self.chain, c.draft).pick_draft())

    def step(self, jobs: list[Generation]) -> None:
        step_together(self.chain, jobs)

    def soft_prompt(self, path: Path) -> torch.Tensor:
        from ._softprompt import load_soft_prompt

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
