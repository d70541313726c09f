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
def test_cluster_up_and_down(tmp_path, tiny_model):
    port = free_port()
    spec = yaml.safe_load(open(__file__.replace("tests/test_demo_cluster.py", "cluster.example.yaml")))
    spec["coordinator"].update(model=str(tiny_model), port=port)
    (tmp_path / "secret.txt").write_text("cluster-secret-0123456789abcdef")
    spec["coordinator"]["secret_file"] = "secret.txt"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    up = run_cli("cluster", "up", str(path))
    assert up.returncode == 0, up.stdout + up.stderr
    state = tmp_path / ".cluster.slowllm" / "pids.json"
    pids = [e["pid"] for e in json.loads(state.read_text())]
    try:
        client = Client(f"ws://127.0.0.1:{port}", secret_file=tmp_path / "secret.txt")
        deadline = time.time() + 60
        while client.status()["missing"] and time.time() < deadline:
            time.sleep(0.3)
        assert client.status()["missing"] == []
        assert client.score([{"context": "a", "continuation": " b"}])
        again = run_cli("cluster", "up", str(path))
        assert again.returncode == 2 and "already up" in again.stderr
    finally:
        down = run_cli("cluster", "down", str(path))
    assert down.returncode == 0 and "stopped 4" in down.stdout
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
