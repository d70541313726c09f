"""`slowllm cluster up|down FILE.yaml`: start and stop on this machine what a cluster file describes.

`up` checks every node's range against the model first, starts the coordinator (waiting for its
`ready` line) and the nodes as detached processes with logs in the state directory, records their
PIDs, and waits until every node has registered. A node that dies first (bad range, too little memory,
wrong secret) makes `up` stop what it started and exit non-zero, naming the node and its last log
line. `down` stops exactly the recorded PIDs (checking they are still slowllm processes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from slowllm.protocol import InputError


def load_cluster(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"cluster file {path} does not exist (see cluster.example.yaml).")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"cluster file {path} is not valid YAML ({e.__class__.__name__}): fix its syntax.") from None
    # one coordinator (`coordinator:`), or several of one swarm (`coordinators:`, a list): nodes serve them all
    if "coordinators" in spec and "coordinator" in spec:
        raise InputError(f"cluster file {path} has both 'coordinator' and 'coordinators': keep one.")
    coords = spec.get("coordinators") if "coordinators" in spec else [spec.get("coordinator")]
    if not isinstance(coords, list) or not coords or not all(isinstance(c, dict) for c in coords) \
            or "model" not in coords[0]:
        raise InputError(f"cluster file {path} needs a 'coordinator' section (or a 'coordinators' list) with a "
                         "'model'.")
    for c in coords[1:]:  # the same model everywhere: the others may leave it out
        c.setdefault("model", coords[0]["model"])
        if c["model"] != coords[0]["model"]:
            raise InputError(f"cluster file {path}: every coordinator serves the same model ({coords[0]['model']}).")
    ports = [int(c.get("port", 8765)) for c in coords]
    if len(coords) > 1 and len(set(ports)) != len(ports):
        raise InputError(f"cluster file {path}: give each coordinator its own 'port'.")
    spec["coordinators"] = coords
    spec["coordinator"] = coords[0]
    nodes = spec.get("nodes") or []
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "layers" in n for n in nodes):
        raise InputError(f"cluster file {path}: 'nodes' must be a list of entries with 'layers' (e.g. 0-11).")
    return spec


def _state_dir(path: Path, spec: dict) -> Path:
    d = Path(spec.get("state_dir") or path.parent / f".{path.stem}.slowllm")
    return d if d.is_absolute() else (path.parent / d)


def _rel(base: Path, value):
    if value is None:
        return None
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() or not (base / p).exists() else (base / p).resolve())


def cluster(action: str, file: str) -> int:
    path = Path(file).resolve()
    spec = load_cluster(path)
    state = _state_dir(path, spec)
    return (_down if action == "down" else _up)(file, path, spec, state)


def _down(file: str, path: Path, spec: dict, state: Path) -> int:
    pids_file = state / "pids.json"
    if not pids_file.is_file():
        print(f"nothing to stop: no cluster started from {file}")
        return 0
    if not _alive(pids_file):
        pids_file.unlink()
        print(f"nothing to stop: no process of the cluster started from {file} was still running; cleared its "
              "state")
        return 0
    stopped = 0
    for entry in json.loads(pids_file.read_text()):
        try:
            proc = psutil.Process(entry["pid"])
            if "slowllm" in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except psutil.TimeoutExpired:
                    proc.kill()
                stopped += 1
        except psutil.NoSuchProcess:
            pass
    pids_file.unlink()
    print(f"stopped {stopped} processes")
    return 0


def _coordinator_command(c: dict, base: Path, model: str, host: str, port: int, secret: str | None,
                         client_keys: str | None) -> list[str]:
    """`slowllm-coordinator` with the flags the file's `coordinator:` section sets (paths relative to it)."""
    cmd = [sys.executable, "-m", "slowllm.coordinator.cli._coordinator", "--model", model, "--host", host,
           "--port", str(port), "--wait-for-nodes", str(c.get("wait_for_nodes", 60))]
    if secret:
        cmd += ["--secret-file", secret]
    if client_keys:
        cmd += ["--client-keys", client_keys]
    if c.get("public_status"):
        cmd.append("--public-status")
    for key in ("request_timeout", "max_jobs_per_client", "max_jobs", "max_message_size", "max_new_tokens",
                "verify", "draft_tokens", "http_port"):
        if c.get(key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(c[key])]
    for key in ("draft_model", "soft_prompts", "chat_template"):
        if c.get(key):
            cmd += [f"--{key.replace('_', '-')}", _rel(base, c[key])]
    for key in ("certfile", "keyfile"):
        if c.get(key):
            cmd += [f"--{key}", _rel(base, c[key])]
    if c.get("insecure"):
        cmd.append("--insecure")
    return cmd


