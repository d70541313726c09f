"""The network half of `slowllm demo`: a coordinator and three nodes on 127.0.0.1, checked against local mode."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from slowllm.coordinator.jobs._options import Sampling, TuneOptions

from ._launch import LocalCluster


def run_network(model: Path, local: dict) -> int:
    from ._demo import PROMPTS, SCORE_REQUESTS, TUNE_DATA, _timed

    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "secret.txt"
        secret.write_text(os.urandom(24).hex())
        print("network mode (coordinator + 3 nodes on 127.0.0.1, shared secret):", flush=True)
        with LocalCluster(model, ["0-1", "2-3", "4-5"], secret_file=secret) as cluster:
            client = cluster.client()
            remote = {
                "generate": _timed("generate 2 prompts x 12", lambda: client.generate(PROMPTS, Sampling(max_new_tokens=12))),
                "score": _timed("score 2 lines", lambda: client.score(SCORE_REQUESTS)),
            }
            losses = []
            _timed("tune 4 steps", lambda: client.tune(TUNE_DATA, TuneOptions(prompt_tokens=4, steps=4, lr=0.05),
                                                       on_step=lambda s, loss: losses.append(loss)))
    same_tokens = [r["token_ids"] for r in remote["generate"]] == [r["token_ids"] for r in local["generate"]]
    worst = max(abs(a - b) for ra, rb in zip(remote["score"], local["score"])
                for a, b in zip(ra.get("logprobs", [ra.get("logprob")]), rb.get("logprobs", [rb.get("logprob")])))
    loss_gap = max(abs(a - b) for a, b in zip(losses, local["tune_losses"]))
    ok = same_tokens and worst < 1e-4 and loss_gap < 1e-4
    print(f"remote vs local: generated tokens {'identical' if same_tokens else 'DIFFER'}, "
          f"max logprob difference {worst:.2e}, max tuning-loss difference {loss_gap:.2e}")
    print("demo passed" if ok else "demo FAILED: remote and local disagree")
    return 0 if ok else 1
