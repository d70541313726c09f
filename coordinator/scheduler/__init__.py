"""slowllm.coordinator.scheduler: the stepping loop (continuous batching, Orca-style).

Every running generation of a coordinator hands its pending steps to one `Stepper`; the steps of a wave go
to each node as one message, and up to one wave per pipeline stage is in flight.
May import: slowllm.protocol, and the remote chain's types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slowllm.utils._lazy import lazy_exports

_EXPORTS = {
    "._stepper": ["Stepper"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._stepper import Stepper  # noqa: F401
