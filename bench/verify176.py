"""A lying node at Bloom-176B width (hidden 14336, 112 heads), under --verify 1.

Uses bench/width176.py's one-block checkpoint (built under bench/_work/ if missing). A real coordinator
(with a secret, --verify 1) and an honest node serve block 0; a node holding the secret registers the same
block and answers every request with random values of the right shape (tests/adversaries.py; --lie picks
another kind: `nudge`, 2%, stays under the bf16 tolerance and is not caught). A 256-token line is
scored: the coordinator's check disagrees, it computes the block itself (one fp32 block: 9.2 GB) and bans
the liar; the logprob must equal local mode's. Prints a table and a JSON line: the logprob against local
mode, the time of the scored job against the same job with the liar banned (what a dispute costs), and
the coordinator's peak RSS. Needs ~16 GB of RAM.

    python bench/verify176.py [--lie random]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adversaries import LIES, LyingNode  # noqa: E402
from netutil import Cluster  # noqa: E402
from width176 import WORK, _hwm, _text, build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lie", default="random", choices=sorted(LIES))
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    from slowllm.coordinator import LocalRunner
    from slowllm.coordinator.jobs._ends import ModelEnds
    from slowllm.node import Checkpoint

    model = build(WORK / "bloom176-1block")
    text = _text(args.tokens, ModelEnds(Checkpoint(model)))
    request = [{"context": text, "continuation": " The end."}]
    secret = WORK / "secret.txt"
    secret.write_text("width176-bench-secret-0123456789")
    with Cluster(model, ["0-0"], timeout=600, secret_file=secret, coordinator_args=["--verify", "1"]) as c:
        client = c.client()
        liar = LyingNode(c.url, secret.read_bytes().strip(), model, 0, 0, args.lie, name="liar176").start()
        start = time.perf_counter()
        disputed = client.score(request)[0]["logprob"]
        dispute_s = time.perf_counter() - start
        status = client.status()
        banned = [n for n in status["nodes"] if n["banned"]]
        print("after the dispute:", [(n["name"], n["banned"], n["reason"]) for n in status["nodes"]], flush=True)
        start = time.perf_counter()
        again = client.score(request)[0]["logprob"]  # honest node only: unverifiable, no dispute
        plain_s = time.perf_counter() - start
        coordinator_peak = _hwm(c.coordinator.pid) / 2**30
    with LocalRunner(model, dtype="bfloat16", progress=False) as local:
        expected = local.score(request)[0]["logprob"]
    result = {"bench": "verify176", "lie": args.lie, "tokens": args.tokens, "logprob_disputed": disputed,
              "logprob_after_ban": again, "logprob_local": expected, "liar_answered": liar.answered,
              "banned": [n["name"] for n in banned], "reason": banned[0]["reason"] if banned else "",
              "dispute_s": round(dispute_s, 1), "plain_s": round(plain_s, 1),
              "dispute_ratio": round(dispute_s / plain_s, 2), "coordinator_peak_gb": round(coordinator_peak, 1)}
    print(f"| lie | {args.lie}, {liar.answered} answers, banned: {bool(banned)} |")
    print(f"| logprob with the liar / after the ban / local | {disputed:.3f} / {again:.3f} / {expected:.3f} |")
    print(f"| scored job with a dispute / without | {dispute_s:.1f} s / {plain_s:.1f} s = {dispute_s / plain_s:.2f}x |")
    print(f"| coordinator peak RSS | {coordinator_peak:.1f} GB |")
    print(json.dumps(result))
    if not banned or abs(disputed - expected) > 1e-2 * abs(expected) + 1e-3:
        sys.exit(1)


if __name__ == "__main__":
    main()
