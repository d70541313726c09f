"""Local streaming benchmark: one scoring pass and generation, side by side with the baselines.

    python bench/local.py [--family bloom|gpt_neox|llama] [--n-layer 24] [--repeat 3] [--dtype float32 bfloat16]

Creates (once, under bench/_work/) a random checkpoint of the family at a ~1.5B shape (bloom: bloom-1b7,
hidden 2048, vocab 250880; gpt_neox: pythia-1.4b, vocab 50304; llama: Llama-3.2-1B's widths, 32 heads over
8 KV heads, vocab 128256), bf16, sharded safetensors, --n-layer blocks, then times, each in a fresh subprocess (so peak RSS is its
own), 8 prompts x 32 tokens:
  (a) slowllm local score pass, page cache evicted (cold) and warm
  (b) the same job with every block already in RAM (transformers' model of the family: the compute limit)
  (c) cold sequential read of the checkpoint files (the IO limit)
  (d) accelerate disk offload of the same checkpoint
  (e) naive streaming: load each block's shard, convert, compute, no overlap
and generation of 16 tokens for 1 and for 8 prompts. Prints a table and one JSON line; every figure is
also given as a ratio to a baseline measured in the same run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).parent / "_work"
PROMPT = "Once upon a time there was a researcher without a cluster who read every block "


def evict(model: Path) -> None:
    for f in model.rglob("*"):
        if not f.is_file():
            continue
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


SHAPES = {  # family: (checkpoint folder name, tiny_config arguments at hidden 2048)
    "bloom": ("bloom-1b7-shaped", dict(n_head=16, vocab_size=250880)),
    "gpt_neox": ("pythia-1b4-shaped", dict(n_head=16, vocab_size=50304, intermediate_size=8192)),
    "llama": ("llama-1b-shaped", dict(n_head=32, vocab_size=128256, num_key_value_heads=8, intermediate_size=8192)),
}


def make_model(n_layer: int, family: str = "bloom") -> Path:
    import torch
    from slowllm.coordinator import make_checkpoint, tiny_config

    name, shape = SHAPES[family]
    path = WORK / f"{name}-{n_layer}"
    if not (path / "config.json").exists():
        cfg = tiny_config(n_layer=n_layer, hidden=2048, std=0.02, family=family, **shape)
        make_checkpoint(path, cfg, dtype=torch.bfloat16)
    return path


def requests(ends) -> list[dict]:
    out = []
    for i in range(8):  # 8 prompts x 32 tokens
        ids = (ends.encode(f"{i} " + PROMPT * 4))[:32]
        out.append({"context": ends.decode(ids[:24]), "continuation": ends.decode(ids[24:])})
    return out


def one(kind: str, model: Path, dtype_name: str) -> dict:
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    if kind == "baseline":  # the interpreter with every library the jobs import, before any model memory
        import transformers  # noqa: F401 (imported for its memory, like the jobs)
        from slowllm.coordinator.chains import _local  # noqa: F401 (the blocks' modules, which LocalRunner imports)
    elif kind == "read":  # with slowllm's number of readers (_read.py)
        from _read import read_files
        read_files(sorted(model.glob("*.safetensors")))
    elif kind in ("slowllm", "short", "gen1", "gen8"):
        from slowllm.coordinator import LocalRunner, Sampling

        # The clock runs from before LocalRunner: loading the model's ends reads the embedding cold, and
        # the read baseline counts those bytes too (starting after it made the ratio optimistic). The
        # modules LocalRunner imports (transformers' blocks, ~3 s on 2 cores) are imported first: the
        # read baseline pays no imports either.
        from slowllm.coordinator.chains import _local  # noqa: F401
        start = time.perf_counter()
        with LocalRunner(model, dtype=dtype_name, progress=False) as r:
            if kind == "slowllm":
                r.score(requests(r.ends))
            elif kind == "short":  # one 13-token line: the pass is the disk read, compute is small
                r.score([{"context": "Is the sky blue? The answer", "continuation": " is yes."}])
            else:
                n = 1 if kind == "gen1" else 8
                r.generate([f"{i} {PROMPT}" for i in range(n)], Sampling(max_new_tokens=16))
    elif kind in ("inram", "naive", "accelerate"):
        from transformers import AutoConfig, AutoModelForCausalLM

        from slowllm.node import Checkpoint
        from slowllm.coordinator.jobs._ends import ModelEnds

        ck = Checkpoint(model)
        family = ck.family
        ends = ModelEnds(ck)
        reqs = requests(ends)
        rows = [ends.encode_prompt(q["context"]) + ends.encode(q["continuation"]) for q in reqs]
        width = max(map(len, rows))
        ids = torch.tensor([[3] * (width - len(x)) + x for x in rows])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(x) for x in rows])[:, None]).long()
        if kind == "inram":
            m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
            start = time.perf_counter()
        elif kind == "accelerate":
            from accelerate import init_empty_weights, load_checkpoint_and_dispatch

            with init_empty_weights():
                m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).to(dtype)
            m.tie_weights()  # Bloom's checkpoint has no lm_head: it is the embedding
            base = family.prefix.rstrip(".")
            # the blocks on disk, everything else (embeddings, norms, rotary, head) in RAM
            dmap = {f"{base}.{name}": "disk" if name == family.layers else "cpu"
                    for name, _ in m.get_submodule(base).named_children()}
            dmap.update({name: "cpu" for name, _ in m.named_children() if name != base})
            if family.name == "bloom":  # (as measured before families existed)
                m = load_checkpoint_and_dispatch(m, str(model), device_map=dmap, offload_folder=str(WORK / "offload"),
                                                 dtype=dtype).eval()
            else:  # transformers 5 renames some tensors on load (GPT-NeoX's embed_out is its lm_head)
                m = AutoModelForCausalLM.from_pretrained(model, device_map=dmap, offload_folder=str(WORK / "offload"),
                                                         dtype=dtype).eval()
            evict(WORK / "offload")  # its offload files were just written: make this pass cold too
            evict(model)  # (transformers 5 offloads to the checkpoint's own files, just read while loading)
            start = time.perf_counter()
        if kind == "naive":
            from safetensors.torch import load_file
            from slowllm.node import attention_inputs, new_block, run_block

            start = time.perf_counter()
            with torch.no_grad():
                h = ends.embed_norm(ends.embed(ids)).to(dtype)
                attn = attention_inputs(ck.config, mask, width, dtype)
                for layer in range(ck.n_layer):
                    state = {}
                    for shard in {ck.weight_map[k][0] for k in ck.layer_keys(layer)}:  # whole shards, as naive code does
                        state.update(load_file(str(model / shard)))
                    block = new_block(ck.config, dtype)
                    marker = family.block_prefix(layer)
                    block.load_state_dict({k.split(marker, 1)[1]: v.to(dtype) for k, v in state.items()
                                           if marker in k})
                    h = run_block(block, h, attn)
                    del state, block
                ends.logits(ends.final_norm(h[:, -8:].reshape(-1, h.shape[-1])))
        else:
            with torch.no_grad():
                m(input_ids=ids, attention_mask=mask, logits_to_keep=9)
    seconds = time.perf_counter() - start
    # VmHWM is this process's own peak (ru_maxrss would inherit the parent's across fork)
    hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]
    return {"seconds": seconds, "peak_rss": int(hwm) * 1024}


def measure(kind: str, model: Path, dtype: str, cold: bool, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        if cold:
            evict(model)
        proc = subprocess.run([sys.executable, __file__, "--one", kind, "--model", str(model), "--dtype", dtype],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seconds": statistics.median(r["seconds"] for r in runs), "peak_rss": max(r["peak_rss"] for r in runs)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="bloom", choices=sorted(SHAPES))
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--int8", action="store_true", help="only: cold streaming pass of the int8 copy vs the original")
    p.add_argument("--one")
    p.add_argument("--model")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, Path(args.model), args.dtype[0])))
        return
    model = make_model(args.n_layer, args.family)
    if args.int8:
        return int8_pass(model, args.repeat)
    rows, out = [], {"family": args.family, "n_layer": args.n_layer, "model_gb": sum(f.stat().st_size for f in model.iterdir()) / 2**30}
    read = measure("read", model, "float32", True, args.repeat)
    out["cold_read_s"] = read["seconds"]
    # The RSS target of the issue: model ends + 2 blocks + activations, over the bare interpreter.
    from slowllm.node import Checkpoint
    ck = Checkpoint(model)
    baseline = measure("baseline", model, "float32", False, 1)["peak_rss"]
    for dtype in args.dtype:
        r = {}
        r["slowllm_cold"] = measure("slowllm", model, dtype, True, args.repeat)
        r["slowllm_warm"] = measure("slowllm", model, dtype, False, args.repeat)
        r["inram"] = measure("inram", model, dtype, False, args.repeat)
        r["naive_cold"] = measure("naive", model, dtype, True, args.repeat)
        r["accelerate_cold"] = measure("accelerate", model, dtype, True, args.repeat)
        r["gen1"] = measure("gen1", model, dtype, False, args.repeat)
        r["gen8"] = measure("gen8", model, dtype, False, args.repeat)
        limit = max(r["inram"].get("seconds", 0), read["seconds"])
        itemsize = 4 if dtype == "float32" else 2
        target = (baseline + ck.nbytes(list({ck.embedding_key, ck.head_key})) + 2 * ck.nbytes(ck.layer_keys(0)) // 2 * itemsize
                  + 8 * 32 * ck.hidden_size * itemsize * 40)  # hidden states and one block's intermediates
        out.setdefault("rss_target", {})[dtype] = target
        for name, v in r.items():
            if "error" in v:
                rows.append((dtype, name, "failed: " + v["error"][:60], "", ""))
                continue
            ratio = v["seconds"] / limit if not name.startswith("gen") else v["seconds"] / r["gen1"]["seconds"]
            base = "max(in-RAM, cold read)" if not name.startswith("gen") else "gen1"
            rows.append((dtype, name, f"{v['seconds']:.2f} s", f"{ratio:.2f} x {base}",
                         f"{v['peak_rss'] / 2**30:.2f} GB = {v['peak_rss'] / target:.2f} x target"))
        out[dtype] = {k: v for k, v in r.items()}
        out[dtype]["limit_s"] = limit
        for key in ("cold", "warm"):
            out[dtype][f"slowllm_{key}_vs_limit"] = r[f"slowllm_{key}"]["seconds"] / limit
        if "seconds" in r["accelerate_cold"]:
            out[dtype]["slowllm_cold_vs_accelerate_cold"] = r["slowllm_cold"]["seconds"] / r["accelerate_cold"]["seconds"]
        if "seconds" in r["naive_cold"]:
            out[dtype]["slowllm_cold_vs_naive_cold"] = r["slowllm_cold"]["seconds"] / r["naive_cold"]["seconds"]
        out[dtype]["gen8_vs_gen1"] = r["gen8"]["seconds"] / r["gen1"]["seconds"]
    print(f"{'dtype':<9} {'run':<16} {'time':>9}  {'ratio':<32} peak RSS")
    for row in rows:
        print(f"{row[0]:<9} {row[1]:<16} {row[2]:>9}  {row[3]:<32} {row[4]}")
    print(json.dumps(out))


def int8_pass(model: Path, repeat: int) -> None:
    """One scoring pass streamed from a cold page cache, bf16 compute, for one 13-token line (the read is
    the pass) and for 8 x 32 tokens (compute weighs in): the `slowllm quantize` copy against the
    original, interleaved, plus the cold read of each (the IO floor)."""
    from slowllm.node.engine._quantize import quantize_checkpoint

    int8 = WORK / (model.name + "-int8")
    if not (int8 / "config.json").exists():
        quantize_checkpoint(model, int8)
    runs: dict[str, list[float]] = {}
    for _ in range(repeat):
        for name, path in (("bf16", model), ("int8", int8)):
            runs.setdefault(f"{name}_short", []).append(measure("short", path, "bfloat16", True, 1)["seconds"])
            runs.setdefault(f"{name}_pass", []).append(measure("slowllm", path, "bfloat16", True, 1)["seconds"])
            runs.setdefault(f"{name}_read", []).append(measure("read", path, "bfloat16", True, 1)["seconds"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    gb = {name: sum(f.stat().st_size for f in path.iterdir()) / 2**30 for name, path in (("bf16", model), ("int8", int8))}
    print(f"{'checkpoint':<11} {'GB':>6} {'cold pass 1x13':>15} {'cold pass 8x32':>15} {'cold read':>10}")
    for name in ("bf16", "int8"):
        print(f"{name:<11} {gb[name]:>6.2f} {med[name + '_short']:>14.2f}s {med[name + '_pass']:>14.2f}s "
              f"{med[name + '_read']:>9.2f}s")
    short, full = med["int8_short"] / med["bf16_short"], med["int8_pass"] / med["bf16_pass"]
    print(f"int8 cold pass = {short:.2f}x the bf16 checkpoint's for 1 x 13 tokens, {full:.2f}x for 8 x 32 "
          f"(bytes: {gb['int8'] / gb['bf16']:.2f}x)")
    print(json.dumps({"bench": "local-int8", **{k: round(v, 2) for k, v in med.items()}, "gb": gb,
                      "int8_short_vs_bf16": round(short, 3), "int8_pass_vs_bf16": round(full, 3)}))


if __name__ == "__main__":
    main()
