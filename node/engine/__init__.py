"""slowllm.node.engine: the engine every mode runs, local or networked.

`_checkpoint` reads only the tensors a process needs (safetensors `safe_open`, or .bin shards);
`_families` holds what differs between Bloom, GPT-NeoX and Llama-shaped models; `_blocks` runs
transformers' own block classes on those weights with our KV caches; `_merge` runs several requests as one
pass; `_resident` keeps a range of blocks in memory, `_streaming` streams them from disk one at a time;
`_memory` plans RAM and spills; `_quantize` writes int8 copies; `_digests` proves which weights a node holds.
May import: slowllm.protocol (errors), slowllm.utils, slowllm.node.kernels. Never the server or the
coordinator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._batch": ["Batch"],
    "._blocks": ["AttentionInputs", "BlockCache", "attention_inputs", "block_nbytes", "load_weights", "new_block", "run_block"],
    "._checkpoint": ["Checkpoint", "block_keys", "touch"],
    "._memory": ["SpillStore", "default_max_ram", "process_rss"],
    "._resident": ["ResidentBlocks"],
    "._streaming": ["BlockStream", "StreamingExecutor", "StreamingSession"],
    "._merge": ["StepPart", "plan_forwards", "plan_steps", "run_merged_forwards", "run_merged_steps"],
    "._digests": ["block_digests"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._batch import Batch  # noqa: F401
    from ._blocks import AttentionInputs, BlockCache, attention_inputs, block_nbytes, load_weights, new_block, run_block  # noqa: F401
    from ._checkpoint import Checkpoint, block_keys, touch  # noqa: F401
    from ._memory import SpillStore, default_max_ram, process_rss  # noqa: F401
    from ._resident import ResidentBlocks  # noqa: F401
    from ._streaming import BlockStream, StreamingExecutor, StreamingSession  # noqa: F401
    from ._merge import StepPart, plan_forwards, plan_steps, run_merged_forwards, run_merged_steps  # noqa: F401
    from ._digests import block_digests  # noqa: F401
