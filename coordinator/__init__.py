"""slowllm.coordinator: the model's ends, the jobs, the chains they run on, the client and the CLIs.

Where a request goes, room by room:
    cli/        the commands (`slowllm`, `slowllm-coordinator`, `slowllm serve`, `slowllm cluster`)
    client/     the Python client: jobs through a coordinator over WebSockets
    api/        the OpenAI-compatible HTTP API, its schemas and its two backends (local, swarm)
    swarm/      the coordinator process: node and client connections, keys, admission, the router,
                verification by recomputation, the status page
    scheduler/  the stepping loop: every running generation advances in shared waves
    jobs/       generate, speculative decoding, score, tune, the model's ends: written once over `Chain`
    chains/     the `Chain` interface and its implementations: local (streamed or resident) and remote
    demo/       `slowllm demo`, tiny offline checkpoints, and a local cluster of processes for tests

Public API:
    LocalRunner(model, dtype=..., max_ram=...)   -- jobs in this process, blocks streamed from disk
    Client(url, secret_file=...)                  -- jobs through a coordinator over WebSockets
    Sampling, TuneOptions                         -- job options
    GenerateJob, ScoreJob, TuneJob, JobSpec       -- typed job parameters (what a client sends)
    make_checkpoint(path, ...)                    -- a small random checkpoint, any family (tests, demo)
    make_draft_pair(target, draft, ...)           -- a big model and a draft that agrees with it (tests, bench)

Names load on first use (PEP 562), so the CLIs answer `--help` without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    ".chains._chain": ["Batch", "Chain", "ChainSession"],
    ".client._client": ["Client"],
    ".jobs._options": ["Sampling", "TuneOptions"],
    ".jobs._runner": ["LocalRunner", "Runner"],
    ".demo._tiny": ["make_checkpoint", "make_draft_pair", "tiny_config"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from .chains._chain import Batch, Chain, ChainSession  # noqa: F401
    from .client._client import Client  # noqa: F401
    from .jobs._options import Sampling, TuneOptions  # noqa: F401
    from .jobs._runner import LocalRunner, Runner  # noqa: F401
    from .demo._tiny import make_checkpoint, make_draft_pair, tiny_config  # noqa: F401
