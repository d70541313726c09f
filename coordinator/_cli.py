"""`slowllm`: the jobs (generate, score, tune), status, demo and cluster, remote or local.

Every job takes `--coordinator URL` (through the network) or `--local --model MODEL` (this process,
blocks streamed from disk). User mistakes end in one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slowllm.protocol import InputError, SlowllmError


def read_jsonl(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {path} does not exist.")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not valid JSON ({e.msg}): fix that line.") from None
    if not rows:
        raise InputError(f"{path} is empty: give one JSON object per line.")
    return rows


def _add_backend(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to run (one of)")
    g.add_argument("--coordinator", metavar="URL", help="run through the network coordinator at URL (ws:// or wss://)")
    g.add_argument("--local", action="store_true", help="run in this process, streaming blocks from disk")
    g.add_argument("--model", metavar="MODEL", help="local directory or hub id of a Bloom checkpoint (with --local)")
    g.add_argument("--secret-file", metavar="PATH", default=os.environ.get("SLOWLLM_SECRET_FILE"),
                   help="shared secret of the coordinator (default: $SLOWLLM_SECRET_FILE)")
    g.add_argument("--cafile", metavar="PATH", help="CA certificate to trust for a wss:// coordinator")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype in local mode (bfloat16 is 2-2.7x faster on CPUs with AVX512-BF16)")
    g.add_argument("--max-ram", metavar="SIZE", help="local mode: memory budget of the whole process, e.g. 12GB "
                   "(default: 80%% of available memory)")
    g.add_argument("--spill-dir", metavar="DIR", help="local mode: where activations beyond --max-ram go (default: $TMPDIR)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="local mode: where blocks compute")
    g.add_argument("--keep-in-ram", action="store_true",
                   help="local mode: load every block once and keep it (for models that fit; much faster generation)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slowllm", description="Run and tune Bloom models on ordinary PCs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for one or more prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--soft-prompt", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    _add_backend(p)

    p = sub.add_parser("score", help="log-likelihoods of continuations / multiple choice")
    p.add_argument("--input", required=True, metavar="FILE.jsonl")
    p.add_argument("--soft-prompt", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    _add_backend(p)

    p = sub.add_parser("tune", help="train a soft prompt (model weights frozen)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl")
    p.add_argument("--out", required=True, metavar="PROMPT.safetensors")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    _add_backend(p)

    p = sub.add_parser("status", help="nodes, layer ranges and coverage of a coordinator")
    p.add_argument("--coordinator", required=True, metavar="URL")
    p.add_argument("--secret-file", metavar="PATH", default=os.environ.get("SLOWLLM_SECRET_FILE"))
    p.add_argument("--cafile", metavar="PATH")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="offline end-to-end demo on a small random model")
    p.add_argument("--workdir", metavar="DIR", help="where the demo model goes (default: ~/.cache/slowllm/demo)")

    p = sub.add_parser("cluster", help="start/stop the coordinator and nodes a YAML file describes")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("file", metavar="FILE.yaml")
    return parser


def _backend(args):
    """(runner) for the chosen mode: an object with generate/score/tune like `LocalRunner`."""
    if bool(args.coordinator) == bool(args.local):
        raise InputError("say where to run: --coordinator URL (network) or --local --model MODEL (this machine).")
    if args.local:
        if not args.model:
            raise InputError("--local needs --model MODEL (a checkpoint directory or hub id).")
        from ._runner import LocalRunner
        return LocalRunner(args.model, dtype=args.dtype, max_ram=args.max_ram, device=args.device,
                           spill_dir=args.spill_dir, progress=False if args.no_progress else None,
                           keep_in_ram=args.keep_in_ram)
    from ._client import Client
    return Client(args.coordinator, secret_file=args.secret_file, cafile=args.cafile)


def _print(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def run(args) -> int:
    if args.command == "demo":
        from ._demo import run_demo
        return run_demo(args.workdir)
    if args.command == "cluster":
        from ._cluster import cluster
        return cluster(args.action, args.file)
    if args.command == "status":
        from ._client import Client, format_status
        status = Client(args.coordinator, secret_file=args.secret_file, cafile=args.cafile).status()
        print(json.dumps(status) if args.json else format_status(status))
        return 0

    if args.command == "generate":
        from ._jobs import Sampling
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        sampling.check()
        with _backend(args) as runner:
            stream = not args.json and len(args.prompts) == 1
            if stream:
                print(args.prompts[0], end="", flush=True)
            results = runner.generate(args.prompts, sampling, soft_prompt=args.soft_prompt,
                                      on_text=(lambda i, text: print(text, end="", flush=True)) if stream else None)
        for r in results:
            if args.json:
                _print({"prompt": r["prompt"], "text": r["text"], "token_ids": r["token_ids"],
                        "finish_reason": r.get("finish_reason")})
            elif stream:
                print(flush=True)
            else:
                print(r["prompt"] + r["text"], flush=True)
        return 0

    if args.command == "score":
        requests = read_jsonl(args.input)
        with _backend(args) as runner:
            results = runner.score(requests, soft_prompt=args.soft_prompt)
        for n, r in enumerate(results, start=1):
            if args.json:
                _print(r)
            elif "logprob" in r:
                print(f"{n}\tlogprob {r['logprob']:.4f}\tgreedy {'yes' if r['is_greedy'] else 'no'}")
            else:
                lps = " ".join(f"{x:.4f}" for x in r["logprobs"])
                print(f"{n}\tbest {r['best']}\tlogprobs {lps}")
        return 0

    if args.command == "tune":
        from ._tune import TuneOptions
        data = read_jsonl(args.data)
        out = Path(args.out)
        if not out.parent.is_dir():
            raise InputError(f"cannot write {out}: directory {out.parent} does not exist.")
        options = TuneOptions(args.prompt_tokens, args.steps, args.lr, args.batch_size, args.seed)
        options.check()
        with _backend(args) as runner:
            runner.tune(data, options, out,
                        on_step=lambda step, loss: print(f"step {step}/{options.steps} loss {loss:.4f}", flush=True))
        print(f"saved soft prompt ({options.prompt_tokens} tokens) to {out}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SlowllmError as e:
        print(f"slowllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slowllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
