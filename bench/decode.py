"""Decode speed with every block in RAM, against the memory floor, per kernel build, idle and busy.

    python bench/decode.py [--n-layer 24] [--tokens 16] [--repeat 2] [--inner 3] [--prompts 1 8] [--context 0]
                           [--isa avx512bf16 avx2] [--engines hf slowllm slowllm8 slowllm16] [--neighbour]
                           [--prefetch ahead own]

A bloom-1b7-shaped random checkpoint (hidden 2048, vocab 250880, bf16; made once under bench/_work/, as
bench/local.py does) and its `slowllm quantize` int8 copy. Each engine runs in a fresh subprocess, loads
once and generates 1+N new tokens for each prompt count in turn, greedy, `--inner` turns (so the "x 1p"
column, each count's step over one prompt's, compares steps of the same minutes). Decode ms/token is the
time from the first new token to the last over N, each token timed as it comes (slowllm's per-token
callback, transformers' streamer), so the prompt pass is not in it (8 prompts' prompt pass on the AVX2
path takes 3.0-4.7 s from one generation to the next: differencing whole generations of 1 and 1+16
tokens moved the result by up to 60 ms/token).
  hf        BloomForCausalLM.generate, bf16, eager (what transformers users get)
  slowllm   LocalRunner(keep_in_ram=True) with no dtype asked: what `slowllm generate --local
            --keep-in-ram` gives a bf16 checkpoint by default (bf16 where the CPU computes it natively,
            else fp32 activations on the bf16 weights; each run's progress line says which)
  slowllm8  the same on the int8 checkpoint
  slowllm16 `--dtype bfloat16` asked: bf16 activations and KV caches everywhere (on an AVX2 PC the
            start-up line offers it to halve the KV caches; where the CPU computes bf16 natively it is
            what slowllm runs anyway); not run unless named
Per ISA (`SLOWLLM_ISA`): `avx2` and `avx2vnni` also cap PyTorch, oneDNN and MKL at AVX2
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), for every engine: an AVX2-only PC
(without or with AVX-VNNI) on this machine.

The memory floor of a token is the bytes of weights it must read (every block's linears and the LM
head, in the stored dtype) divided by the read bandwidth measured here (torch's sum over 2 GB of bf16,
best of 5, all threads), read by the same process just before and just after each timed generation, their
mean: a shared VM's bandwidth moved 30-60 GB/s within minutes (one reading at the start put runs measured
later at the wrong floor; readings before and after each process, half a minute of loading apart, still
missed turns). A row's "x floor" is the median of its generations' own ratios. "x read" is the same
against memory read the way the kernels read weights (`read_bytes`: 64 bytes a step, lines asked ahead
and not, the faster), read around each generation too: where the prefetchers stop at every page (Intel),
torch's sum reads slower than the kernels themselves (21 against 26-29 GB/s measured), and only this is a
floor. --prefetch runs slowllm's engines once per way the kernels' runs ask for weights (SLOWLLM_PREFETCH;
with `ahead` tiles of several rows take runs too, with `own` adjacent rows), each a row
("avx2/ahead", "avx2/own"; transformers once per build). slowllm's rows also say
where the step goes (ms per step, medians): "kernels", the block linears' and the head's kernel calls
timed inside the decode steps; "alone", the same products timed back to back right after each generation
(what the step's kernels cost without the rest around them: the difference is their slowdown inside the
step, caches and threads gone cold); and the rest of the step, split by PyTorch's profiler (one
generation per prompt count, after the timed ones) into "attn" (attention's own ops: scores, softmax,
weighted values; the products in slowllm's attention kernel where it runs them, timed per call), "ops" (the block's other PyTorch ops: norms, GELU, residual adds, KV cache writes,
views and copies) and "python" (what is left: Python and framework overhead per module and op, and the
profiler's view of it). The JSON line has each part. Where PyTorch's kernels run (`--isa none`) there is
no "kernels" figure (nan) and the linears' PyTorch ops land in "ops".
--neighbour repeats everything with a CPU-bound process beside it (one busy core, as a volunteer's PC
has) and reports busy/idle per engine. Prints a table and one JSON line; every speed-up is a ratio to
a baseline measured in the same run (the machine is shared).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from local import WORK, make_model  # noqa: E402

PROMPT = "Once upon a time there was a researcher without a cluster who read every block"
AVX2_PC = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def make_int8(model: Path) -> Path:
    out = WORK / (model.name + "-int8")
    if not (out / "config.json").exists():
        from slowllm.node.engine._quantize import quantize_checkpoint
        quantize_checkpoint(model, out)
    return out


def prompts(n: int, context: int = 0) -> list[str]:
    """n prompts of different lengths (left padding); with `context`, each ~that many tokens longer."""
    words = "".join(f"w{j} " for j in range(context // 2))  # (~2 tokens per word here)
    return [f"{words}{i} {PROMPT}"[: len(words) + 20 + 7 * i] for i in range(n)]


@functools.cache
def _read_buffer():
    """2 GB of bf16, made once per process (a fresh one would cost its page faults first)."""
    import torch

    return torch.ones(1 << 30, dtype=torch.bfloat16)


def bandwidth() -> float:
    """The issue's read bandwidth: torch's sum over 2 GB of bf16, best of 5, GB/s."""
    big = _read_buffer()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    return big.numel() * 2 / best / 1e9


def row_label(isa: str, prefetch: str | None) -> str:
    """A result row's build: "avx2", or "avx2/ahead" where --prefetch names the way its runs ask for weights
    (transformers' rows take the first mode's label: measured once per build)."""
    return isa if prefetch is None else f"{isa}/{prefetch}"


def read_speed() -> float:
    """The same 2 GB read as the kernels read weights (`read_bytes`, lines asked ahead and not, the faster),
    best of 3, GB/s; nan without the kernels. Where the prefetchers stop at every 4 KB page (Intel), torch's
    sum reads slower than this and than the kernels themselves: its floor is then no floor."""
    from slowllm.node.kernels._kernels import kernels

    k, big = kernels(), _read_buffer()
    if k is None:
        return float("nan")
    best = float("inf")
    for ahead in (True, False) * 3:
        t = time.perf_counter()
        k.read_bytes(big, ahead)
        best = min(best, time.perf_counter() - t)
    return big.numel() * 2 / best / 1e9


def child(engine: str, model: str, counts: list[int], tokens: int, context: int, inner: int) -> dict:
    """Each prompt count's decode, the counts measured in turns in this one process (so that the ratio
    of 8 prompts' step to one prompt's compares the same minutes of a shared machine)."""
    import torch

    from slowllm.node import Checkpoint

    parts = {}
    if engine == "hf":
        from tokenizers import Tokenizer
        from transformers import BloomForCausalLM
        from transformers.generation.streamers import BaseStreamer

        tok = Tokenizer.from_file(str(Checkpoint(model).tokenizer_path()))
        hf = BloomForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()

        class Stamps(BaseStreamer):  # put() once with the prompt, then once per step
            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        def runner_for(n_prompts: int):
            ids = [tok.encode(t, add_special_tokens=False).ids for t in prompts(n_prompts, context)]
            width = max(map(len, ids))
            input_ids = torch.tensor([[3] * (width - len(r)) + r for r in ids])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])

            def run(n: int) -> list[float]:
                streamer = Stamps()
                with torch.no_grad():
                    hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=3, streamer=streamer)
                return streamer.times[1:]  # (each new token's time)
            return run
    else:
        from slowllm.coordinator import LocalRunner, Sampling
        from slowllm.node.kernels._kernels import describe

        runner = LocalRunner(model, keep_in_ram=True, progress=False,
                             dtype="bfloat16" if engine == "slowllm16" else None)
        parts["dtype"] = str(runner.chain.dtype).removeprefix("torch.")
        parts["prompt_tokens"] = max(len(runner.ends.encode(t)) for t in prompts(max(counts), context))
        parts["kernels"] = describe()

        def runner_for(n_prompts: int):
            texts = prompts(n_prompts, context)

            def run(n: int, at_first=None) -> list[float]:
                times: dict[int, list[float]] = {}  # each row's new tokens' times (a row may stop at EOS)

                def on_tokens(i: int, ids: list[int]) -> None:
                    if at_first and not times:  # (the first step's tokens: the prompt pass is over)
                        at_first()
                    times.setdefault(i, []).extend([time.perf_counter()] * len(ids))
                runner.generate(texts, Sampling(n, 0.0, None, None, None), on_tokens=on_tokens)
                return max(times.values(), key=len)
            return run

    runs = {n: runner_for(n) for n in counts}
    for run in runs.values():
        run(2)  # warm-up: first-call allocations, oneDNN primitive creation
    timed = TimedKernels.install() if engine != "hf" else None  # (None too where PyTorch's kernels run)
    pairs: dict[int, list] = {n: [] for n in counts}  # per turn: (ms/token, GB/s read around it)
    reads: dict[int, list] = {n: [] for n in counts}  # per turn: GB/s read as the kernels read, around it
    parts_by_turn: dict[int, list] = {n: [] for n in counts}  # the kernels in the step, and alone right after
    made = {}
    for _ in range(inner):
        for n, run in runs.items():
            before, read_before = bandwidth(), read_speed()
            if timed:
                timed.timings.clear()
            times = run(1 + tokens)
            made[n] = len(times) - 1
            if made[n] < 1:
                raise SystemExit(f"{engine} stopped after its first token: no decode step to time")
            pairs[n].append(((times[-1] - times[0]) / made[n] * 1000, (before + bandwidth()) / 2))
            reads[n].append((read_before + read_speed()) / 2)
            if engine != "hf":  # the kernel calls between the first new token and the last: the decode steps'
                in_step = (sum(took for name, at, took in timed.timings
                                   if times[0] < at <= times[-1] and name not in ATTENTION_KERNELS) / made[n] * 1000
                           if timed else float("nan"))
                parts_by_turn[n].append({**breakdown(runner, n), "kernels_ms": in_step})
    split = {n: rest_split(run, tokens, timed) for n, run in runs.items()} if engine != "hf" else {}
    results = {}
    for n in counts:
        r = {"ms_per_token": statistics.median(ms for ms, _ in pairs[n]),
             "gbps": statistics.median(gbps for _, gbps in pairs[n]), "pairs": pairs[n], "generated": made[n],
             "reads": reads[n],
             # each turn's step against the first count's step of the same turn
             "over_first": [ms / first for (ms, _), (first, _) in zip(pairs[n], pairs[counts[0]])], **parts}
        if engine != "hf":  # each turn's own: the rest is its step less its kernel calls in it
            r["linears"] = [b["linears_ms"] for b in parts_by_turn[n]]
            r["head"] = [b["head_ms"] for b in parts_by_turn[n]]
            r["kernels_in_step"] = [b["kernels_ms"] for b in parts_by_turn[n]]
            r["rest"] = [ms - b["kernels_ms"] for (ms, _), b in zip(pairs[n], parts_by_turn[n])]
            r.update(split[n])
        results[str(n)] = r
    return results


class TimedKernels:
    """slowllm's kernel module with each call's (entry point, end time, seconds) kept in `timings`: the
    block linears' and the head's time inside the decode steps themselves, and attention's products
    (`install` puts it where every caller looks it up, `kernels()`; ~1 us per call, ~150 calls a step)."""

    def __init__(self, module):
        self._module, self.timings = module, []

    @classmethod
    def install(cls) -> "TimedKernels | None":
        from slowllm.node.kernels import _kernels

        if _kernels.kernels() is None:
            return None
        _kernels._module = cls(_kernels._module)
        return _kernels._module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr) or name == "calls":
            return attr

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = attr(*args, **kwargs)
            end = time.perf_counter()
            self.timings.append((name, end, end - t))
            return out
        return timed


# PyTorch ops of a decode step that are attention's (transformers' eager Bloom attention: scores with the
# alibi bias, softmax, weighted values), by the profiler's names
ATTENTION_OPS = {"aten::baddbmm", "aten::bmm", "aten::_softmax", "aten::softmax", "aten::matmul"}
# slowllm's kernel entry points that are attention's (its products in decode steps): "attn", not "kernels"
ATTENTION_KERNELS = {"attention_bmm", "attention_bmm_pieces"}


def rest_split(run, tokens: int, timed: "TimedKernels | None") -> dict:
    """Where the rest of a decode step goes, from PyTorch's profiler (started at the first new token, so
    the prompt pass is not in it): attention's ops (with slowllm's attention kernel, whose calls the
    profiler does not see: timed), and the block's other PyTorch ops (norms, GELU, residual adds, KV cache
    writes, the head's logits copies, views), in ms per step, their own time inside the profiler (which
    adds ~1 us per op); what the rest holds beyond them is Python and framework overhead."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    started = []

    def start():
        started.append(time.perf_counter())
        prof.start()
    made = len(run(1 + tokens, at_first=start)) - 1
    prof.stop()
    stopped = time.perf_counter()
    attention = other = 0.0
    if timed:  # (us, as the profiler's figures)
        attention += 1e6 * sum(took for name, at, took in timed.timings
                               if name in ATTENTION_KERNELS and started[0] < at <= stopped)
    for e in prof.key_averages():
        if e.key in ATTENTION_OPS:
            attention += e.self_cpu_time_total
        else:  # (ATen's ops, and autograd functions' own Python: Bloom's GeLUFunction)
            other += e.self_cpu_time_total
    return {"attention_ms": attention / 1000 / made, "ops_ms": other / 1000 / made}


