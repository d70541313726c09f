"""int8 at Bloom-176B width (hidden 14336, 112 heads): quantize one block, then a node's decode step.

Uses bench/width176.py's one-block checkpoint (4.9 GB bf16, built tensor by tensor under bench/_work/),
then, each in a fresh subprocess (so peak RSS is its own):
  1. `slowllm quantize` of it: time and peak RSS (bounded: a 176B MLP matrix is quantized in 256 MB
     slices, never a block's floats in RAM at once),
  2. one scoring pass of a 13-token line streamed from a cold page cache (`--local --max-ram 12GB`):
     at this width the pass is the disk read, so int8 should take about half the time,
  3. the block resident as a node holds it (`ResidentBlocks`, bf16 compute), bf16 original vs int8
     copy: RSS, and decode steps of one token with 512 cached positions (ms/step, best of 5, in-place KV
     cache), and how far the int8 block's output strays from the original's (relative L2 per position).

    python bench/int8_176.py

Prints a table and one JSON line; the int8 figures are also ratios to the bf16 ones from the same run.
Needs ~10 GB of RAM and ~8 GB of disk under bench/_work/.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from width176 import WORK, build  # noqa: E402

INT8 = WORK.parent / "width176-int8"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_quantize() -> dict:
    from slowllm.node.engine._quantize import quantize_checkpoint

    start = time.perf_counter()
    quantize_checkpoint(WORK, INT8, progress=False)
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}


def child_decode(model: str) -> dict:
    import torch

    from slowllm.node import BlockCache, Checkpoint
    from slowllm.node.engine._resident import ResidentBlocks

    blocks = ResidentBlocks(Checkpoint(model), 0, 0, torch.bfloat16)
    loaded = peak_rss()
    g = torch.Generator().manual_seed(0)
    h = blocks.config.hidden_size
    prompt = torch.randn(1, 512, h, generator=g)
    caches = {0: BlockCache()}
    blocks.forward(prompt, torch.ones(1, 512, dtype=torch.long), 0, 0, caches)
    times, outs = [], []
    for i in range(6):
        x = torch.randn(1, 1, h, generator=g)
        start = time.perf_counter()
        outs.append(blocks.forward(x, torch.ones(1, 513 + i, dtype=torch.long), 0, 0, caches))
        times.append(time.perf_counter() - start)
    torch.save(torch.cat(outs, 1), WORK.parent / f"int8_176_{Path(model).name}.pt")
    return {"step_ms": min(times[1:]) * 1000, "rss_loaded": loaded, "peak_rss": peak_rss()}


def child_pass(model: str) -> dict:
    from local import evict

    evict(Path(model))
    from slowllm.coordinator import LocalRunner

    with LocalRunner(model, dtype="bfloat16", max_ram="12GB", progress=False) as r:
        evict(Path(model))
        start = time.perf_counter()
        r.score([{"context": "Is the sky blue? The answer", "continuation": " is yes."}])
        return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--quantize":
        print(json.dumps(child_quantize()))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--pass":
        print(json.dumps(child_pass(sys.argv[2])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--decode":
        print(json.dumps(child_decode(sys.argv[2])))
        return
    import torch

    build(WORK)
    quant = run("--quantize") if not (INT8 / "config.json").exists() else {"seconds": float("nan"), "peak_rss": 0}
    passes = {"bf16": [], "int8": []}
    for _ in range(2):
        passes["bf16"].append(run("--pass", str(WORK))["seconds"])
        passes["int8"].append(run("--pass", str(INT8))["seconds"])
    cold = {k: min(v) for k, v in passes.items()}
    bf16 = run("--decode", str(WORK))
    int8 = run("--decode", str(INT8))
    a = torch.load(WORK.parent / f"int8_176_{WORK.name}.pt").float()
    b = torch.load(WORK.parent / f"int8_176_{INT8.name}.pt").float()
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item()
    gb = lambda n: n / 2**30  # noqa: E731
    print(f"quantize one 176B-width block: {quant['seconds']:.1f} s, peak RSS {gb(quant['peak_rss']):.2f} GB")
    print(f"{'block':<6} {'cold pass':>10} {'RSS loaded':>11} {'decode step':>12}")
    for name, r in (("bf16", bf16), ("int8", int8)):
        print(f"{name:<6} {cold[name]:>9.2f}s {gb(r['rss_loaded']):>10.2f}G {r['step_ms']:>10.1f}ms")
    print(f"int8 / bf16: cold pass {cold['int8'] / cold['bf16']:.2f}x, RSS {int8['rss_loaded'] / bf16['rss_loaded']:.2f}x, step {int8['step_ms'] / bf16['step_ms']:.2f}x; "
          f"output differs by {rel:.4f} (relative L2, worst position)")
    print(json.dumps({"bench": "int8_176", "quantize": quant, "bf16": bf16, "int8": int8, "max_rel_diff": rel, "cold_pass_s": cold,
                      "cold_pass_ratio": cold["int8"] / cold["bf16"],
                      "rss_ratio": int8["rss_loaded"] / bf16["rss_loaded"], "step_ratio": int8["step_ms"] / bf16["step_ms"]}))


if __name__ == "__main__":
    main()
