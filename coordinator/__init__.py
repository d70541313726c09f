"""slowllm.coordinator: the model's ends, the jobs, the chains they run on, the client and the CLIs.

Public API:
    LocalRunner(model, dtype=..., max_ram=...)   -- jobs in this process, blocks streamed from disk
    Client(url, secret_file=...)                  -- jobs through a coordinator over WebSockets
    Sampling, TuneOptions                         -- job options
    make_checkpoint(path, ...)                    -- a small random Bloom checkpoint (tests, demo)
"""

from ._chain import Batch, Chain, ChainSession
from ._client import Client
from ._jobs import Sampling
from ._runner import LocalRunner, Runner
from ._tiny import make_checkpoint, tiny_config
from ._tune import TuneOptions

__all__ = ["Batch", "Chain", "ChainSession", "Client", "LocalRunner", "Runner", "Sampling", "TuneOptions",
           "make_checkpoint", "tiny_config"]
