"""The network half of `slowllm demo`: a coordinator and three nodes on 127.0.0.1, checked against local mode."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._client import Client
from ._jobs import Sampling
from ._tune import TuneOptions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_network(model: Path, local: dict) -> int:
    from ._demo import PROMPTS, SCORE_REQUESTS, TUNE_DATA, _timed

    port = _free_port()
    url = f"ws://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            secret = Path(tmp) / "secret.txt"
            secret.write_text(os.urandom(24).hex())
            print(f"network mode (coordinator {url} + 3 nodes, shared secret):", flush=True)
            coord = subprocess.Popen([sys.executable, "-m", "slowllm.coordinator._server_cli", "--model", str(model),
                                      "--port", str(port), "--secret-file", str(secret)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            procs.append(coord)
            if "ready" not in coord.stdout.readline():
                print("slowllm: error: the demo coordinator did not start.", file=sys.stderr)
                return 1
            for layers in ("0-1", "2-3", "4-5"):
                procs.append(subprocess.Popen([sys.executable, "-m", "slowllm.node._cli", "--layers", layers,
                                               "--coordinator", url, "--secret-file", str(secret)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
            client = Client(url, secret_file=secret)
            deadline = time.time() + 120
            while client.status()["missing"]:
                if time.time() > deadline:
                    print("slowllm: error: the demo nodes did not register in 120 s.", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            remote = {
                "generate": _timed("generate 2 prompts x 12", lambda: client.generate(PROMPTS, Sampling(max_new_tokens=12))),
                "score": _timed("score 2 lines", lambda: client.score(SCORE_REQUESTS)),
            }
            losses = []
            _timed("tune 4 steps", lambda: client.tune(TUNE_DATA, TuneOptions(prompt_tokens=4, steps=4, lr=0.05),
                                                       on_step=lambda s, loss: losses.append(loss)))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)
    same_tokens = [r["token_ids"] for r in remote["generate"]] == [r["token_ids"] for r in local["generate"]]
    worst = max(abs(a - b) for ra, rb in zip(remote["score"], local["score"])
                for a, b in zip(ra.get("logprobs", [ra.get("logprob")]), rb.get("logprobs", [rb.get("logprob")])))
    loss_gap = max(abs(a - b) for a, b in zip(losses, local["tune_losses"]))
    ok = same_tokens and worst < 1e-4 and loss_gap < 1e-4
    print(f"remote vs local: generated tokens {'identical' if same_tokens else 'DIFFER'}, "
          f"max logprob difference {worst:.2e}, max tuning-loss difference {loss_gap:.2e}")
    print("demo passed" if ok else "demo FAILED: remote and local disagree")
    return 0 if ok else 1
