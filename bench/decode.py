"""Decode speed with every block in RAM: transformers eager bf16 vs slowllm bf16 vs slowllm int8.

    python bench/decode.py [--n-layer 24] [--tokens 32] [--repeat 3] [--prompts 1 8]

A bloom-1b7-shaped random checkpoint (hidden 2048, vocab 250880, bf16; made once under bench/_work/, as
bench/local.py does) and its `slowllm quantize` int8 copy. Each engine runs in a fresh subprocess (so
neither inherits the other's memory or threads), loads once, and times generation of 1 and of 1+N new
tokens, greedy, for 1 and for 8 prompts: decode ms/token = (t(1+N) - t(1)) / N, the prompt pass
excluded. Engines alternate across repeats and the median is kept. Prints a table and one JSON line;
the speed-ups are ratios to transformers' time measured in the same run (the machine is shared).
  hf          BloomForCausalLM.generate, bf16, eager (what transformers users get)
  slowllm     LocalRunner(keep_in_ram=True, dtype=bfloat16): `slowllm generate --local --keep-in-ram`
  slowllm8    the same on the int8 checkpoint
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from local import WORK, make_model  # noqa: E402

PROMPT = "Once upon a time there was a researcher without a cluster who read every block"


def make_int8(model: Path) -> Path:
    out = WORK / (model.name + "-int8")
    if not (out / "config.json").exists():
        from slowllm.node._quantize import quantize_checkpoint
        quantize_checkpoint(model, out)
    return out


def prompts(n: int) -> list[str]:
    return [f"{i} {PROMPT}"[: 20 + 7 * i] for i in range(n)]  # different lengths: left padding


def child(engine: str, model: str, n_prompts: int, tokens: int) -> dict:
    import torch

    from slowllm.node import Checkpoint

    texts = prompts(n_prompts)
    if engine == "hf":
        from tokenizers import Tokenizer
        from transformers import BloomForCausalLM

        tok = Tokenizer.from_file(str(Checkpoint(model).tokenizer_path()))
        ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([[3] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        hf = BloomForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()

        def run(n: int) -> int:
            with torch.no_grad():
                out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=3)
            return out.shape[1] - width
    else:
        from slowllm.coordinator import LocalRunner
        from slowllm.coordinator import Sampling

        runner = LocalRunner(model, dtype="bfloat16", keep_in_ram=True, progress=False)

        def run(n: int) -> int:
            out = runner.generate(texts, Sampling(n, 0.0, None, None, None))
            return min(len(r["token_ids"]) for r in out)

    run(2)  # warm-up: first-call allocations, oneDNN primitive creation
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    made = run(1 + tokens)
    t2 = time.perf_counter()
    return {"ms_per_token": ((t2 - t1) - (t1 - t0)) / tokens * 1000, "generated": made}


def measure(engine: str, model: Path, n_prompts: int, tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", engine, str(model), str(n_prompts), str(tokens)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, model, n_prompts, tokens = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(child(engine, model, n_prompts, tokens)))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--engines", nargs="+", default=["hf", "slowllm", "slowllm8"])
    args = ap.parse_args()
    model = make_model(args.n_layer)
    paths = {"hf": model, "slowllm": model, "slowllm8": make_int8(model)}
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeat):
        for n in args.prompts:
            for engine in args.engines:
                r = measure(engine, paths[engine], n, args.tokens)
                if r["generated"] < 1 + args.tokens:
                    print(f"warning: {engine} stopped at {r['generated']} tokens (EOS)", file=sys.stderr)
                results.setdefault(f"{n}", {}).setdefault(engine, []).append(r["ms_per_token"])
                print(f"  {engine:9s} {n} prompt(s): {r['ms_per_token']:.1f} ms/token", file=sys.stderr, flush=True)
    summary = {}
    print(f"\ndecode, bloom-1b7 shape ({args.n_layer} blocks), {args.tokens} tokens, median of {args.repeat}")
    print(f"{'prompts':>8} {'engine':>10} {'ms/token':>9} {'speed-up vs hf':>15}")
    for n, by_engine in results.items():
        base = statistics.median(by_engine["hf"]) if "hf" in by_engine else None
        for engine, values in by_engine.items():
            ms = statistics.median(values)
            ratio = base / ms if base else float("nan")
            summary[f"{engine}_{n}p_ms"] = round(ms, 1)
            summary[f"{engine}_{n}p_speedup"] = round(ratio, 2)
            print(f"{n:>8} {engine:>10} {ms:>9.1f} {ratio:>14.2f}x")
    print(json.dumps({"bench": "decode", "n_layer": args.n_layer, "tokens": args.tokens, **summary}))


if __name__ == "__main__":
    main()
