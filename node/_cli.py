"""`slowllm-node --layers A-B`: serve a contiguous range of blocks to a coordinator."""

from __future__ import annotations

import argparse
import logging
import re
import sys

import torch

from slowllm.protocol import SlowllmError, read_secret

from ._aio import run

from ._memory import parse_size


def parse_layers(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: write an inclusive range like 10-19 (or one block: 7).")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if last < first:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: the first block must not come after the last.")
    return first, last


def _fault(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    kind, _, n = text.partition(":")
    if kind not in ("exit", "hang") or not n.isdigit():
        raise SlowllmError("--inject-fault takes exit:N or hang:N.")
    return kind, int(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slowllm-node", description="Serve Bloom blocks to a slowllm coordinator.")
    p.add_argument("--layers", required=True, type=parse_layers, metavar="A-B", help="inclusive, 0-based: 10-19")
    p.add_argument("--coordinator", default="ws://127.0.0.1:8765", metavar="URL")
    p.add_argument("--model", help="own copy of the checkpoint (default: the coordinator's model id)")
    p.add_argument("--secret-file", metavar="PATH")
    p.add_argument("--cafile", metavar="PATH", help="CA certificate to trust for a wss:// coordinator")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--name", default="")
    p.add_argument("--session-memory", default="2GB", metavar="SIZE", help="KV-cache budget for all sessions")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--inject-fault", metavar="KIND:N", help=argparse.SUPPRESS)  # tests: exit:N or hang:N
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    from ._server import NodeServer

    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SlowllmError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu.")
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[
            args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
        server = NodeServer(first=args.layers[0], last=args.layers[1], coordinator=args.coordinator,
                            model=args.model, secret=read_secret(args.secret_file), dtype=dtype, device=args.device,
                            name=args.name, cafile=args.cafile, session_budget=parse_size(args.session_memory),
                            fault=_fault(args.inject_fault))
        run(server.run_forever())
    except SlowllmError as e:
        print(f"slowllm-node: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
