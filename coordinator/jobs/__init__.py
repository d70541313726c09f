"""slowllm.coordinator.jobs: the jobs, written once against `Chain`.

`_generate` (plain and speculative decoding are one loop; `_speculative` holds the draft), `_score`
(log-likelihoods of continuations), `_tune` (soft-prompt tuning), `_ends` (tokenizer, embeddings, final
norm, LM head), `_options` (sampling and tuning options), `_softprompt` (its files), `_detokenize` (text as
tokens arrive), `_fidelity` (how far an int8 copy strays), `_runner` (ends + chain: the jobs as methods).
May import: slowllm.protocol, slowllm.node (engine), slowllm.utils, and `..chains` for the interface
(a runner opens a local chain). Never the swarm, the API or the CLIs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._generate": ["Continuation", "Generation", "generate", "step_together"],
    "._score": ["score"],
    "._tune": ["tune"],
    "._ends": ["ModelEnds"],
    "._options": ["Sampling", "TuneOptions"],
    "._runner": ["LocalRunner", "Runner"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._generate import Continuation, Generation, generate, step_together  # noqa: F401
    from ._score import score  # noqa: F401
    from ._tune import tune  # noqa: F401
    from ._ends import ModelEnds  # noqa: F401
    from ._options import Sampling, TuneOptions  # noqa: F401
    from ._runner import LocalRunner, Runner  # noqa: F401
