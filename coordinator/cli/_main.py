"""`slowllm`: the jobs (generate, score, tune), status, demo and cluster, remote or local.

Every job takes `--coordinator URL` (through the network) or `--local --model MODEL` (this process,
blocks streamed from disk). User mistakes end in one sentence on stderr and exit status 2.

Nothing heavy is imported before the arguments are parsed: `slowllm --help`, `--version` and typos
answer at once; torch and transformers load only when a job runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slowllm.protocol._errors import InputError, SlowllmError
from slowllm.utils._cli_common import (HelpFormatter, check_model_path, check_port, check_soft_prompt,
                                       exit_on_interrupt, reader_went_away, version)
from slowllm.utils._openmp import positive_threads, share_cores


class Terminal:
    """stdout as the CLI writes it: knows whether a line is left open (streamed text without newline),
    so that an error or a notice starts on a line of its own."""

    def __init__(self):
        self.open_line = False

    def text(self, s: str) -> None:
        if s and sys.stdout.isatty():
            s = terminal_safe(s)
        if s:
            sys.stdout.write(s)
            sys.stdout.flush()
            self.open_line = not s.endswith("\n")

    def end_line(self) -> None:
        if self.open_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.open_line = False

    def notice(self, message: str) -> None:
        if sys.stdout.isatty() and sys.stderr.isatty():  # same screen: do not glue it to the text
            self.end_line()
        print(f"slowllm: {message}", file=sys.stderr, flush=True)


TERMINAL = Terminal()
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f] if chr(c) not in "\n\t"}


def terminal_safe(text: str) -> str:
    """Model output on a terminal: control characters (ESC sequences, vertical tabs, carriage returns)
    shown as visible escapes, so generated text cannot move the cursor, recolour or retitle the terminal."""
    return text.translate(_CONTROL)


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
    g = p.add_argument_group("where to run (one of --coordinator or --local)")
    g.add_argument("--coordinator", metavar="URL", action="append",
                   help="run through the network coordinator at URL (ws:// or wss://); give several of one swarm and a "
                        "job whose coordinator goes away goes on at the next")
    g.add_argument("--local", action="store_true", help="run in this process, streaming blocks from disk")
    g.add_argument("--model", metavar="MODEL", help="with --local: a checkpoint directory or hub id")
    g.add_argument("--secret-file", metavar="PATH", default=os.environ.get("SLOWLLM_SECRET_FILE"),
                   help="your key for the coordinator (also $SLOWLLM_SECRET_FILE)")
    g.add_argument("--cafile", metavar="PATH", help="CA certificate to trust for a wss:// coordinator")
    g = p.add_argument_group("local mode")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype; default: bfloat16 for a bf16 or int8 checkpoint where this CPU computes bf16 at "
                   "memory speed (native bf16, or slowllm's AVX2 kernels), else float32")
    g.add_argument("--threads", type=positive_threads, metavar="N",
                   help="compute threads (default: all cores; on a PC in use, the cores you can spare)")
    g.add_argument("--max-ram", metavar="SIZE", help="memory budget of the whole process, e.g. 12GB "
                   "(default: 80%% of available memory)")
    g.add_argument("--spill-dir", metavar="DIR", help="where activations beyond --max-ram go (default: $TMPDIR)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where blocks compute")
    g.add_argument("--keep-in-ram", action="store_true",
                   help="load every block once and keep it (for models that fit; much faster generation)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


_EXAMPLES = {
    "generate": """examples:
  slowllm generate "Is the sky blue?" --local --model bigscience/bloom-560m --max-new-tokens 10
  slowllm generate "Once upon a time" "The capital of" --json --coordinator ws://COORD:8765 --secret-file key.txt
  slowllm generate "Tell me a story:" --temperature 0.8 --top-p 0.9 --seed 1 --local --model /data/bloom""",
    "score": """input lines: {"context": str, "continuation": str} or {"context": str, "choices": [str, ...]}

