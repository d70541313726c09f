"""What the kernel tests share: the builds this CPU runs, and skips that say what a build lacks."""

from __future__ import annotations

import pytest

from slowllm.node.kernels._build import BuildUnavailable
from slowllm.node.kernels._kernels import ISA_FLAGS, cpu_flags, kernels_for

ISAS = list(ISA_FLAGS)


def runnable(isa: str):
    missing = [f for f in ISA_FLAGS[isa] if f not in cpu_flags()]
    return pytest.mark.skipif(bool(missing), reason=f"this CPU lacks {', '.join(missing)} for the {isa} build")


def _no_toolchain() -> str:
    import shutil

    from slowllm.node.kernels._build import compiler

    try:
        compiler()
    except BuildUnavailable as e:
        return str(e)
    return "" if shutil.which("ninja") else "ninja was not found"


needs_toolchain = pytest.mark.skipif(bool(_no_toolchain()), reason=_no_toolchain() or "a C++ compiler and ninja")


def build(isa: str):
    """The `isa` build, or a skip that says what is missing (no g++ or ninja: tested on its own in test_kernel_build.py)."""
    try:
        return kernels_for(isa)
    except BuildUnavailable as e:
        pytest.skip(str(e))
