"""slowllm.node: reading checkpoints and running their blocks (in RAM, on a GPU, or streamed from disk).

Rooms:
    engine/   what every mode runs: checkpoint reading, model families, transformers' blocks on our
              weights, KV caches, merged passes, streaming, memory plans, int8 copies, weight digests
    kernels/  the C++ decode kernels (built once per machine and ISA) and the linear layers that use them
    server/   the volunteer process: `slowllm-node`, its WebSocket link and its request queue

Public names below load on first use (PEP 562): importing the package costs nothing until one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

from .engine import __all__ as _ENGINE  # (cheap: the engine's names load on first use too)

_EXPORTS = {
    ".engine": list(_ENGINE),
    "..utils._units": ["format_size", "parse_size"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from slowllm.utils._units import format_size, parse_size  # noqa: F401

    from .engine import *  # noqa: F401,F403
