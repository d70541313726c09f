"""One check at real width for the GPT-NeoX and Llama families: GPT-NeoX-20B and Llama-3.1-70B blocks.

For each family, builds a checkpoint of ONE block at the real model's width (GPT-NeoX-20B: hidden 6144,
64 heads, rotary on a quarter of each head, 0.9 GB in bf16; Llama-3.1-70B: hidden 8192, 64 heads over 8
KV heads, SwiGLU 28672, 1.7 GB), tensor by tensor into safetensors in row slices (never a whole block in
RAM, never committed: bench/_work/), with a small vocabulary so the ends stay small (the LM head at full
vocabulary is family-independent and measured at Bloom's 250880 elsewhere). Then, in one run:
  1. fidelity: a 600-token line scored by slowllm (fp32 and bf16 blocks) vs transformers' own
     `*ForCausalLM` in fp32 on the same checkpoint,
  2. a cold streaming pass (`--local`, page cache evicted) vs the cold read of the block with slowllm's number of readers
     (the IO floor),
  3. decode ms/token of the resident block: slowllm bf16 and int8 (`slowllm quantize`) vs transformers'
     eager bf16 layer,
  4. a node's KV cache at this width, through a real coordinator and node: its peak RSS growth for a
     4,000-token prompt beside the cache's bytes (Llama's GQA caches 8 KV heads of 64: 1/8 of the bytes
     full attention would).

    python bench/width_families.py [--family gpt_neox llama] [--tokens 600]

Prints a table and one JSON line; ~5 minutes and ~10 GB of RAM on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _read import read_files  # noqa: E402
from width176 import _hwm, _rss, _text, _write_safetensors  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "width-families"
VOCAB = 384
SHAPES = {  # the real models' widths
    "gpt_neox": dict(hidden=6144, n_head=64, intermediate_size=24576, name="gpt-neox-20b"),
    "llama": dict(hidden=8192, n_head=64, num_key_value_heads=8, intermediate_size=28672, name="llama-3.1-70b"),
}


def build(family: str) -> Path:
    from slowllm.coordinator.demo._tiny import tiny_config, train_tokenizer
    from slowllm.node.engine._families import FAMILIES, layer_shapes

    shape = dict(SHAPES[family])
    path = WORK / f"{shape.pop('name')}-1block"
    if (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    hidden, heads = shape.pop("hidden"), shape.pop("n_head")
    config = tiny_config(n_layer=1, hidden=hidden, n_head=heads, vocab_size=VOCAB, std=0.02, family=family, **shape)
    config.torch_dtype = "bfloat16"
    config.save_pretrained(path)
    train_tokenizer(VOCAB).save(str(path / "tokenizer.json"))
    fam = FAMILIES[family]
    # norms at 1, biases and weights small: what trained models look like to the arithmetic
    block = {fam.stored(fam.block_prefix(0) + name): (s, 0 if "norm" in name and name.endswith("weight") else
                                                      (0.02 if len(s) == 2 else 0.01))
             for name, s, _ in layer_shapes(config)}
    ends = {fam.stored(fam.embedding): ((VOCAB, hidden), 0.5), fam.stored(fam.head): ((VOCAB, hidden), 0.02)}
    ends.update({fam.stored(k): ((hidden,), 0 if k.endswith("weight") else 0.01) for k in fam.final_norm})
    _write_safetensors(path / "ends.safetensors", ends, seed=1)
    _write_safetensors(path / "block-0.safetensors", block, seed=2)
    weight_map = {**{k: "ends.safetensors" for k in ends}, **{k: "block-0.safetensors" for k in block}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def evict(path: Path) -> None:
    for f in path.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def in_subprocess(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def fidelity(model: Path, text: str) -> dict:
    return in_subprocess(f"""
import json, torch
from transformers import AutoModelForCausalLM
from slowllm.coordinator import LocalRunner
req = [{{"context": {text!r}, "continuation": " The end."}}]
out = {{}}
for dtype in ("float32", "bfloat16"):
    with LocalRunner({str(model)!r}, dtype=dtype, keep_in_ram=True) as r:
        out[dtype] = r.score(req)[0]["logprob"]
        ids = r.ends.encode_prompt(req[0]["context"]) + r.ends.encode(" The end.")
        cont = len(r.ends.encode(" The end."))
ref = AutoModelForCausalLM.from_pretrained({str(model)!r}, dtype=torch.float32).eval()
with torch.no_grad():
    lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
n = len(ids)
out["transformers_fp32"] = sum(lp[n - cont - 1 + i, ids[n - cont + i]].item() for i in range(cont))
out["tokens"] = n
print(json.dumps(out))
""")


def cold_pass(model: Path) -> dict:
    evict(model)
    start = time.perf_counter()
    read_files(sorted(model.glob("*.safetensors")))  # with slowllm's number of readers: a fair floor
    read = time.perf_counter() - start
    evict(model)
    got = in_subprocess(f"""
import json, time
from slowllm.coordinator import LocalRunner
with LocalRunner({str(model)!r}, dtype="bfloat16", progress=False, max_ram="8GB") as r:
    start = time.perf_counter()
    r.score([{{"context": "Is the sky blue? The answer", "continuation": " is yes."}}])
    s = time.perf_counter() - start
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]
print(json.dumps({{"pass_s": s, "peak_rss": int(hwm) * 1024}}))
""")
    return {"read_s": read, **got}


def decode(model: Path, int8: Path) -> dict:
    return in_subprocess(f"""
