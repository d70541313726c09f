"""slowllm.node: reading Bloom checkpoints and running their blocks (in RAM, or streamed from disk).

Names load on first use (PEP 562): importing the package costs nothing until a name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.protocol._lazy import lazy_exports

_EXPORTS = {
    "._batch": ["Batch"],
    "._blocks": ["AttentionInputs", "BlockCache", "attention_inputs", "block_nbytes", "load_weights", "new_block", "run_block"],
    "._checkpoint": ["Checkpoint", "block_keys", "touch"],
    "._memory": ["SpillStore", "default_max_ram", "process_rss"],
    "._units": ["format_size", "parse_size"],
    "._resident": ["ResidentBlocks"],
    "._streaming": ["BlockStream", "StreamingExecutor", "StreamingSession"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._batch import Batch  # noqa: F401
    from ._blocks import AttentionInputs, BlockCache, attention_inputs, block_nbytes, load_weights, new_block, run_block  # noqa: F401
    from ._checkpoint import Checkpoint, block_keys, touch  # noqa: F401
    from ._memory import SpillStore, default_max_ram, process_rss  # noqa: F401
    from ._units import format_size, parse_size  # noqa: F401
    from ._resident import ResidentBlocks  # noqa: F401
    from ._streaming import BlockStream, StreamingExecutor, StreamingSession  # noqa: F401
