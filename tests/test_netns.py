"""Network faults between hosts: nodes in their own network namespace, joined to the coordinator's by a
veth pair, with netem delay and loss on the link, and the link cut mid-session.

Needs root and `ip netns` (as here and in CI); elsewhere the test is skipped with the reason. The
namespace, its veth pair and the addresses (10.77.1.0/24, on this machine only) are made by the test and
removed after it.
"""

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from slowllm.coordinator import Client, LocalRunner, Sampling

NS = "slowllm-test-nodes"
HOST_IF, NS_IF = "slt-host0", "slt-node0"
HOST_IP, NS_IP = "10.77.1.1", "10.77.1.2"
PROMPT = "Once upon a time there was a researcher"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _teardown() -> None:
    _run("ip", "link", "del", HOST_IF, check=False)
    _run("ip", "netns", "del", NS, check=False)


@pytest.fixture
def namespace():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    _teardown()
    try:
        _run("ip", "netns", "add", NS)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"`ip netns add` is not permitted here: {e.stderr.strip()}")
    try:
        _run("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        _run("ip", "link", "set", NS_IF, "netns", NS)
        _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        _run("ip", "link", "set", HOST_IF, "up")
        _run("ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
        _run("ip", "netns", "exec", NS, "ip", "link", "set", NS_IF, "up")
        _run("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
        netem = _run("tc", "qdisc", "add", "dev", HOST_IF, "root", "netem", "delay", "20ms", "5ms", "loss", "1%",
                     check=False) if shutil.which("tc") else None
        yield netem is not None and netem.returncode == 0
    finally:
        _teardown()


class FarCluster:
    """A coordinator on this side of the veth link and two nodes (0-2, 3-5) in the namespace."""

    def __init__(self, model, secret):
        self.model, self.secret = str(model), str(secret)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs = []
        coord = self.spawn([sys.executable, "-m", "slowllm.coordinator.cli._coordinator", "--model", self.model,
                            "--host", HOST_IP, "--port", "0", "--secret-file", self.secret,
                            "--request-timeout", "3", "--wait-for-nodes", "60"])
        self.url = coord.stdout.readline().split("ready at ")[1].split()[0]
        for layers in ("0-2", "3-5"):
            self.node(layers, f"far-{layers}", in_namespace=True)
        self.client = Client(self.url, secret_file=secret)
        deadline = time.time() + 90
        while self.client.status()["missing"]:
            assert time.time() < deadline, "nodes in the namespace did not register"
            time.sleep(0.3)

    def spawn(self, cmd, in_namespace=False):
        proc = subprocess.Popen((["ip", "netns", "exec", NS] if in_namespace else []) + cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env)
        self.procs.append(proc)
        return proc

    def node(self, layers, name, in_namespace=False):
        return self.spawn([sys.executable, "-m", "slowllm.node.server._cli", "--layers", layers, "--coordinator", self.url,
                           "--model", self.model, "--secret-file", self.secret, "--name", name], in_namespace)

    def stop(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _expected(model, tokens):
    with LocalRunner(model, progress=False) as local:
        return local.generate([PROMPT], Sampling(max_new_tokens=tokens))[0]["token_ids"]


def test_delay_and_loss_on_the_link(namespace, tiny_model, tmp_path):
    if not namespace:
        pytest.skip("the kernel here has no netem qdisc (`tc qdisc ... netem` is unknown): delay/loss untestable")
    secret = tmp_path / "secret.txt"
    secret.write_text("netns-test-secret-0123456789abcdef")
    cluster = FarCluster(tiny_model, secret)
    try:
        assert cluster.client.generate([PROMPT], Sampling(max_new_tokens=12))[0]["token_ids"] == _expected(tiny_model, 12)
    finally:
        cluster.stop()


def test_link_cut_mid_session_resumes_on_a_new_node(namespace, tiny_model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("netns-test-secret-0123456789abcdef")
    expected = _expected(tiny_model, 200)
    cluster = FarCluster(tiny_model, secret)
    try:
        started, out = threading.Event(), {}

        def generate():
            try:
                out["ids"] = cluster.client.generate([PROMPT], Sampling(max_new_tokens=200),
                                                     on_text=lambda i, t: started.set())[0]["token_ids"]
            except Exception as e:  # reported below
                out["error"] = e

        thread = threading.Thread(target=generate)
        thread.start()
        assert started.wait(60)
        # the link is cut mid-session, on the nodes' side (this side keeps its address for the coordinator)
        _run("ip", "netns", "exec", NS, "ip", "link", "set", NS_IF, "down")
        time.sleep(4)  # past the request timeout: the job now waits for blocks to be covered again
        assert thread.is_alive()
        cluster.node("0-5", "near")  # a replacement on this side of the cut
        thread.join(120)
        assert "error" not in out, out.get("error")
        assert out["ids"] == expected
        assert cluster.client.status()["failovers"] >= 1
    finally:
        cluster.stop()