def _node_command(node: dict, name: str, base: Path, model: str, urls: list[str], secrets: list[str | None],
                  cafile: str | None) -> list[str]:
    """`slowllm-node` for one entry of the file's `nodes:` list, serving every coordinator of the file."""
    cmd = [sys.executable, "-m", "slowllm.node.server._cli", "--layers", str(node["layers"]),
           *(a for url in urls for a in ("--coordinator", url)), "--name", name, "--device", node.get("device", "cpu")]
    for key in ("dtype", "session_memory"):
        if node.get(key):
            cmd += [f"--{key.replace('_', '-')}", str(node[key])]
    # the operator's own file names the model, so nodes started here may open it (a node never opens
    # a local path a coordinator names over the network)
    cmd += ["--model", _rel(base, node["model"]) if node.get("model") else model]
    if any(secrets):  # one file for all of them, or one each in the coordinators' order
        for secret in (secrets[:1] if len(set(secrets)) == 1 else secrets):
            cmd += ["--secret-file", secret]
    if cafile:
        cmd += ["--cafile", cafile]
    return cmd


@dataclass
class _Coordinator:
    """One coordinator of the file, its paths resolved."""

    log: str  # its log's name in the state directory
    section: dict
    host: str
    port: int
    url: str
    cafile: str | None
    secret: str | None
    client_keys: str | None
    client_secret: str | None  # what `up` asks its status with


def _coordinators(file: str, base: Path, spec: dict) -> list[_Coordinator]:
    out = []
    for i, c in enumerate(spec["coordinators"]):
        host, port = c.get("host", "127.0.0.1"), int(c.get("port", 8765))
        url = c.get("url") or f"{'wss' if c.get('certfile') is not None else 'ws'}://{host}:{port}"
        secret, client_keys = _rel(base, c.get("secret_file")), _rel(base, c.get("client_keys"))
        client_secret = _rel(base, c.get("client_key_file")) if client_keys else secret
        if client_keys and not client_secret:
            raise InputError(f"cluster file {file}: with client_keys, give client_key_file (a `NAME KEY` line of "
                             "that file) so `up` can ask the coordinator for its status.")
        out.append(_Coordinator("coordinator" if i == 0 else f"coordinator-{i + 1}", c, host, port, url,
                                _rel(base, c.get("cafile")), secret, client_keys, client_secret))
    if len({c.secret is None for c in out}) > 1:
        raise InputError(f"cluster file {file}: give every coordinator a secret_file, or none of them.")
    return out


