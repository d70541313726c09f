"""slowllm.node.server: the volunteer process, `slowllm-node --layers A-B`.

`_cli` parses the command line and checks the machine before loading anything; `_server` keeps the
range's blocks in memory, dials the coordinator, authenticates, registers and serves its requests;
`_passes` holds the requests waiting for the compute thread and runs what one pass takes together;
`_sessions` keeps the KV caches under the memory budget.
May import: slowllm.protocol, slowllm.utils, slowllm.node.engine and .kernels. Never the coordinator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._server": ["NodeServer"],
    "._cli": ["main"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._server import NodeServer  # noqa: F401
    from ._cli import main  # noqa: F401
