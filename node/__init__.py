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

_EXPORTS = {
    ".engine._batch": ["Batch"],
    ".engine._blocks": ["AttentionInputs", "BlockCache", "attention_inputs", "block_nbytes", "load_weights", "new_block", "run_block"],
    ".engine._checkpoint": ["Checkpoint", "block_keys", "touch"],
    ".engine._memory": ["SpillStore", "default_max_ram", "process_rss"],
    ".engine._resident": ["ResidentBlocks"],
    ".engine._streaming": ["BlockStream", "StreamingExecutor", "StreamingSession"],
    "..utils._units": ["format_size", "parse_size"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from .engine._batch import Batch  # noqa: F401
    from .engine._blocks import AttentionInputs, BlockCache, attention_inputs, block_nbytes, load_weights, new_block, run_block  # noqa: F401
    from .engine._checkpoint import Checkpoint, block_keys, touch  # noqa: F401
    from .engine._memory import SpillStore, default_max_ram, process_rss  # noqa: F401
    from .engine._resident import ResidentBlocks  # noqa: F401
    from .engine._streaming import BlockStream, StreamingExecutor, StreamingSession  # noqa: F401
    from ..utils._units import format_size, parse_size  # noqa: F401