import json, time, torch
from transformers import AutoModelForCausalLM
from slowllm.coordinator import LocalRunner, Sampling
prompt, n = "Once upon a time there was a researcher", 17
def per_token(fn):
    fn(1); start = time.perf_counter(); fn(n); long = time.perf_counter() - start
    start = time.perf_counter(); fn(1); return (long - (time.perf_counter() - start)) / (n - 1) * 1000
out = {{}}
for name, path in (("slowllm_bf16", {str(model)!r}), ("slowllm_int8", {str(int8)!r})):
    with LocalRunner(path, dtype="bfloat16", keep_in_ram=True) as r:
        ids = r.ends.encode_prompt(prompt)
        out[name] = per_token(lambda k: r.generate([prompt], Sampling(max_new_tokens=k)))
hf = AutoModelForCausalLM.from_pretrained({str(model)!r}, dtype=torch.bfloat16, attn_implementation="eager").eval()
x = torch.tensor([ids])
out["transformers_eager_bf16"] = per_token(lambda k: hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                                                   pad_token_id=3))
print(json.dumps(out))
""")


def node_kv(model: Path, tokens: int) -> dict:
    from netutil import Cluster

    from slowllm.coordinator import Sampling
    from slowllm.coordinator.jobs._ends import ModelEnds
    from slowllm.node import Checkpoint
    from slowllm.node.engine._families import kv_width

    ck = Checkpoint(model)
    ends = ModelEnds(ck)
    secret = WORK / "secret.txt"
    secret.write_text("width-families-bench-secret-0123456789")
    with Cluster(model, ["0-0"], timeout=600, secret_file=secret, node_args=("--dtype", "bfloat16")) as c:
        node = c.nodes["n0-0-0"]
        client = c.client()
        client.generate(["warm up"], Sampling(max_new_tokens=2))
        Path(f"/proc/{node.pid}/clear_refs").write_text("5")
        before = _rss(node.pid)
        text = _text(tokens, ends)
        n = len(ends.encode_prompt(text))
        start = time.perf_counter()
        client.generate([text], Sampling(max_new_tokens=1))
        prefill = time.perf_counter() - start
        growth = _hwm(node.pid) - before
    kv = 2 * kv_width(ck.config) * 2  # keys and values, bf16, one block
    full = 2 * ck.config.hidden_size * 2
    return {"prompt_tokens": n, "prefill_s": prefill, "node_peak_growth_mb": growth / 2**20,
            "kv_bytes_per_token": kv, "full_attention_kv_bytes_per_token": full,
            "kv_cache_mb": n * kv / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--kv-tokens", type=int, default=4000)
    args = parser.parse_args()
    from slowllm.coordinator.jobs._ends import ModelEnds
    from slowllm.node import Checkpoint
    from slowllm.node.engine._quantize import quantize_checkpoint

    results = {}
    for family in args.family:
        t0 = time.perf_counter()
        model = build(family)
        int8 = model.with_name(model.name + "-int8")
        if not (int8 / "config.json").is_file():
            shutil.rmtree(int8, ignore_errors=True)
            quantize_checkpoint(model, int8, progress=False)
        ck = Checkpoint(model)
        block_gb = ck.block_nbytes() / 2**30
        print(f"{family}: 1 block of hidden {ck.hidden_size}, {block_gb:.2f} GB bf16 "
              f"({time.perf_counter() - t0:.0f} s to build and quantize)", flush=True)
        text = _text(args.tokens, ModelEnds(ck))
        r = {"block_gb": block_gb, "int8_block_gb": Checkpoint(int8).block_nbytes() / 2**30}
        r["fidelity"] = fidelity(model, text)
        r["cold"] = cold_pass(model)
        r["decode_ms"] = decode(model, int8)
        r["node"] = node_kv(model, args.kv_tokens)
        results[family] = r
        f, c, d, n = r["fidelity"], r["cold"], r["decode_ms"], r["node"]
        ref = f["transformers_fp32"]
        print(f"| {family} | fidelity over {f['tokens']} tokens: fp32 {f['float32'] - ref:+.2e}, bf16 "
              f"{f['bfloat16'] - ref:+.3f} (logprob {ref:.3f}) |")
        print(f"| {family} | cold pass {c['pass_s']:.2f} s = {c['pass_s'] / c['read_s']:.2f}x the cold read "
              f"({c['read_s']:.2f} s), peak RSS {c['peak_rss'] / 2**30:.2f} GB = "
              f"{c['peak_rss'] / (ck.block_nbytes()):.2f}x one block |")
        print(f"| {family} | decode ms/token: transformers eager bf16 {d['transformers_eager_bf16']:.0f}, slowllm bf16 "
              f"{d['slowllm_bf16']:.0f} ({d['transformers_eager_bf16'] / d['slowllm_bf16']:.2f}x), int8 "
              f"{d['slowllm_int8']:.0f} ({d['transformers_eager_bf16'] / d['slowllm_int8']:.2f}x) |")
        print(f"| {family} | node, {n['prompt_tokens']}-token prompt: peak growth {n['node_peak_growth_mb']:.0f} MB, "
              f"KV {n['kv_bytes_per_token']} B/token/block ({n['kv_bytes_per_token'] / n['full_attention_kv_bytes_per_token']:.3f}x"
              f" full attention's) = {n['kv_cache_mb']:.0f} MB, prefill {n['prefill_s']:.1f} s |", flush=True)
    print(json.dumps({"bench": "width-families", **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