def _up(file: str, path: Path, spec: dict, state: Path) -> int:
    pids_file = state / "pids.json"
    if pids_file.is_file():
        if _alive(pids_file):
            raise InputError(f"a cluster from {file} is already up: run `slowllm cluster down {file}` first.")
        pids_file.unlink()  # a cluster that failed or died: nothing of it runs
        print(f"note: no process of the last cluster started from {file} is running; starting anew")
    check_ranges(path, spec)
    state.mkdir(parents=True, exist_ok=True)
    base = path.parent
    coordinators = _coordinators(file, base, spec)
    model = _rel(base, spec["coordinator"]["model"])
    started: list[dict] = []
    nodes: dict[str, subprocess.Popen] = {}

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(state / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started.append({"name": name, "pid": proc.pid})
        pids_file.write_text(json.dumps(started))
        return proc

    for c in coordinators:
        proc = spawn(c.log, _coordinator_command(c.section, base, model, c.host, c.port, c.secret, c.client_keys))
        deadline = time.time() + 120
        while "ready at " not in (state / f"{c.log}.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                cluster("down", file)  # nothing is left behind that a next `up` would mistake for a running cluster
                raise InputError(f"the coordinator did not start: {_as_yaml_keys(_reason(state / f'{c.log}.log'))} "
                                 f"(log: {state / f'{c.log}.log'}).")
            time.sleep(0.2)
        print(f"coordinator ready at {c.url} (pid {proc.pid})", flush=True)
    print(f"waiting for {len(spec.get('nodes') or [])} nodes to register", flush=True)
    cafile = next((c.cafile for c in coordinators if c.cafile), None)
    for i, node in enumerate(spec.get("nodes") or []):
        name = str(node.get("name") or f"node{i}")
        nodes[name] = spawn(name, _node_command(node, name, base, model, [c.url for c in coordinators],
                                                [c.secret for c in coordinators], cafile))
    try:
        for c in coordinators:
            _wait_registered(c.url, c.client_secret, c.cafile, nodes, state, float(spec.get("start_timeout", 600)))
    except InputError:
        cluster("down", file)
        raise
    print(f"logs and PIDs in {state}; stop with: slowllm cluster down {file}")
    return 0


def check_ranges(path: Path, spec: dict) -> None:
    """Every node's range parses and lies inside the model; gaps are named (other PCs may fill them)."""
    from slowllm.node import Checkpoint
    from slowllm.node.server._cli import parse_layers
    from slowllm.utils._units import format_ranges

    n_layer = Checkpoint(_rel(path.parent, spec["coordinator"]["model"])).n_layer
    covered: set[int] = set()
    for i, node in enumerate(spec.get("nodes") or []):
        name = str(node.get("name") or f"node{i}")
        try:
            first, last = parse_layers(str(node["layers"]))
        except Exception as e:
            raise InputError(f"{path.name}: node {name}: {e}") from None
        if last >= n_layer:
            raise InputError(f"{path.name}: node {name} has layers {first}-{last}, but the model has blocks "
                             f"0-{n_layer - 1}: pick a range inside it.")
        covered.update(range(first, last + 1))
    gaps = [b for b in range(n_layer) if b not in covered]
    if gaps:
        print(f"note: no node in {path.name} serves blocks {format_ranges(gaps)}: jobs will wait for nodes from "
              "other PCs to cover them.")


def _alive(pids_file: Path) -> bool:
    """Whether any process a cluster file started still runs (a PID reused by another program does not count)."""
    try:
        entries = json.loads(pids_file.read_text())
    except (OSError, ValueError):
        return False
    for entry in entries:
        try:
            proc = psutil.Process(entry["pid"])
            if proc.status() != psutil.STATUS_ZOMBIE and "slowllm" in " ".join(proc.cmdline()):
                return True
        except (psutil.Error, KeyError, TypeError):
            pass
    return False


def _reason(log: Path) -> str:
    """What a process that failed said: its `error:` line, else its last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln.split("error: ", 1)[1] for ln in lines if "error: " in ln]
    return errors[-1] if errors else (lines[-1] if lines else "(no output)")


def _as_yaml_keys(text: str) -> str:
    """A command's advice in the cluster file's words: `--secret-file` is `secret_file:` there."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: "`" + m.group(1).replace("-", "_") + "`", text)


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return lines[-1].strip() if lines else "(no output)"


def _wait_registered(url: str, secret, cafile, nodes: dict[str, subprocess.Popen], state: Path,
                     timeout: float) -> None:
    """Until every node is on the coordinator's status: a node that exits first fails `up`, by name."""
    from slowllm.coordinator.client._client import Client

    client = Client(url, secret_file=secret, cafile=cafile)
    deadline, waiting = time.time() + timeout, set(nodes)
    while waiting:
        for name in sorted(waiting):
            if nodes[name].poll() is not None:
                raise InputError(f"node {name} exited (status {nodes[name].returncode}) before registering: "
                                 f"{_last_line(state / f'{name}.log')} (log: {state / f'{name}.log'}).")
            last = _last_line(state / f"{name}.log")
            if "authentication failed" in last:  # it would retry forever: a wrong secret is the operator's
                raise InputError(f"node {name} cannot authenticate: {last} (log: {state / f'{name}.log'}).")
        registered = {n["name"] for n in client.status()["nodes"]}
        for name in sorted(waiting & registered):
            print(f"node {name} registered (pid {nodes[name].pid})", flush=True)
        waiting -= registered
        if waiting and time.time() > deadline:
            raise InputError(f"nodes {', '.join(sorted(waiting))} did not register within {timeout:.0f} s: see "
                             f"their logs in {state}.")
        if waiting:
            time.sleep(0.3)
