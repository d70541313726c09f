"""slowllm.coordinator.demo: `slowllm demo`, and what tests and benchmarks build on.

`_demo` (local mode end to end), `_demo_network` (a coordinator and nodes on 127.0.0.1), `_tiny` (small
random checkpoints with a real tokenizer, made offline), `_launch` (a coordinator and nodes as child
processes).
May import: anything in slowllm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._tiny": ["TINY_FAMILIES", "make_checkpoint", "make_draft_pair", "tiny_config"],
    "._launch": ["LocalCluster"],
    "._demo": ["run_demo"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._tiny import TINY_FAMILIES, make_checkpoint, make_draft_pair, tiny_config  # noqa: F401
    from ._launch import LocalCluster  # noqa: F401
    from ._demo import run_demo  # noqa: F401
