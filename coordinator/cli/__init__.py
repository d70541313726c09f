"""slowllm.coordinator.cli: the command lines.

`_main` (`slowllm`: generate, score, tune, status, serve, demo, cluster, quantize), `_coordinator`
(`slowllm-coordinator`), `_serve` (`slowllm serve`: the HTTP API), `_cluster` (`slowllm cluster up|down`).
May import anything; heavy modules only inside functions, so `--help` answers at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._main": ["main"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._main import main  # noqa: F401
