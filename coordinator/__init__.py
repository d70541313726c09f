"""slowllm.coordinator: the model's ends, the jobs, the chains they run on, the client and the CLIs.

Public API:
    LocalRunner(model, dtype=..., max_ram=...)   -- jobs in this process, blocks streamed from disk
    Client(url, secret_file=...)                  -- jobs through a coordinator over WebSockets
    Sampling, TuneOptions                         -- job options
    make_checkpoint(path, ...)                    -- a small random checkpoint, any family (tests, demo)
    make_draft_pair(target, draft, ...)           -- a big model and a draft that agrees with it (tests, bench)

Names load on first use (PEP 562), so the CLIs answer `--help` without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.protocol._lazy import lazy_exports

_EXPORTS = {
    "._chain": ["Batch", "Chain", "ChainSession"],
    "._client": ["Client"],
    "._options": ["Sampling", "TuneOptions"],
    "._runner": ["LocalRunner", "Runner"],
    "._tiny": ["make_checkpoint", "make_draft_pair", "tiny_config"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._chain import Batch, Chain, ChainSession  # noqa: F401
    from ._client import Client  # noqa: F401
    from ._options import Sampling, TuneOptions  # noqa: F401
    from ._runner import LocalRunner, Runner  # noqa: F401
    from ._tiny import make_checkpoint, make_draft_pair, tiny_config  # noqa: F401
