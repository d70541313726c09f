"""slowllm.utils: small helpers every process shares, none of which imports torch at module level.

Rooms: `_lazy` (lazy package exports, so `--help` answers at once), `_units` (sizes and block ranges as
people write them), `_cli_common` (what the three command lines share), `_openmp` (how processes share CPU
cores, applied before torch loads), `_aio` (event loops, and connection errors in one sentence).
May import: the standard library, psutil; slowllm.protocol only inside functions (for its error types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

_EXPORTS = {
    "._lazy": ["lazy_exports"],
    "._units": ["format_ranges", "format_size", "format_span", "parse_size", "span_blocks"],
    "._openmp": ["ComputeThread", "positive_threads", "share_cores"],
    "._aio": ["run", "why_connection_failed"],
    "._cli_common": ["HelpFormatter", "check_model_path", "check_port", "check_soft_prompt", "exit_on_interrupt", "model_layers", "version"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ._lazy import lazy_exports  # noqa: F401
    from ._units import format_ranges, format_size, format_span, parse_size, span_blocks  # noqa: F401
    from ._openmp import ComputeThread, positive_threads, share_cores  # noqa: F401
    from ._aio import run, why_connection_failed  # noqa: F401
    from ._cli_common import HelpFormatter, check_model_path, check_port, check_soft_prompt, exit_on_interrupt, model_layers, version  # noqa: F401
