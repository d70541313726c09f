"""Who may do what: the node secret registers nodes, client keys (one per user) run jobs.

`--client-keys FILE` holds lines `NAME KEY` (`#` comments and blank lines allowed). The file is read again
when it changes (checked at every handshake, a `stat` call) or on SIGHUP, so revoking a user is deleting
their line; connections made with a key that is gone are closed. Without the file, the node secret serves
clients too (one shared secret, as on a trusted LAN). A client key never authenticates a node: the two
roles are looked up in separate lists.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import threading

from slowllm.protocol import AuthError

log = logging.getLogger("slowllm.coordinator")
_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")


def is_loopback(host: str) -> bool:
    """Is `host` (a name or an address) this machine only? Beyond it, secrets and status keys are required."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_client_keys(text: str, source: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _NAME.fullmatch(parts[0]):
            raise AuthError(f"{source} line {number}: write `NAME KEY` (NAME of letters, digits and _.@+-).")
        name, key = parts[0], parts[1].encode()
        if len(key) < 16:
            raise AuthError(f"{source} line {number}: the key of {name} has fewer than 16 characters "
                            "(make one with `openssl rand -hex 32`).")
        if name in keys:
            raise AuthError(f"{source} line {number}: {name} is listed twice.")
        keys[name] = key
    return keys


class KeyRing:
    def __init__(self, node_secret: bytes | None, client_keys: str | os.PathLike | None = None):
        if client_keys is not None and node_secret is None:
            raise AuthError("--client-keys needs --secret-file too (the nodes' secret): without it anyone could "
                            "register a node.")
        self.node_secret = node_secret
        self.path = None if client_keys is None else str(client_keys)
        self._lock = threading.Lock()
        self._stamp = None
        self.clients: dict[str, bytes] = {}
        if self.path is not None:
            self.reload(strict=True)

    @property
    def open(self) -> bool:
        """No secrets at all: anyone on the network may connect (trusted loopback or LAN)."""
        return self.node_secret is None

    def _stat(self):
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self, strict: bool = False) -> bool:
        """Read the client keys again; a broken file keeps the previous keys (strict: raises at start)."""
        if self.path is None:
            return False
        try:
            stamp = self._stat()
            keys = parse_client_keys(open(self.path, encoding="utf-8").read(), self.path)
        except (OSError, UnicodeDecodeError, AuthError) as e:
            message = e if isinstance(e, AuthError) else f"cannot read {self.path}: {e}"
            if strict:
                raise AuthError(f"--client-keys: {message}") from None
            log.warning("client keys not reloaded, keeping the previous ones: %s", message)
            return False
        with self._lock:
            changed = keys != self.clients
            self.clients, self._stamp = keys, stamp
        if changed and not strict:
            log.warning("client keys reloaded from %s: %d users", self.path, len(keys))
        return changed

    def maybe_reload(self) -> bool:
        if self.path is None:
            return False
        try:
            if self._stat() == self._stamp:
                return False
        except OSError:
            return False
        return self.reload()

    def keys(self, role: str) -> list[tuple[str, bytes]] | None:
        """(name, key) pairs that authenticate `role`; None when the coordinator checks no secret."""
        if self.node_secret is None:
            return None
        if role == "node":
            return [("node", self.node_secret)]
        with self._lock:
            if self.path is None:
                return [("default", self.node_secret)]
            return list(self.clients.items())

    def valid(self, role: str, name: str, key: bytes | None) -> bool:
        """Is (name, key) still accepted for `role`? False once a user's line was removed or changed."""
        if key is None:
            return True
        return any(n == name and hmac.compare_digest(k, key) for n, k in (self.keys(role) or []))

    def client_for(self, token: str) -> str | None:
        """The user whose client key `token` is (the node secret only counts without --client-keys)."""
        token_bytes = token.encode()
        for name, key in self.keys("client") or []:
            if hmac.compare_digest(token_bytes, key):
                return name
        return None

    def check_bearer(self, token: str) -> str | None:
        """The user a status-page credential belongs to (any client key or the node secret), or None."""
        token_bytes = token.encode()
        for name, key in (self.keys("client") or []) + (self.keys("node") or []):
            if hmac.compare_digest(token_bytes, key):
                return name
        return None
