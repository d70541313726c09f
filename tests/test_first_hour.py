"""A new user's first hour: instant CLI, nodes that survive odd answers, honest memory advice, a
terminal that keeps the streamed text, `cluster up` that checks what it starts, and jobs that say
what they wait for."""

from __future__ import annotations

import http.client
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import debian_tool, run_cli
from netutil import Cluster, free_port
from slowllm.coordinator import make_checkpoint, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CLIS = ["slowllm.coordinator.cli._main", "slowllm.node.server._cli", "slowllm.coordinator.cli._coordinator"]


@pytest.fixture(scope="module")
def gap_cluster(tiny_model, secret):
    """A coordinator whose blocks 3-5 nobody serves: jobs wait 3 s for them, then fail."""
    c = Cluster(tiny_model, [], secret_file=secret, coordinator_args=["--wait-for-nodes", "3"])
    c.start_node("0-2", name="only-half")
    deadline = time.time() + 60
    while not c.client().status()["nodes"]:
        assert time.time() < deadline, c.output(c.coordinator)
        time.sleep(0.2)
    yield c
    c.stop()


# ---- an instant CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize("module", CLIS)
def test_help_and_version_answer_at_once_without_torch(module):
    # what makes --help instant is importing neither torch nor transformers (asserted below), not a clock
    assert subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True).returncode == 0
    version = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and re.search(r"\d+\.\d+", version.stdout)
    probe = (f"import sys\nfrom {module} import build_parser\n"
             "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout + out.stderr


def test_coordinator_and_client_start_without_transformers_blocks():
    """Only what runs blocks needs transformers' modeling code (~3 s to import on 2 cores), and a client
    that sends text needs no torch (~1 s)."""
    probe = ("import sys\nimport slowllm.coordinator.client._client\nprint('torch' in sys.modules)\n"
             "import slowllm.coordinator.swarm._server, slowllm.coordinator.api._backends\n"
             "print(sorted(m for m in sys.modules if m.startswith('transformers.models.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split("\n")[-3:-1] == ["False", "[]"], out.stdout + out.stderr


def test_help_texts_have_descriptions_defaults_and_examples():
    out = run_cli("generate", "--help").stdout
    assert "(default: 20)" in out and "examples:" in out and "slowllm generate" in out
    node = subprocess.run([sys.executable, "-m", "slowllm.node.server._cli", "--help"], capture_output=True, text=True).stdout
    assert "(default: 2GB)" in node and "examples:" in node
    typo = run_cli("generate", "x", "--max-new-token", "3")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr


# ---- nodes never die of a bad answer -----------------------------------------------------------------
class _Proxy(http.server.BaseHTTPRequestHandler):
    """A reverse proxy while the coordinator restarts: 502 to everything, WebSocket upgrades included."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(502)
        self.send_header("Content-Length", "11")
        self.end_headers()
        self.wfile.write(b"bad gateway")

    def log_message(self, *args):
        pass


def test_node_keeps_retrying_when_the_coordinator_url_answers_plain_http(layout_model, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    model = layout_model("st-bf16")  # also: the start-up line says which dtype the blocks are kept in
    from slowllm.node.kernels._kernels import kernels
    kernels()  # (built here first: on a cold cache the nodes' build would take the 10 s this test watches them retry)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / "http.log", tmp_path / "tls.log"]
    procs = [subprocess.Popen([sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-1", "--model", str(model),
                               "--coordinator", f"{scheme}://127.0.0.1:{port}", *threads], stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, env=env)
             for scheme, log, threads in zip(("ws", "wss"), logs, ([], ["--threads", "1", "--dtype", "float32"]))]
    try:
        time.sleep(10)
        assert [p.poll() for p in procs] == [None, None], [log.read_text() for log in logs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        server.shutdown()
    plain, tls = (log.read_text() for log in logs)
    for text in (plain, tls):
        assert "Traceback" not in text
        assert text.count("retrying in") >= 3
    assert "HTTP 502 instead of a WebSocket" in plain
    assert "is the coordinator serving wss://? if not, use ws://" in tls
    from slowllm.node.engine._memory import default_dtype, page_note
    dtype, why = default_dtype(torch.bfloat16, "cpu")  # (st-bf16 is a bf16 checkpoint)
    assert f"in {str(dtype).removeprefix('torch.')}" in plain and why in plain
    # asked for fp32: the bf16 weights kept as they are
    assert ("in float32 with bfloat16 weights (as asked" if kernels() else "in float32 (as asked") in tls
    from slowllm.node.kernels._kernels import describe  # the start-up line: kernels, threads, weights' pages
    assert describe() in plain and f", {torch.get_num_threads()} thread" in plain and ", 1 thread, " in tls
    assert page_note() in plain


def test_client_to_a_plain_coordinator_over_wss_points_at_tls(gap_cluster, secret):
    url = gap_cluster.url.replace("ws://", "wss://")
    proc = run_cli("status", "--coordinator", url, "--secret-file", str(secret))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is the coordinator serving wss://? if not, use ws://" in proc.stderr


# ---- node memory: checked before loading, and the guide computed from the same formula -----------------------
def test_node_refuses_a_range_that_does_not_fit_and_names_one_that_does(models_dir):
    model = models_dir / "mid"
    if not (model / "config.json").is_file():
        make_checkpoint(model, tiny_config(n_layer=6, hidden=512, n_head=8))
    from slowllm.node.engine._blocks import block_nbytes
    from slowllm.node.engine._memory import NODE_RUNTIME_BYTES

    block = block_nbytes(tiny_config(n_layer=6, hidden=512, n_head=8), torch.float32)
    memory = NODE_RUNTIME_BYTES + (100 << 20) + int(3.5 * block)
    proc = subprocess.run([sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-5", "--model", str(model),
                           "--dtype", "float32", "--session-memory", "100MB", "--memory", str(memory),
                           "--coordinator", "ws://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("slowllm-node: error:")]
    assert "blocks 0-5 need" in line and "use --layers 0-2 (3 blocks) or fewer" in line and "--dtype bfloat16" in line


def test_guide_table_is_computed_from_the_node_formula():
    from transformers import BloomConfig

    from slowllm.node.engine._blocks import block_nbytes
    from slowllm.node.engine._memory import guide_table

    bloom = BloomConfig(hidden_size=14336, n_head=112, n_layer=70, vocab_size=250880)
    table = guide_table(block_nbytes(bloom, torch.bfloat16), block_nbytes(bloom, torch.float32), 70,
                        block_bytes_int8=block_nbytes(bloom, torch.bfloat16, int8=True))
    guide = (ROOT / "deploy" / "GUIDE.md").read_text()
    assert table in guide, "deploy/GUIDE.md's node table drifted from slowllm.node.engine._memory.guide_table"
    assert "| 64 GB | 11 | 5 | 7 |" in table  # 11 x 4.6 GiB + 2 GB KV + 1 GB runtime within 85% of 64 GB
    assert "| 64 GB | 11 | 5 | 7 | 22 | 4 |" in table  # int8: 2.3 GiB per block


# ---- the terminal: progress never erases streamed text ---------------------------------------------
def test_streamed_text_stays_on_the_terminal_screen(tiny_model, tmp_path):
    if debian_tool("tmux", "tmux") is None:
        pytest.skip("tmux is not installed and cannot be (not root, or no apt-get): no terminal to capture")
    prompt = "Once upon a time there was"
    args = ["generate", prompt, "--local", "--model", str(tiny_model), "--max-new-tokens", "12"]
    expected = run_cli(*args, "--json", "--no-progress")
    assert expected.returncode == 0, expected.stderr
    import json

    from slowllm.coordinator.cli._main import terminal_safe
    text = terminal_safe(prompt + json.loads(expected.stdout)["text"])
    session = f"slowllm-test-{os.getpid()}"
    command = " ".join([sys.executable, "-m", "slowllm.coordinator.cli._main", *(f"'{a}'" for a in args)])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "250", "-y", "20",
                    f"{command}; echo __DONE__; sleep 60"], check=True, env={**os.environ, "TERM": "xterm"})
    try:
        deadline, screen = time.time() + 120, ""
        while "__DONE__" not in screen and time.time() < deadline:
            time.sleep(0.5)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session])
    lines = [ln.rstrip() for ln in screen.splitlines() if ln.strip()]
    assert lines[-1] == "__DONE__", screen
    assert lines[-2] == text.rstrip(), screen


# ---- cluster up checks what it starts ---------------------------------------------------------------
def _cluster_file(tmp_path, tiny_model, nodes) -> Path:
    spec = yaml.safe_load((ROOT / "cluster.example.yaml").read_text())
    spec["coordinator"].update(model=str(tiny_model), port=free_port())
    spec["nodes"] = nodes
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cluster_up_refuses_a_range_outside_the_model(tmp_path, tiny_model):
    path = _cluster_file(tmp_path, tiny_model, [{"name": "a", "layers": "0-2"}, {"name": "b", "layers": "3-9"}])
    up = run_cli("cluster", "up", str(path))
    assert up.returncode == 2 and "Traceback" not in up.stderr
    assert "node b has layers 3-9, but the model has blocks 0-5" in up.stderr
    assert not (tmp_path / ".cluster.slowllm" / "pids.json").exists()


def test_a_failed_cluster_up_quotes_why_and_leaves_nothing_behind(tmp_path, tiny_model):
    import socket

    from slowllm.coordinator.cli._cluster import _as_yaml_keys

    path = _cluster_file(tmp_path, tiny_model, [{"name": "a", "layers": "0-5"}])
    port = yaml.safe_load(path.read_text())["coordinator"]["port"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        for _ in range(2):  # the second `up` is not told a cluster "is already up"
            up = run_cli("cluster", "up", str(path))
            assert up.returncode == 2 and "Traceback" not in up.stderr, up.stderr
            assert f"the coordinator did not start: cannot listen on 127.0.0.1:{port}" in up.stderr
            assert "pick another `port`" in up.stderr  # the cluster file's key, not the command's flag
            assert not (tmp_path / ".cluster.slowllm" / "pids.json").exists()
    down = run_cli("cluster", "down", str(path))
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    assert _as_yaml_keys("pass --secret-file (or --insecure)") == "pass `secret_file` (or `insecure`)"


@pytest.mark.slow
def test_cluster_up_names_a_node_that_died_and_stops_the_rest(tmp_path, tiny_model, other_model):
    path = _cluster_file(tmp_path, tiny_model, [{"name": "good", "layers": "0-5"},
                                                {"name": "wrongmodel", "layers": "0-3", "model": str(other_model)}])
    up = run_cli("cluster", "up", str(path))
    assert up.returncode == 2 and "Traceback" not in up.stderr, up.stdout + up.stderr
    assert "node wrongmodel exited (status 2) before registering" in up.stderr
    assert "different checkpoint" in up.stderr  # its last log line
    assert not (tmp_path / ".cluster.slowllm" / "pids.json").exists()


# ---- jobs say what they wait for; errors start on a line of their own ---------------------------------
def test_a_waiting_job_says_so_and_its_error_starts_on_a_new_line(gap_cluster, secret):
    proc = run_cli("generate", "Is the sky blue?", "--coordinator", gap_cluster.url, "--secret-file", str(secret))
    assert proc.returncode == 2
    assert "slowllm: waiting up to 3 s for a node serving blocks 3-5" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("slowllm: error: no node serves blocks 3-5")
    assert proc.stdout == "Is the sky blue?\n"


def test_start_line_root_redirect_and_status_page(gap_cluster):
    assert "status page: http://127.0.0.1:" in gap_cluster.ready_line
    host, port = gap_cluster.url.removeprefix("ws://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 302 and r.getheader("Location") == "/status"
    r.read()
    conn.request("GET", "/nothing-here")
    r = conn.getresponse()
    assert r.status == 404 and b"/status" in r.read()
    conn.request("GET", "/status")
    page = conn.getresponse().read().decode()
    assert 'class="legend"' in page and "block no node serves" in page
    assert re.search(r'id="updated">updated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC', page)
    assert 'id="failovers">0<' in page and 'id="missing">3-5<' in page  # ranges as users write them
    assert "(bloom)" in page and 'id="draft">none<' in page


def test_status_text_has_units_and_plurals():
    from slowllm.coordinator.client._client import format_status

    node = {"device": "cpu", "dtype": "bfloat16", "speed": 352.64, "load": 0, "sessions": 1}
    status = {"model": "m", "n_layer": 6, "active_jobs": 1, "failovers": 0, "missing": [3, 4, 5],
              "draft_model": "small-m", "unverified_spans": [[0, 0], [1, 1], [5, 5]],
              "nodes": [{"name": "a", "layers": [0, 2], **node}, {"name": "b", "layers": [5, 5], **node}]}
    text = format_status(status)
    assert "6 blocks, 2 nodes, 1 active job, 0 failovers, draft small-m" in text
    assert "speed    352.6 token-blocks/s" in text and "1 session" in text and "1 sessions" not in text
    assert "missing blocks: 3-5" in text and "blocks 5 " in text and "5-5" not in text
    assert "blocks only one node covers: 0-1, 5" in text  # adjacent spans merge; never "0, 1" or "5-5"


# ---- tuning that Ctrl-C does not lose --------------------------------------------------------------
def test_tune_saves_every_n_steps_and_on_ctrl_c(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"context": "Is the sky blue?", "continuation": " Yes."}\n')
    out = tmp_path / "p.safetensors"
    local = ["--local", "--model", str(tiny_model), "--no-progress"]
    proc = run_cli("tune", "--data", str(data), "--out", str(out), "--steps", "4", "--save-every", "2",
                   "--prompt-tokens", "2", *local)
    assert proc.returncode == 0 and "saved the prompt of step 2" in proc.stdout, proc.stderr

    out.unlink()
    tune = subprocess.Popen([sys.executable, "-m", "slowllm.coordinator.cli._main", "tune", "--data", str(data), "--out",
                             str(out), "--steps", "100000", "--prompt-tokens", "2", *local], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a shell's background job (CI may be one) starts with SIGINT ignored: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert tune.stdout.readline().startswith("step 1/100000")
    tune.send_signal(signal.SIGINT)
    _, err = tune.communicate(timeout=60)
    assert tune.returncode == 130
    assert re.search(r"interrupted: saved the prompt of step \d+ to", err), err
    from slowllm.coordinator.jobs._softprompt import read_soft_prompt
    tensor, _ = read_soft_prompt(out)
    assert tensor.shape == (2, 64) and torch.isfinite(tensor).all()


# ---- text as people read it ------------------------------------------------------------------------
def test_decoded_text_leaves_out_special_tokens_and_streams_incrementally(tiny_model):
    from slowllm.coordinator.jobs._runner import TextStream
    from slowllm.coordinator import LocalRunner

    with LocalRunner(tiny_model, progress=False) as r:
        ids = r.ends.encode("The quick brown fox ünïcödé ✓ jumps")
        assert "<unk>" not in r.ends.decode([0, *ids, 3]) and "<pad>" not in r.ends.decode([0, *ids, 3])
        pieces: list[str] = []
        stream = TextStream(r.ends, lambda i, text: pieces.append(text))
        for token in [0, *ids]:
            stream(0, [token])
        assert "".join(pieces) == r.ends.decode([0, *ids]) == "The quick brown fox ünïcödé ✓ jumps"


def test_the_coordinator_logs_its_nodes_tells_twins_apart_and_a_refused_node_says_so_once(tiny_model, secret,
                                                                                           tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not-the-coordinators-secret-0123456789")
    with Cluster(tiny_model, [], secret_file=secret) as c:
        first = c.start_node("0-2", name="twin")
        deadline = time.monotonic() + 120
        while not c.client().status()["nodes"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        c.start_node("3-5", name="twin", extra=["--threads", "1"])  # a second node under the same name
        status = c.wait_covered(2)
        assert sorted(n["name"] for n in status["nodes"]) == ["twin", "twin#2"]
        stranger = c.start_node("0-5", name="stranger", secret_file=wrong)
        while "keeps refusing" not in c.output(stranger):  # the second refusal in a row
            assert time.monotonic() < deadline and stranger.poll() is None, c.output(stranger)
            time.sleep(0.2)
        time.sleep(4)  # without the quiet backoff, 3-4 more refusals would be logged by now
        assert stranger.poll() is None and c.output(stranger).count("keeps refusing") == 1
        assert c.output(stranger).count("retrying in") == 1, c.output(stranger)
        first.kill()
        deadline = time.monotonic() + 60
        while "node twin left" not in c.output(c.coordinator):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        log = c.output(c.coordinator)  # without -v: one line per node event
    assert "node twin joined from 127.0.0.1: blocks 0-2, cpu/" in log and "node twin#2 joined" in log
    assert "refused a node from 127.0.0.1" in log and "node twin left (blocks 0-2)" in log


# ---- Ctrl-C always stops ---------------------------------------------------------------------------------
def test_ctrl_c_stops_even_when_the_interrupt_is_swallowed(tmp_path):
    """KeyboardInterrupt raised inside a finalizer or callback is "ignored" by Python and the job ran on;
    the watchdog ends the process anyway (here the program swallows every interrupt on purpose)."""
    code = ("import sys, time\n"
            "from slowllm.utils._cli_common import exit_on_interrupt\n"
            "exit_on_interrupt('slowllm', grace=1.0)\n"
            "ready = False\n"
            "while True:\n"
            "    try:  # (from 'ready' on, wherever the one interrupt lands, it is inside this try)\n"
            "        if not ready:\n"
            "            ready = print('ready', flush=True) or True\n"
            "        time.sleep(0.05)\n"
            "    except KeyboardInterrupt:\n"
            "        pass  # as a swallowed 'Exception ignored' would\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130 and "slowllm: interrupted" in proc.stderr.read()


def test_ctrl_c_ends_generation_and_a_retrying_node_without_tracebacks(tiny_model):
    generate = [sys.executable, "-m", "slowllm.coordinator.cli._main", "generate", "Once upon a time", "--local",
                "--model", str(tiny_model), "--max-new-tokens", "3000", "--no-progress"]
    node = [sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-5", "--model", str(tiny_model),
            "--coordinator", f"ws://127.0.0.1:{free_port()}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True) for cmd in (generate, generate, node, node)]
    try:
        for proc, wait_for in zip(procs, ("Once upon a time", "Once upon a time", "retrying in", "retrying in")):
            seen = ""
            while wait_for not in seen:  # the job streams text / the node has retried once
                seen += proc.stdout.read(1)
                assert seen or proc.poll() is None
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            out = proc.stdout.read()
            assert proc.wait(timeout=60) == 130, out
            assert "Traceback" not in out and "Exception ignored" not in out and "interrupted" in out, out
    finally:
        for proc in procs:
            proc.kill()