examples:
  slowllm score --input questions.jsonl --local --model /data/bloom --dtype bfloat16 --json
  slowllm score --input questions.jsonl --coordinator ws://COORD:8765 --secret-file key.txt""",
    "tune": """data lines: {"context": str, "continuation": str} (the loss is on the continuation)

examples:
  slowllm tune --data train.jsonl --out prompt.safetensors --steps 50 --save-every 10 --local --model /data/bloom
  slowllm generate "Is fire cold?" --soft-prompt prompt.safetensors --local --model /data/bloom""",
    "status": """examples:
  slowllm status --coordinator ws://COORD:8765 --secret-file key.txt
  slowllm status --coordinator ws://COORD:8765 --json""",
    "serve": """examples:
  slowllm serve --local --model /data/bloom --dtype bfloat16 --port 8000
  slowllm serve --local --model bigscience/bloom-560m --keep-in-ram --host 0.0.0.0 --api-keys keys.txt
  then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY").completions.create(model=..., prompt=...)""",
    "quantize": """examples:
  slowllm quantize /data/bloom /data/bloom-int8          # 352 GB -> 176 GB, one block at a time
  slowllm generate "Hello" --local --model /data/bloom-int8 --max-ram 16GB
  slowllm-node --model /data/bloom-int8 --layers 10-29 --coordinator wss://COORD:8765 --secret-file key.txt""",
    "cluster": """examples:
  slowllm cluster up cluster.example.yaml     # waits until every node registered
  slowllm cluster down cluster.example.yaml""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slowllm", formatter_class=HelpFormatter,
        description="Run and tune Bloom, GPT-NeoX and Llama-family models on ordinary PCs: through a network of volunteer nodes "
                    "(--coordinator URL) or on this machine, streaming blocks from disk (--local --model MODEL).",
        epilog="start with: slowllm demo      (offline, builds a tiny random model; no download)\n"
               "more help:  slowllm COMMAND --help")
    parser.add_argument("--version", action="version", version=f"slowllm {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              epilog=_EXAMPLES.get(name), formatter_class=HelpFormatter)

    p = command("generate", "generate text for one or more prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue (several are generated together)")
    p.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="stop after N new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=int, metavar="K", help="sample only among the K likeliest tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample only within the top probability mass P")
    p.add_argument("--seed", type=int, metavar="S", help="make sampling reproducible")
    p.add_argument("--soft-prompt", metavar="FILE", help="a soft prompt made by `slowllm tune`")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    g = p.add_argument_group("speculative decoding (same output, fewer passes over the big model)")
    g.add_argument("--draft-model", metavar="MODEL", help="with --local: a small model with the same tokenizer "
                   "(e.g. bloom-560m for Bloom-176B) whose drafted tokens the big model checks several per pass")
    g.add_argument("--draft-tokens", type=int, metavar="K",
                   help="most tokens drafted per pass (default 4; fewer while few are accepted)")
    g.add_argument("--draft", action=argparse.BooleanOptionalAction, default=None,
                   help="with --coordinator: use its draft model (default: whenever it has one)")
    _add_backend(p)

    p = command("score", "log-likelihoods of continuations, or the best of several choices")
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="one request per line (see below)")
    p.add_argument("--soft-prompt", metavar="FILE", help="a soft prompt made by `slowllm tune`")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    _add_backend(p)

    p = command("tune", "train a soft prompt (model weights frozen)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training examples (see below)")
    p.add_argument("--out", required=True, metavar="PROMPT.safetensors", help="where the prompt is saved")
    p.add_argument("--prompt-tokens", type=int, default=8, metavar="N", help="length of the soft prompt")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="examples per step")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="prompt initialisation and data order")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also save --out every N steps (0: only at the end; Ctrl-C always saves the latest)")
    _add_backend(p)

    p = command("serve", "the OpenAI-compatible HTTP API on this machine (--local --model MODEL)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; needs --api-keys)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-keys", metavar="FILE", help="keys clients must send as 'Authorization: Bearer KEY', lines "
                   "`NAME KEY` (re-read when the file changes); without it only this machine may connect")
    p.add_argument("--insecure", action="store_true", help="serve a non-loopback address without --api-keys")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: the hub id, or "
                   "the checkpoint directory's name)")
    p.add_argument("--soft-prompts", metavar="DIR", help="soft prompts requests may name (\"soft_prompt\": \"NAME\" "
                   "uses DIR/NAME.safetensors)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja2 template of /v1/chat/completions prompts (default: "
                   "'User: ...\\nAssistant:', see docs/http-api.md)")
    p.add_argument("--max-new-tokens", type=int, default=4096, metavar="N", help="most tokens one request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=16384, metavar="N",
                   help="longest prompt one request may send (a longer one is a 400, not minutes of work)")
    p.add_argument("--max-request-bytes", type=int, metavar="N",
                   help="largest request body (default: what the longest prompt needs, JSON-escaped; a larger "
                        "one is a 413, never read beyond the limit)")
    p.add_argument("--draft-model", metavar="MODEL", help="speculative decoding with this draft (see generate)")
    p.add_argument("--draft-tokens", type=int, metavar="K", help="most tokens drafted per pass (default 4)")
    _add_backend(p)

    p = command("quantize", "write an int8 copy of a checkpoint: half the bytes to read per pass and to hold per node")
    p.add_argument("model", metavar="MODEL", help="the original checkpoint (directory or hub id), bf16/fp16/fp32")
    p.add_argument("out", metavar="OUT", help="new directory for the int8 checkpoint (usable as MODEL everywhere)")
    p.add_argument("--bits", type=int, default=8, help="weight bits (8 is the only choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command("status", "nodes, layer ranges and coverage of a coordinator")
    p.add_argument("--coordinator", required=True, metavar="URL", help="ws:// or wss:// URL of the coordinator")
    p.add_argument("--secret-file", metavar="PATH", default=os.environ.get("SLOWLLM_SECRET_FILE"),
                   help="your key for the coordinator (also $SLOWLLM_SECRET_FILE)")
    p.add_argument("--cafile", metavar="PATH", help="CA certificate to trust for a wss:// coordinator")
    p.add_argument("--json", action="store_true", help="one JSON object (the coordinator's /status.json)")

    p = command("demo", "offline end-to-end demo on a small random model")
    p.add_argument("--workdir", metavar="DIR", help="where the demo model goes (default: ~/.cache/slowllm/demo)")
    p.add_argument("--family", default="bloom", choices=["bloom", "gpt_neox", "llama"],
                   help="which model family's tiny checkpoint to build and run (default: bloom)")

    p = command("cluster", "start/stop on this machine the coordinator and nodes a YAML file describes")
    p.add_argument("action", choices=["up", "down"], help="up: start and wait for every node; down: stop them")
    p.add_argument("file", metavar="FILE.yaml", help="cluster description (see cluster.example.yaml)")
    return parser


def _backend(args):
    """The runner for the chosen mode: an object with generate/score/tune like `LocalRunner`."""
    if bool(args.coordinator) == bool(args.local):
        raise InputError("say where to run: --coordinator URL (network) or --local --model MODEL (this machine).")
    if args.local:  # mistakes that take milliseconds to see, before torch and the model load (~10 s)
        check_model_path(args.model)
        check_soft_prompt(getattr(args, "soft_prompt", None), args.model)
    draft_model = getattr(args, "draft_model", None)
    if args.local:
        if not args.model:
            raise InputError("--local needs --model MODEL (a checkpoint directory or hub id).")
        from slowllm.coordinator.jobs._runner import LocalRunner
        from slowllm.coordinator.jobs._speculative import check_draft_tokens
        draft_tokens = getattr(args, "draft_tokens", None)
        if draft_tokens is not None:
            check_draft_tokens(draft_tokens)
        return LocalRunner(args.model, dtype=args.dtype, max_ram=args.max_ram, device=args.device,
                           spill_dir=args.spill_dir, progress=False if args.no_progress else None,
                           keep_in_ram=args.keep_in_ram, draft_model=draft_model,
                           draft_tokens=draft_tokens or 4)
    if draft_model:
        raise InputError("with --coordinator the draft model runs at the coordinator: start it with "
                         "slowllm-coordinator --draft-model MODEL, and choose with --draft/--no-draft here.")
    from slowllm.coordinator.client._client import Client
    return Client(args.coordinator, secret_file=args.secret_file, cafile=args.cafile, on_notice=TERMINAL.notice)


def _print(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def _generate(args) -> int:
    from slowllm.coordinator.jobs._options import Sampling

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    with _backend(args) as runner:
        stream = not args.json and len(args.prompts) == 1
        # A progress bar redraws its line with '\r': on the terminal that shows the streamed text it would
        # erase it. So the bar runs only until the first text (the prompt pass), and the prompt is
        # printed together with that text; piped output keeps the bar on stderr for every pass.
        same_screen = sys.stdout.isatty() and sys.stderr.isatty()
        shown = []

        def on_text(i: int, text: str) -> None:
            if not shown:
                shown.append(True)
                if same_screen:
                    runner.set_progress(False)
                    TERMINAL.text(args.prompts[0])
            TERMINAL.text(text)

        if stream and not same_screen:
            TERMINAL.text(args.prompts[0])
            shown.append(True)
        results = runner.generate(args.prompts, sampling, soft_prompt=args.soft_prompt,
                                  on_text=on_text if stream else None, draft=args.draft,
                                  draft_tokens=args.draft_tokens)
    for r in results:
        if args.json:
            _print({"prompt": r["prompt"], "text": r["text"], "token_ids": r["token_ids"],
                    "finish_reason": r.get("finish_reason"),
                    **{k: r[k] for k in ("target_passes", "accepted", "drafted") if k in r}})
        elif stream:
            if not shown:
                TERMINAL.text(args.prompts[0])
            TERMINAL.end_line()
        else:
            print(r["prompt"] + r["text"], flush=True)
    return 0


def _score(args) -> int:
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


def _tune(args) -> int:
    from slowllm.coordinator.jobs._options import TuneOptions

    data = read_jsonl(args.data)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: directory {out.parent} does not exist.")
    if args.save_every < 0:
        raise InputError("--save-every must be 0 (only at the end) or a number of steps.")
    options = TuneOptions(args.prompt_tokens, args.steps, args.lr, args.batch_size, args.seed)
    options.check()
    latest: dict = {}

    def on_prompt(step: int, prompt) -> None:
        latest.update(step=step, prompt=prompt)
        if args.save_every and step % args.save_every == 0 and step < options.steps:
            runner.save_prompt(out, prompt)
            print(f"saved the prompt of step {step} to {out}", flush=True)

    with _backend(args) as runner:
        try:
            runner.tune(data, options, out, on_prompt=on_prompt,
                        on_step=lambda step, loss: print(f"step {step}/{options.steps} loss {loss:.4f}", flush=True))
        except KeyboardInterrupt:
            if latest:
                runner.save_prompt(out, latest["prompt"])
                print(f"interrupted: saved the prompt of step {latest['step']} to {out}", file=sys.stderr)
            raise
    print(f"saved soft prompt ({options.prompt_tokens} tokens) to {out}")
    return 0


def run(args) -> int:
    if args.command == "demo":
        from slowllm.coordinator.demo._demo import run_demo
        return run_demo(args.workdir, args.family)
    if args.command == "cluster":
        from ._cluster import cluster
        return cluster(args.action, args.file)
    if args.command == "serve":
        if not args.local or not args.model or args.coordinator:
            raise InputError("slowllm serve runs the API on this machine: pass --local --model MODEL (a coordinator "
                             "serves it itself: slowllm-coordinator --http-port PORT).")
        check_model_path(args.model)
        check_port(args.host, args.port, "--port")
        from ._serve import serve
        return serve(args)
    if args.command == "quantize":
        from slowllm.node.engine._quantize import quantize_checkpoint
        out = quantize_checkpoint(args.model, args.out, bits=args.bits, progress=False if args.no_progress else None)
        print(f"wrote the int8 checkpoint {out}: use it as --model anywhere (nodes may mix it with the original)")
        return 0
    if args.command == "status":
        from slowllm.coordinator.client._client import Client, format_status
        status = Client(args.coordinator, secret_file=args.secret_file, cafile=args.cafile).status()
        print(json.dumps(status) if args.json else format_status(status))
        return 0
    return {"generate": _generate, "score": _score, "tune": _tune}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # before torch is imported (utils/_openmp.py); a --local job is the only process computing
    share_cores(getattr(args, "threads", None), alone=getattr(args, "local", False))
    exit_on_interrupt("slowllm")
    try:
        return run(args)
    except BrokenPipeError:
        return reader_went_away()
    except SlowllmError as e:
        TERMINAL.end_line()
        print(f"slowllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        TERMINAL.end_line()
        print("slowllm: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Straight out: interpreter shutdown can abort (SIGABRT) while the block reader thread is still
        # inside a native read; what needed saving was saved before this point.
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
