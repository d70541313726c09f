"""slowllm.coordinator.client: the Python client (`Client`): jobs through a coordinator.

May import: slowllm.protocol, slowllm.utils, and the jobs' options, typed parameters and soft-prompt files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._client": ["Client", "format_status"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._client import Client, format_status  # noqa: F401
