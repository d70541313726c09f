"""slowllm.node: reading Bloom checkpoints and running their blocks (in RAM, or streamed from disk)."""

from ._blocks import AttentionInputs, BlockCache, attention_inputs, block_nbytes, load_weights, new_block, run_block
from ._checkpoint import Checkpoint, block_keys, touch
from ._memory import SpillStore, default_max_ram, format_size, parse_size, process_rss
from ._resident import ResidentBlocks
from ._streaming import Batch, BlockStream, StreamingExecutor, StreamingSession

__all__ = [
    "AttentionInputs", "Batch", "BlockCache", "BlockStream", "Checkpoint", "ResidentBlocks", "SpillStore", "StreamingExecutor",
    "StreamingSession", "attention_inputs", "block_keys", "block_nbytes", "default_max_ram", "format_size",
    "load_weights", "new_block", "parse_size", "process_rss", "run_block", "touch",
]
