"""slowllm.coordinator.swarm: the coordinator process, `slowllm-coordinator`.

`_server` (one WebSocket port for nodes and clients: handshakes, registration, status), `_jobs` (each
client's job in a worker thread over a remote chain), `_router`
(which nodes hold which blocks, routes, bans), `_links` (one node's link: pending requests, the outbox
that merges a wave's steps), `_keys` (node secret and client keys),
`_admission` (the bounded queue both front doors share), `_verify` (the referee: recomputing hops),
`_status_page` (the /status page).
May import: everything below it (protocol, node, utils, jobs, chains, scheduler); the HTTP API only
inside functions (when --http-port asks for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._server": ["Coordinator"],
    "._jobs": ["job_tag"],
    "._links": ["NodeLink"],
    "._router": ["Router"],
    "._keys": ["KeyRing", "is_loopback"],
    "._verify": ["Referee"],
    "._admission": ["Admission"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._server import Coordinator  # noqa: F401
    from ._jobs import job_tag  # noqa: F401
    from ._links import NodeLink  # noqa: F401
    from ._router import Router  # noqa: F401
    from ._keys import KeyRing, is_loopback  # noqa: F401
    from ._verify import Referee  # noqa: F401
    from ._admission import Admission  # noqa: F401
