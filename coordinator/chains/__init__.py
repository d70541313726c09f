"""slowllm.coordinator.chains: "all the blocks, wherever they run", behind one interface.

`_chain` is the interface every job is written against (`Chain`, `ChainSession`, `Batch`); `_local` runs
the blocks in this process (streamed from disk, or resident); `_remote` sends each hop to a node over the
swarm's links and fails over (`_exchange`: one request and its checked reply; `_verification`: a hop's
checks and the referee's verdicts; `_session`: generation sessions, replayed on a replacement node).
May import: slowllm.protocol, slowllm.node (engine), slowllm.utils, and for the remote chain the swarm's
router and referee and the scheduler. Never the API or the CLIs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._chain": ["Batch", "Chain", "ChainSession", "plan_batches"],
    "._local": ["LocalChain", "ResidentChain", "plan_memory"],
    "._remote": ["RemoteChain"],
    "._session": ["RemoteSession"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._chain import Batch, Chain, ChainSession, plan_batches  # noqa: F401
    from ._local import LocalChain, ResidentChain, plan_memory  # noqa: F401
    from ._remote import RemoteChain  # noqa: F401
    from ._session import RemoteSession  # noqa: F401
