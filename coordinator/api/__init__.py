"""slowllm.coordinator.api: the OpenAI-compatible HTTP API, as vLLM serves it.

`_app` (one class, one method per endpoint, one response builder, and the batcher that merges requests
into generations), `_openai` (the request schemas, prompts, logprobs, the chat template), `_guard` (what
is checked before any work: key, body size, prompt length), `_backends` (the same API over this process's
chain or over a coordinator's swarm).
May import: slowllm.protocol, slowllm.utils, jobs, chains; the swarm inside functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._app": ["OpenAIServer", "make_app", "server"],
    "._backends": ["ApiBackend", "LocalBackend", "SwarmBackend", "served_name"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._app import OpenAIServer, make_app, server  # noqa: F401
    from ._backends import ApiBackend, LocalBackend, SwarmBackend, served_name  # noqa: F401
