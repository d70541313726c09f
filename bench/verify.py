"""What trust costs: frame authentication, and --verify 0.05 / 1 against no verification.

    python bench/verify.py [--n-layer 12] [--hidden 512] [--tokens 32] [--repeats 3]

1. Frame authentication (HMAC-SHA256 seal + open) of one Bloom-176B token's hidden state (57 KB fp32)
   and of a 4 MB frame, against packing the same message (msgpack) — both sides pay it once per frame.
2. Coordinator + 4 nodes on loopback (two nodes for every span, so every hop can be checked), once per
   --verify value: generation ms/token (1 prompt, --tokens new tokens) and forward throughput (a score
   job of 16 x 64 tokens, tokens/s). Each figure is the median of --repeats and is reported as a ratio
   to --verify 0 measured in the same run. Table + JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slowllm.coordinator import Sampling, make_checkpoint, tiny_config
from slowllm.coordinator.demo._launch import LocalCluster
from slowllm.protocol import Channel, Forward, encode_tensor, pack

WORK = Path(__file__).parent / "_work"
PROMPT = "Once upon a time there was a researcher without a cluster"


def frame_auth(hidden: int, positions: int, repeats: int = 200) -> dict:
    x = torch.randn(1, positions, hidden)
    msg = Forward(id=1, first=0, last=9, hidden=encode_tensor(x), mask=encode_tensor(torch.ones(1, positions,
                                                                                              dtype=torch.long)))
    sender, receiver = Channel(b"k" * 32, None), Channel(None, b"k" * 32)
    start = time.perf_counter()
    for _ in range(repeats):
        frame = pack(msg)
    packing = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        receiver.open(sender.seal(frame))
    auth = (time.perf_counter() - start) / repeats
    return {"bytes": len(frame), "pack_us": round(packing * 1e6, 1), "seal_open_us": round(auth * 1e6, 1),
            "ratio_to_pack": round(auth / packing, 2)}


def measure(model: Path, n_layer: int, verify: float, secret: Path, tokens: int, repeats: int) -> dict:
    half = n_layer // 2
    spans = [f"0-{half - 1}", f"{half}-{n_layer - 1}"] * 2  # every span held twice: every hop checkable
    with LocalCluster(model, spans, secret_file=secret, coordinator_args=["--verify", str(verify)]) as c:
        client = c.client()
        client.generate([PROMPT], Sampling(max_new_tokens=4))  # warm-up
        per_token, throughput = [], []
        requests = [{"context": f"{PROMPT} number {i} " + "word " * 48, "continuation": " and then"} for i in range(16)]
        for _ in range(repeats):
            start = time.perf_counter()
            client.generate([PROMPT], Sampling(max_new_tokens=tokens))
            per_token.append((time.perf_counter() - start) / tokens * 1000)
            start = time.perf_counter()
            client.score(requests)
            throughput.append(16 * 64 / (time.perf_counter() - start))
        status = client.status()
    return {"ms_per_token": statistics.median(per_token), "forward_tok_s": statistics.median(throughput),
            "verified_hops": status["verified_hops"], "disagreements": status["disagreements"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = WORK / f"verify-h{args.hidden}-l{args.n_layer}"
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(n_layer=args.n_layer, hidden=args.hidden, n_head=8, vocab_size=8192,
                                           std=0.02))
    secret = WORK / "verify-secret.txt"
    secret.write_text("bench-secret-0123456789abcdef")

    auth = {"bloom176b_token": frame_auth(14336, 1), "4MB": frame_auth(14336, 73)}
    runs = {v: measure(model, args.n_layer, v, secret, args.tokens, args.repeats) for v in (0.0, 0.05, 1.0)}
    base = runs[0.0]
    print(f"{'frame':<18}{'bytes':>10}{'pack us':>10}{'seal+open us':>14}{'x pack':>8}")
    for name, r in auth.items():
        print(f"{name:<18}{r['bytes']:>10}{r['pack_us']:>10}{r['seal_open_us']:>14}{r['ratio_to_pack']:>8}")
    print(f"\n{'--verify':<10}{'ms/token':>10}{'x none':>8}{'fwd tok/s':>11}{'x none':>8}{'checked hops':>14}")
    result = {"bench": "verify", "hidden": args.hidden, "n_layer": args.n_layer, "frame_auth": auth, "verify": {}}
    for v, r in runs.items():
        slow = r["ms_per_token"] / base["ms_per_token"]
        fwd = r["forward_tok_s"] / base["forward_tok_s"]
        print(f"{v:<10}{r['ms_per_token']:>10.1f}{slow:>8.2f}{r['forward_tok_s']:>11.0f}{fwd:>8.2f}"
              f"{r['verified_hops']:>14}")
        result["verify"][str(v)] = {**r, "ms_per_token_ratio": round(slow, 3), "forward_throughput_ratio": round(fwd, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
