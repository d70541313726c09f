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
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

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


# ---- what can be checked in milliseconds, before torch is imported or anything is loaded -----------------
def check_port(host: str, port: int, flag: str) -> None:
    """A port someone else listens on is one sentence now, not a server's traceback after loading."""
    import socket

    from slowllm.protocol._errors import InputError

    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port} ({e.strerror}): another program uses it; pick "
                             f"another {flag}.") from None


def check_model_path(model: str | None) -> None:
    """A local path that is not a checkpoint directory (a hub id is checked where it is opened)."""
    import re

    from slowllm.protocol._errors import InputError

    if not model:
        return
    path = os.path.expanduser(model)
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith(".")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"model directory {path} has no config.json: pass the folder that holds the checkpoint.")
    elif not hub_id or os.path.exists(path):
        raise InputError(f"model {model!r} is not a directory: check the path (or give a hub id like "
                         "'bigscience/bloom-560m').")


def model_layers(model: str | None) -> int | None:
    """Blocks of a local checkpoint from its config.json (None for a hub id or an unreadable config)."""
    import json

    if not model or not os.path.isdir(os.path.expanduser(model)):
        return None
    try:
        config = json.loads(open(os.path.join(os.path.expanduser(model), "config.json")).read())
    except (OSError, ValueError):
        return None
    n = config.get("n_layer", config.get("num_hidden_layers"))
    return n if isinstance(n, int) else None


def check_soft_prompt(path: str | None, model: str | None) -> None:
    """A soft prompt file that is missing, not one, or of another width than a local model's."""
    import json
    import struct

    from slowllm.protocol._errors import InputError

    if not path:
        return
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(size, 1 << 20)))
    except FileNotFoundError:
        raise InputError(f"soft prompt {path} does not exist: pass a file written by slowllm tune --out.") from None
    except (OSError, ValueError, struct.error):
        raise InputError(f"soft prompt {path} is not a safetensors file: pass a file written by slowllm tune "
                         "--out.") from None
    shapes = [v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    width = shapes[0][-1] if len(shapes) == 1 and shapes[0] else None
    hidden = None
    if model and os.path.isdir(os.path.expanduser(model)):
        try:
            config = json.loads(open(os.path.join(os.path.expanduser(model), "config.json")).read())
            hidden = config.get("hidden_size", config.get("n_embed"))
        except (OSError, ValueError):
            pass
    if width is not None and isinstance(hidden, int) and width != hidden:
        raise InputError(f"soft prompt {path} was tuned for another model (width {width}; {model} has {hidden}): "
                         "use a prompt tuned for this model.")


def exit_on_interrupt(name: str, grace: float | None = 5.0) -> None:
    """Ctrl-C that always stops the process.

    Python raises KeyboardInterrupt wherever the main thread is; raised inside a finalizer or a callback
    it is printed as "Exception ignored" and swallowed, and a job ran on to its last token. So:
    `grace` None: exit now (a node: nothing to save; the coordinator sees the link drop and fails over).
    Otherwise KeyboardInterrupt as usual (a tune saves its prompt on the way out), and a watchdog that
    ends the process `grace` seconds later if it is still running; a second Ctrl-C ends it at once."""
    import signal
    import threading
    import time

    fired = []

    def stop(code: int = 130) -> None:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        os._exit(code)

    def handler(signum, frame):
        if grace is None or fired:
            stop()
        fired.append(True)

        def watchdog() -> None:
            time.sleep(grace)
            stop()

        threading.Thread(target=watchdog, daemon=True, name="slowllm-interrupt").start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
