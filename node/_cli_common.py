"""What every slowllm command line shares (slowllm, slowllm-node, slowllm-coordinator): the help
layout, the version, and a quiet end when the reader of our output goes away. Lives below both the node
and the coordinator, so neither CLI imports the other's."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless it has none or says it already); examples kept as written."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" not in help and action.option_strings \
                and all(action.default is not x for x in (None, False, argparse.SUPPRESS)):
            help += " (default: %(default)s)"
        return help


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("slowllm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def reader_went_away() -> int:
    """`slowllm status | head -1`: the pipe closed under us. Exit quietly, as `cat` does, instead of a
    BrokenPipeError traceback (and another one when Python flushes stdout at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0