def breakdown(runner, n_prompts: int) -> dict:
    """ms of one decode step's block linears and LM head, each timed alone at the step's row count."""
    import torch
    from torch import nn

    dtype = runner.chain.dtype
    linears = [m for block in runner.chain.blocks.blocks.values() for m in block.modules() if isinstance(m, nn.Linear)
               or type(m).__name__ == "Int8Linear"]

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1000

    with torch.no_grad():
        xs = {m.in_features: torch.randn(n_prompts, 1, m.in_features).to(dtype) for m in linears}
        lin = best(lambda: [m(xs[m.in_features]) for m in linears])
        hidden = torch.randn(n_prompts, runner.ends.hidden_size)
        head = best(lambda: runner.ends.logits(hidden.to(dtype)))
    return {"linears_ms": lin, "head_ms": head}


def measure(engine: str, model: Path, counts: list[int], tokens: int, context: int, inner: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", engine, str(model), ",".join(map(str, counts)),
                          str(tokens), str(context), str(inner)],
                         capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    if out.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def neighbour() -> subprocess.Popen:
    """A CPU-bound process on one core, as a PC in use has (a build, a browser tab, a game)."""
    return subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(10000))"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, model, counts = sys.argv[2], sys.argv[3], [int(n) for n in sys.argv[4].split(",")]
        tokens, context, inner = map(int, sys.argv[5:8])
        print(json.dumps(child(engine, model, counts, tokens, context, inner)))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--inner", type=int, default=3, help="timed generations per prompt count in a run, each between two bandwidth readings")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=0, help="tokens of context before the prompts (attention's share)")
    ap.add_argument("--isa", nargs="+", default=None, help="kernel builds to measure (default: those this CPU runs)")
    ap.add_argument("--engines", nargs="+", default=["hf", "slowllm", "slowllm8"])
    ap.add_argument("--neighbour", action="store_true", help="also measure beside a CPU-bound process")
    ap.add_argument("--prefetch", nargs="+", choices=["ahead", "own"], default=None,
                    help="how the kernels' runs ask for weights, and whether tiles of several rows take runs "
                         "(SLOWLLM_PREFETCH), each a row (default: the CPU's)")
    args = ap.parse_args()
    from slowllm.node import Checkpoint
    from slowllm.node.engine._checkpoint import SCALE
    from slowllm.node.kernels._kernels import runnable_isas

    isas = args.isa or runnable_isas()
    model = make_model(args.n_layer)
    paths = {"hf": model, "slowllm": model, "slowllm8": make_int8(model), "slowllm16": model}
    floor_bytes = {}
    for engine, path in paths.items():
        ck = Checkpoint(path)
        keys = [ck.head_key] + [k for layer in range(ck.n_layer) for k in ck.quantized_keys(layer)]
        keys += [k + SCALE for k in keys if ck.int8 and k != ck.head_key] + ([ck.head_key + SCALE] if ck.int8 else [])
        floor_bytes[engine] = sum(torch_numel(ck.meta(k)) for k in keys)
    print(f"bytes per token: bf16 {floor_bytes['slowllm'] / 1e9:.2f} GB, int8 {floor_bytes['slowllm8'] / 1e9:.2f} GB",
          file=sys.stderr)
    conditions = ["idle", "busy"] if args.neighbour else ["idle"]
    results: dict[tuple, list[dict]] = {}
    for _ in range(args.repeat):
        for isa in isas:
            env = {"SLOWLLM_ISA": isa, **(AVX2_PC if isa.startswith("avx2") else {})}
            for condition, mode in ((c, m) for c in conditions for m in args.prefetch or [None]):
                busy = neighbour() if condition == "busy" else None
                label = row_label(isa, mode)
                try:
                    for engine in args.engines:
                        if engine == "hf" and args.prefetch and mode != args.prefetch[0]:
                            continue  # (transformers reads its weights one way: measured once per build)
                        rs = measure(engine, paths[engine], args.prompts, args.tokens, args.context, args.inner,
                                     {**env, **({"SLOWLLM_PREFETCH": mode} if mode else {})})
                        for n in args.prompts:
                            r = rs[str(n)]
                            results.setdefault((label, condition, n, engine), []).append(r)
                            print(f"  {label} {condition} {engine:9s} {n} prompt(s): {r['ms_per_token']:.1f} ms/token "
                                  f"at {r['gbps']:.1f} GB/s (turns: {', '.join(f'{ms:.1f} at {g:.1f}' for ms, g in r['pairs'])}) "
                                  f"{r.get('dtype', '')} {r.get('kernels', '')}",
                                  file=sys.stderr, flush=True)
                finally:
                    if busy:
                        busy.kill()
                        busy.wait()
    gbps = statistics.median(r["gbps"] for runs in results.values() for r in runs)
    read = statistics.median(g for runs in results.values() for r in runs for g in r["reads"])
    summary: dict = {"bandwidth_gbps": round(gbps, 1), "read_gbps": round(read, 1)}
    longest = max((r.get("prompt_tokens", 0) for runs in results.values() for r in runs), default=0)
    print(f"\ndecode, bloom-1b7 shape ({args.n_layer} blocks), {args.tokens} tokens after prompts of up to "
          f"{longest} tokens, median of {args.repeat}; "
          f"read bandwidth {gbps:.1f} GB/s by torch's sum, {read:.1f} GB/s read as the kernels read (medians of "
          f"the rows'); x floor: against the sum's (the issue's floor), x read: against the kernels' read")
    first = args.prompts[0]
    print(f"{'isa':>10} {'cond':>5} {'prompts':>7} {'engine':>9} {'ms/token':>9} {'vs hf':>6} {'GB/s':>5} {'x floor':>8} "
          f"{'x read':>7} {f'x {first}p':>6} {'kernels':>8} {'alone':>6} {'attn':>5} {'ops':>5} {'python':>6}")
    for (isa, condition, n, engine), runs in results.items():
        ms = statistics.median(r["ms_per_token"] for r in runs)
        hf = results.get((row_label(isa.split("/")[0], args.prefetch[0] if args.prefetch else None), condition, n, "hf"))
        base = statistics.median(r["ms_per_token"] for r in hf) if hf else float("nan")
        key = f"{isa}_{condition}_{n}p_{engine}"
        summary[key + "_ms"] = round(ms, 1)
        summary[key + "_speedup_vs_hf"] = round(base / ms, 2)
        row_gbps = statistics.median(r["gbps"] for r in runs)
        # each timed generation against its own floor (the bandwidth of its moment), then the median
        x_floor = statistics.median(ms / (floor_bytes[engine] / gbps / 1e6) for r in runs for ms, gbps in r["pairs"])
        x_read = statistics.median(ms / (floor_bytes[engine] / g / 1e6) for r in runs
                                   for (ms, _), g in zip(r["pairs"], r["reads"]))
        # the step against the first prompt count's, measured in turns in the same process: the median turn
        x_first = statistics.median(x for r in runs for x in r["over_first"])
        row = (f"{isa:>10} {condition:>5} {n:>7} {engine:>9} {ms:>9.1f} {base / ms:>5.2f}x {row_gbps:>5.1f} "
               f"{x_floor:>7.2f}x {x_read:>6.2f}x {x_first:>5.2f}x")
        if n != first:
            summary[key + f"_over_{first}p"] = round(x_first, 2)
        if runs[0].get("kernels"):  # (which build ran, and how its runs asked for weights: measured or forced)
            summary[key + "_kernels"] = runs[0]["kernels"]
        summary[key + "_gbps"] = round(row_gbps, 1)
        summary[key + "_x_floor"] = round(x_floor, 2)
        summary[key + "_x_read"] = round(x_read, 2)
        if "linears" in runs[0]:  # medians over the turns (the profiler's split: one per run)
            lin, head, kern, rest = (statistics.median(x for r in runs for x in r[part])
                                     for part in ("linears", "head", "kernels_in_step", "rest"))
            attn, ops = (statistics.median(r[part] for r in runs) for part in ("attention_ms", "ops_ms"))
            row += f" {kern:>8.1f} {lin + head:>6.1f} {attn:>5.1f} {ops:>5.1f} {rest - attn - ops:>6.1f}"
            summary[key + "_kernels_ms"], summary[key + "_rest_ms"] = round(kern, 1), round(rest, 1)
            summary[key + "_linears_ms"], summary[key + "_head_ms"] = round(lin, 1), round(head, 1)
            summary[key + "_attention_ms"], summary[key + "_ops_ms"] = round(attn, 1), round(ops, 1)
        print(row)
    if args.neighbour:
        for isa in (row_label(i, m) for i in isas for m in args.prefetch or [None]):
            for n in args.prompts:
                for engine in args.engines:
                    idle, busy = (results.get((isa, c, n, engine)) for c in ("idle", "busy"))
                    if idle and busy:
                        ratio = (statistics.median(r["ms_per_token"] for r in busy)
                                 / statistics.median(r["ms_per_token"] for r in idle))
                        summary[f"{isa}_{n}p_{engine}_busy_over_idle"] = round(ratio, 2)
                        print(f"busy/idle {isa} {n} prompt(s) {engine}: {ratio:.2f}x")
    print(json.dumps({"bench": "decode", "n_layer": args.n_layer, "tokens": args.tokens, "context": args.context,
                      **summary}))


def torch_numel(meta) -> int:
    import torch

    shape, dtype = meta
    return torch.Size(shape).numel() * dtype.itemsize


if __name__ == "__main__":
    main()
