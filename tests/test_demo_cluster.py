"""`slowllm demo` and `slowllm cluster up/down` end to end, as a user runs them."""

import json
import time

import psutil
import pytest
import yaml

from conftest import run_cli
from netutil import free_port
from slowllm.coordinator import Client


@pytest.mark.slow
def test_demo_runs_offline_and_agrees(tmp_path):
    proc = run_cli("demo", "--workdir", str(tmp_path), timeout=600, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout and "identical" in proc.stdout


@pytest.mark.slow
def test_cluster_up_and_down_with_two_coordinators(tmp_path, tiny_model):
    """The example file with its coordinator twice (`coordinators:`): every node serves both."""
    ports = [free_port(), free_port()]
    spec = yaml.safe_load(open(__file__.replace("tests/test_demo_cluster.py", "cluster.example.yaml")))
    first = dict(spec.pop("coordinator"), model=str(tiny_model), port=ports[0], secret_file="secret.txt")
    spec["coordinators"] = [first, {"port": ports[1], "secret_file": "secret.txt"}]  # (the model: the first's)
    (tmp_path / "secret.txt").write_text("cluster-secret-0123456789abcdef")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    up = run_cli("cluster", "up", str(path))
    assert up.returncode == 0, up.stdout + up.stderr
    state = tmp_path / ".cluster.slowllm" / "pids.json"
    pids = [e["pid"] for e in json.loads(state.read_text())]
    try:
        for port in ports:
            client = Client(f"ws://127.0.0.1:{port}", secret_file=tmp_path / "secret.txt")
            assert client.status()["missing"] == [] and len(client.status()["nodes"]) == 3
        both = Client([f"ws://127.0.0.1:{p}" for p in ports], secret_file=tmp_path / "secret.txt")
        assert both.score([{"context": "a", "continuation": " b"}])
        again = run_cli("cluster", "up", str(path))
        assert again.returncode == 2 and "already up" in again.stderr
    finally:
        down = run_cli("cluster", "down", str(path))
    assert down.returncode == 0 and "stopped 5" in down.stdout
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
