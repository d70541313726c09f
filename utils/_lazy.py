"""Lazy package exports (PEP 562): a package names what it re-exports; modules load on first use.

Importing torch and transformers takes seconds; `slowllm --help`, `--version` and argument errors must
answer at once, so no package `__init__` imports them eagerly.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """(`__getattr__`, `__dir__`, `__all__`) for `package`, re-exporting `exports` {".module": [names]}."""
    where = {name: module for module, names in exports.items() for name in names}
    names = sorted(where)

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__():
        return names

    return __getattr__, __dir__, names
