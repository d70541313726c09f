"""One check at Bloom-176B width (hidden 14336, 112 heads): the wire, the node's memory, long prompts.

Builds a checkpoint of ONE Bloom-176B-shaped block (4.9 GB in bf16) tensor by tensor, streamed into a
safetensors file in row slices (never a whole block in RAM, never committed: it goes under
bench/_work/), with a small vocabulary so the model's ends stay small. Then, through a real coordinator
and node on 127.0.0.1:
  1. scores one 5,000-token line (more than one 256 MB message holds at this width: it is cut to fit),
  2. measures the node's peak RSS for a 4k- and an 8k-token prompt (linear, not quadratic),
  3. cancels: a client that drops mid-generation and the time until its slot and session are free.

    python bench/width176.py [--tokens 5000] [--keep]

Prints a table and one JSON line. Takes ~5-10 minutes and ~12 GB of RAM on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from netutil import Cluster  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "width176"
HIDDEN, HEADS, VOCAB = 14336, 112, 384


def _write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], float]], seed: int) -> None:
    """Write random bf16 tensors {name: (shape, std)} without ever holding one whole in memory."""
    header, offset = {}, 0
    for name, (shape, _) in tensors.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, std) in tensors.items():
            rows = shape[0]
            step = max(1, (64 << 20) // (2 * math.prod(shape[1:]) or 1))
            for start in range(0, rows, step):
                n = min(step, rows - start)
                piece = (torch.randn((n, *shape[1:]), generator=g) * std).to(torch.bfloat16) if std else \
                    torch.ones((n, *shape[1:]), dtype=torch.bfloat16)
                f.write(piece.view(torch.uint8).numpy().tobytes())


def build(path: Path) -> Path:
    if (path / "model.safetensors.index.json").is_file():
        return path
    from slowllm.coordinator.demo._tiny import train_tokenizer, tiny_config

    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(n_layer=1, hidden=HIDDEN, n_head=HEADS, vocab_size=VOCAB, std=0.02)
    config.torch_dtype = "bfloat16"
    config.save_pretrained(path)
    tok = train_tokenizer(VOCAB)
    tok.save(str(path / "tokenizer.json"))
    h = HIDDEN
    ends = {"word_embeddings.weight": ((VOCAB, h), 0.5), "word_embeddings_layernorm.weight": ((h,), 0),
            "word_embeddings_layernorm.bias": ((h,), 0.0), "ln_f.weight": ((h,), 0), "ln_f.bias": ((h,), 0.0)}
    ends = {k: (s, std if not k.endswith("bias") else 1e-6) for k, (s, std) in ends.items()}
    block = {"input_layernorm.weight": ((h,), 0), "input_layernorm.bias": ((h,), 1e-6),
             "self_attention.query_key_value.weight": ((3 * h, h), 0.02),
             "self_attention.query_key_value.bias": ((3 * h,), 0.02),
             "self_attention.dense.weight": ((h, h), 0.02), "self_attention.dense.bias": ((h,), 0.02),
             "post_attention_layernorm.weight": ((h,), 0), "post_attention_layernorm.bias": ((h,), 1e-6),
             "mlp.dense_h_to_4h.weight": ((4 * h, h), 0.02), "mlp.dense_h_to_4h.bias": ((4 * h,), 0.02),
             "mlp.dense_4h_to_h.weight": ((h, 4 * h), 0.01), "mlp.dense_4h_to_h.bias": ((h,), 0.02)}
    _write_safetensors(path / "ends.safetensors", ends, seed=1)
    _write_safetensors(path / "block-0.safetensors", {f"h.0.{k}": v for k, v in block.items()}, seed=2)
    weight_map = {**{k: "ends.safetensors" for k in ends}, **{f"h.0.{k}": "block-0.safetensors" for k in block}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _hwm(pid: int) -> int:
    line = [ln for ln in open(f"/proc/{pid}/status") if ln.startswith("VmHWM")][0]
    return int(line.split()[1]) * 1024


def _rss(pid: int) -> int:
    line = [ln for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS")][0]
    return int(line.split()[1]) * 1024


def _text(tokens: int, ends) -> str:
    from slowllm.coordinator.demo._tiny import CORPUS
    words, text = CORPUS.split(), []
    while len(ends.encode(" ".join(text))) < tokens:
        text.extend(words)
    while len(ends.encode(" ".join(text))) > tokens:
        text.pop()
    return " ".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=5000)
    args = parser.parse_args()
    t0 = time.perf_counter()
    model = build(WORK / "bloom176-1block")
    print(f"checkpoint: 1 block of hidden {HIDDEN}, {HEADS} heads ({time.perf_counter() - t0:.0f} s to build)",
          flush=True)
    from slowllm.coordinator import LocalRunner
    from slowllm.coordinator.jobs._ends import ModelEnds
    from slowllm.node import Checkpoint

    ends = ModelEnds(Checkpoint(model))
    rows = {}
    secret = WORK / "secret.txt"  # authenticated frames, as a real network has them: 256 MB frames are sealed too
    secret.write_text("width176-bench-secret-0123456789")
    with Cluster(model, ["0-0"], timeout=600, secret_file=secret) as c:
        node = c.nodes["n0-0-0"]
        client = c.client()
        status = client.status()
        limit = status["max_message_size"]
        per_token = 8 * HIDDEN + 8
        rows["max_message_size_mb"] = limit / 2**20
        rows["forward_tokens_per_message"] = (limit - (64 << 10)) // per_token

        # 1. a score line longer than one message holds
        text = _text(args.tokens, ends)
        start = time.perf_counter()
        remote = client.score([{"context": text, "continuation": " The end."}])[0]["logprob"]
        rows["score_tokens"] = len(ends.encode(text)) + len(ends.encode(" The end."))
        rows["score_s"] = round(time.perf_counter() - start, 1)
        rows["score_logprob"] = remote

        # 2. node peak RSS for 4k and 8k prompts (generation prefill through a session)
        from slowllm.coordinator import Sampling
        for tokens in (4096, 8192):
            Path(f"/proc/{node.pid}/clear_refs").write_text("5")  # resets the node's peak RSS (VmHWM)
            before = _rss(node.pid)
            start = time.perf_counter()
            client.generate([_text(tokens, ends)], Sampling(max_new_tokens=1))
            rows[f"prefill_{tokens}_s"] = round(time.perf_counter() - start, 1)
            rows[f"node_peak_growth_{tokens}_mb"] = round((_hwm(node.pid) - before) / 2**20)
            rows[f"node_rss_before_{tokens}_mb"] = round(before / 2**20)

        # 3. a client that goes away mid-generation
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_wire import _start_and_drop
        asyncio.run(_start_and_drop(c.url, {"prompts": ["Once upon a time"], "max_new_tokens": 200}, events=1,
                                    secret=secret.read_bytes()))
        dropped = time.perf_counter()
        while (s := client.status())["active_jobs"] or s["sessions"]:
            time.sleep(0.05)
        rows["cancel_s"] = round(time.perf_counter() - dropped, 2)

    with LocalRunner(model, dtype="bfloat16", progress=False) as local:
        rows["local_score_logprob"] = local.score([{"context": text, "continuation": " The end."}])[0]["logprob"]
    g4, g8 = rows["node_peak_growth_4096_mb"], rows["node_peak_growth_8192_mb"]
    rows["growth_ratio_8k_over_4k"] = round(g8 / max(g4, 1), 2)
    quadratic_gb = HEADS * 8192 ** 2 * 4 / 2**30
    print(f"| message limit | {rows['max_message_size_mb']:.0f} MB = {rows['forward_tokens_per_message']} tokens/forward |")
    print(f"| score {rows['score_tokens']} tokens | {rows['score_s']} s, logprob {remote:.3f} "
          f"(local {rows['local_score_logprob']:.3f}) |")
    print(f"| node peak growth 4k / 8k prompt | {g4} / {g8} MB = {rows['growth_ratio_8k_over_4k']}x "
          f"(quadratic scores alone would be {quadratic_gb:.0f} GB at 8k) |")
    print(f"| prefill 4k / 8k | {rows['prefill_4096_s']} / {rows['prefill_8192_s']} s |")
    print(f"| cancel after disconnect | {rows['cancel_s']} s |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
