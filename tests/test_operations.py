"""Operating a cluster: TLS, the loopback-without-secret rule, the status page in a real browser, deploy/."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import debian_tool

from netutil import Cluster
from slowllm.protocol import UnavailableError

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SLOWLLM_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the test certificates")
def test_tls_coordinator_with_self_signed_certificate(tiny_model, tmp_path):
    cert, key = _self_signed(tmp_path, "server")
    other, _ = _self_signed(tmp_path, "other")
    secret = tmp_path / "secret.txt"
    secret.write_text("tls-test-secret-0123456789abcdef")
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret, cafile=cert,
                 coordinator_args=["--certfile", str(cert), "--keyfile", str(key)]) as c:
        assert c.url.startswith("wss://")
        assert c.client().score([{"context": "a", "continuation": " b"}])
        with pytest.raises(UnavailableError, match="not trusted.*--cafile"):
            c.client(cafile=str(other)).status()
        stranger = c.start_node("0-5", name="wrong-ca", extra=["--cafile", str(other)])
        assert c.wait(stranger, 60) == 2 and "not trusted" in c.output(stranger)


def test_non_loopback_without_secret_is_refused(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "slowllm.coordinator.cli._coordinator", "--model", str(tiny_model),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "without a shared secret" in proc.stderr and "Traceback" not in proc.stderr


def _chromium() -> str | None:
    # CI runs as root on Debian: the browser is installed the first time (a few hundred MB, once per machine)
    return shutil.which("chromium-browser") or debian_tool("chromium", "chromium")


def _browse(browser: str, profile: Path, *args: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def test_status_page_in_headless_chromium(tiny_model, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get)")
    with Cluster(tiny_model, ["0-1", "2-3", "4-5"]) as c:
        page = c.url.replace("ws://", "http://") + "/status"
        dom = _browse(browser, tmp_path / "profile", "--dump-dom", page)
        rows = dict(re.findall(r"<tr><th>([^<]+)</th>(.*?)</tr>", dom))
        for name, proc in c.nodes.items():
            first, last = map(int, name.split("-", 1)[1].split("-"))
            cells = re.findall(r'<td class="(on|off)"', rows[name])
            assert [i for i, cell in enumerate(cells) if cell == "on"] == list(range(first, last + 1)), name
        assert re.search(r'id="missing">none<', dom)
        assert "gap" not in rows["coverage"]

        c.nodes["n1-2-3"].kill()
        deadline = time.time() + 20
        while c.client().status()["missing"] != [2, 3] and time.time() < deadline:
            time.sleep(0.2)
        dom = _browse(browser, tmp_path / "profile", "--dump-dom", page)
        coverage = re.findall(r'<td class="(ok|gap)"', dict(re.findall(r"<tr><th>([^<]+)</th>(.*?)</tr>", dom))["coverage"])
        assert coverage == ["ok", "ok", "gap", "gap", "ok", "ok"]
        assert re.search(r'id="missing">2-3<', dom)  # ranges as users write them
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "status.png"
        _browse(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1000,400", page)
        assert shot.is_file() and shot.stat().st_size > 1000


def test_systemd_unit_execstart_runs_a_real_node(tiny_model, tmp_path):
    """The unit template's ExecStart, with its variables filled in as systemd would, registers a node."""
    unit = (ROOT / "deploy" / "slowllm-node@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1)
    defaults = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^Environment=(.+)$", unit, re.M).group(1)))
    secret = tmp_path / "secret.txt"
    secret.write_text("systemd-test-secret-0123456789")
    with Cluster(tiny_model, ["0-5"], secret_file=secret) as c:
        env = {**defaults, "COORDINATOR": c.url, "MODEL": str(tiny_model), "SECRET_FILE": str(secret)}
        line = exec_start.replace("%i", "3-5").replace("%H", socket.gethostname())
        line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line)
        line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), line)  # unbraced: words, or nothing when unset
        argv = shlex.split(line)
        assert argv[:2] == ["/usr/bin/env", "slowllm-node"]
        bindir = Path(sys.executable).parent  # the console script installed beside this interpreter
        proc = subprocess.Popen(argv, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        c.procs.append(proc)
        status = c.wait_covered(2)
        names = {n["name"] for n in status["nodes"]}
        assert f"{socket.gethostname()}-3-5" in names


def test_compose_file_is_valid():
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("the docker compose client is not installed on this machine")
    proc = subprocess.run(["docker", "compose", "-f", str(ROOT / "deploy" / "compose.yaml"), "config", "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "MODEL_DIR": "/tmp"})
    assert proc.returncode == 0, proc.stderr


def test_systemd_coordinator_unit_parses():
    """The coordinator unit's ExecStart, its variables filled in as systemd would, is a valid command."""
    from slowllm.coordinator.cli._coordinator import build_parser

    unit = (ROOT / "deploy" / "slowllm-coordinator.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1)
    env = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^Environment=(.+)$", unit, re.M).group(1)))
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start)
    argv = shlex.split(re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), line))
    assert argv[:2] == ["/usr/bin/env", "slowllm-coordinator"]
    args = build_parser().parse_args(argv[2:])
    assert args.client_keys == "/etc/slowllm/clients.txt" and args.host == "0.0.0.0"
