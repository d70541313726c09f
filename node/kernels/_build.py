"""Building a C++ extension once per machine, safely when several processes start at once.

torch's `cpp_extension.load` builds into a fixed directory guarded by a lock file it waits on forever:
a process stopped mid-build (Ctrl-C, `slowllm cluster down`, systemd, docker stop) leaves that file
behind, and every later start hangs. Here instead:
- the lock is an `flock` on a file: the kernel releases it when its holder dies, however it died, and a
  waiter gives up after `timeout` seconds with a sentence saying who holds it;
- each build runs in a fresh temporary directory (so torch's own lock there is never stale) that is
  renamed into place only once the library imports: a half-written build is never found;
- the directory's name is a hash of what the library depends on (source, flags, compiler, torch,
  Python), so an upgrade of any of them builds anew instead of loading a stale library;
- a missing compiler or ninja is one sentence saying what to install, before torch tries; so is a cache
  directory that cannot be written (SLOWLLM_CACHE on a read-only or full disk);
- a library in the cache that no longer loads (a disk error, a cache copied from another machine) is
  built again rather than failing every start.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; builds are rare enough to go unlocked there
    fcntl = None

BUILD_TIMEOUT_S = 600.0  # how long a start waits for another process's build (SLOWLLM_BUILD_TIMEOUT)
log = logging.getLogger("slowllm.kernels")


class BuildUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; str() is one sentence saying why and what to do."""


class BuildFailed(BuildUnavailable):
    """The compiler ran and could not make this build (its flags or intrinsics): another build may work,
    where a missing compiler, a cache that cannot be written or a held lock stop them all alike."""


def compiler() -> tuple[str, str]:
    """(path, first line of --version) of the C++ compiler torch would use, or BuildUnavailable."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise BuildUnavailable(f"no C++ compiler ({cxx}) was found: install one (Debian/Ubuntu: apt install g++ "
                               "ninja-build; Fedora: dnf install gcc-c++ ninja-build) for faster decoding")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildUnavailable(f"the C++ compiler {path} does not run ({e}): fix or replace it") from None
    return path, (version.splitlines() or ["unknown"])[0]


def _check_ninja() -> None:
    if shutil.which("ninja") is None:
        raise BuildUnavailable("ninja was not found: install it (pip install ninja, or apt install ninja-build) "
                               "for faster decoding")


def cache_key(sources: list[Path], flags: list[str], compiler_version: str) -> str:
    import torch

    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    for part in (*flags, compiler_version, torch.__version__, sys.version, sysconfig.get_platform()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _import(name: str, library: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def build_lock(path: Path, timeout: float):
    """Hold an exclusive flock on `path`, waiting at most `timeout` seconds for another process's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if fcntl is not None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        f.seek(0)
                        holder = f.read().strip() or "another process"
                        raise BuildUnavailable(f"{holder} has been building {path.stem} for over {timeout:.0f} s "
                                               f"(lock {path}): let it finish, or stop it and start again") from None
                    time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        yield


def build_timeout() -> float:
    """SLOWLLM_BUILD_TIMEOUT's seconds (BUILD_TIMEOUT_S where unset), read at each build so that a bad
    value is one sentence there, not a traceback from every import."""
    value = os.environ.get("SLOWLLM_BUILD_TIMEOUT", "").strip()
    try:
        seconds = float(value) if value else BUILD_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # (NaN too)
        raise BuildUnavailable(f"SLOWLLM_BUILD_TIMEOUT={value} is not a number of seconds: set it to one "
                               f"(default {BUILD_TIMEOUT_S:.0f}) or unset it")
    return seconds


def _remove_abandoned(root: Path, prefix: str) -> None:
    """Temporary build directories whose builder died (we hold the lock: nobody is using them)."""
    for old in root.glob(prefix + ".tmp-*"):
        shutil.rmtree(old, ignore_errors=True)


def build_extension(name: str, sources: list[Path], cflags: list[str], ldflags: list[str], root: Path,
                    timeout: float | None = None, headers: tuple[Path, ...] = ()):
    """(module, its build directory): extension `name` imported, built first into `root` if no build for
    this key exists there, waiting at most `timeout` seconds (build_timeout() if None) for another
    process's build. `headers`: files the sources include, part of the key like the sources."""
    timeout = build_timeout() if timeout is None else timeout
    path, version = compiler()
    key = cache_key([*sources, *headers], cflags + ldflags, version)
    final = root / f"{name}-{key}"
    library = final / f"{name}.so"  # what torch's builder names it
    try:
        if library.exists():
            with contextlib.suppress(ImportError, OSError):  # (does not load: built again, under the lock)
                return _import(name, library), final
        _check_ninja()
        with build_lock(root / f"{name}.lock", timeout):
            if library.exists():  # built by the process we waited for, or one that does not load
                try:
                    return _import(name, library), final
                except (ImportError, OSError) as e:
                    log.warning("slowllm: the build in %s does not load (%s); building it again", final, e)
                    shutil.rmtree(final, ignore_errors=True)
            return _build(name, sources, cflags, ldflags, root, final), final
    except OSError as e:  # (the compiler's own failures are BuildFailed: here the cache's directory or lock)
        raise BuildUnavailable(f"cannot write the kernel cache {root} ({e.strerror or e}): set SLOWLLM_CACHE to a "
                               "writable directory") from None


def _build(name: str, sources: list[Path], cflags: list[str], ldflags: list[str], root: Path, final: Path):
    """Build into a fresh temporary directory, renamed to `final` once the library imports (we hold the lock)."""
    _remove_abandoned(root, final.name)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        from torch.utils.cpp_extension import load

        module = load(name, [str(s) for s in sources], extra_cflags=cflags, extra_ldflags=ldflags,
                      build_directory=str(tmp), verbose=False)
        tmp.rename(final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = str(e).strip().splitlines()
        raise BuildFailed(f"building {name} failed ({detail[-1][:300] if detail else type(e).__name__}); "
                          "set SLOWLLM_ISA=none to skip it") from e
    for old in root.glob(f"{name}-*"):  # builds of an older source, compiler or torch
        if old != final and old.is_dir() and ".tmp-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return module
