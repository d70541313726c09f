"""`slowllm-node --layers A-B`: serve a contiguous range of blocks to a coordinator."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from slowllm.protocol._errors import SlowllmError
from slowllm.utils._cli_common import check_model_path, exit_on_interrupt, model_layers
from slowllm.utils._openmp import positive_threads, share_cores
from slowllm.utils._units import parse_size


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


EXAMPLES = """examples:
  slowllm-node --layers 0-9 --coordinator ws://COORD:8765 --secret-file secret.txt
  slowllm-node --layers 10-19 --coordinator wss://COORD:8765 --secret-file secret.txt --cafile ca.pem --model /data/bloom
  slowllm-node --layers 0-34 --device cuda --coordinator ws://COORD:8765 --secret-file secret.txt
  slowllm-node --layers 0-9 --coordinator ws://COORD1:8765 --coordinator ws://COORD2:8765 --secret-file secret.txt

Before loading, the node checks that its blocks (in the dtype it keeps them in), the KV budget
(--session-memory) and ~1 GB of runtime fit in the available memory, and otherwise names the largest
range that fits. See deploy/GUIDE.md for how many blocks fit per PC."""


def _coordinators(urls: list[str] | None, secret_files: list[str] | None) -> tuple[list[str], list[str | None]]:
    """Each coordinator with its secret file: one file for all of them, or one each in the same order."""
    urls = urls or ["ws://127.0.0.1:8765"]
    if len(set(urls)) != len(urls):
        raise SlowllmError("--coordinator names the same URL twice: give each coordinator once.")
    files = secret_files or [None]
    if len(files) == 1:
        files = files * len(urls)
    if len(files) != len(urls):
        raise SlowllmError(f"{len(urls)} --coordinator and {len(files)} --secret-file: give one secret file for all "
                           "of them, or one for each, in the same order.")
    return urls, files


def build_parser() -> argparse.ArgumentParser:
    from slowllm.utils._cli_common import HelpFormatter, version

    p = argparse.ArgumentParser(prog="slowllm-node", formatter_class=HelpFormatter, epilog=EXAMPLES,
                                description="Keep a range of a model's blocks (Bloom, GPT-NeoX, Llama...) in memory and "
                                            "serve them to a slowllm coordinator (dials out: works behind NAT).")
    p.add_argument("--version", action="version", version=f"slowllm-node {version()}")
    p.add_argument("--layers", required=True, type=parse_layers, metavar="A-B",
                   help="blocks to serve, inclusive and 0-based: 10-19 is ten blocks")
    p.add_argument("--coordinator", action="append", metavar="URL",
                   help="a coordinator to serve (default ws://127.0.0.1:8765); give it several times to serve several "
                        "(one link each, one memory budget and one compute thread shared)")
    p.add_argument("--model", help="own copy of the checkpoint (default: open the coordinator's model id)")
    p.add_argument("--secret-file", action="append", metavar="PATH",
                   help="the coordinator's node secret; with several --coordinator, one for all or one each, in order")
    p.add_argument("--cafile", metavar="PATH", help="CA certificate to trust for a wss:// coordinator")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the blocks live and compute")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype blocks are kept in (default: bfloat16 on cuda, and for a bf16 or int8 checkpoint on CPUs "
                        "that compute bf16 at memory speed: native bf16, or slowllm's AVX2 kernels; float32 otherwise)")
    p.add_argument("--threads", type=positive_threads, metavar="N",
                   help="compute threads (default: all cores; on a PC in use, the cores you can spare)")
    p.add_argument("--name", default="", help="shown on the coordinator's status (default: node-A-B)")
    p.add_argument("--session-memory", default="2GB", metavar="SIZE", help="KV-cache budget for all sessions")
    p.add_argument("--memory", metavar="SIZE",
                   help="memory this node may use in all (default: what the OS reports available at start)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection and request")
    p.add_argument("--inject-fault", metavar="KIND:N", help=argparse.SUPPRESS)  # tests: exit:N or hang:N
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    share_cores(args.threads)  # before torch is imported: see utils/_openmp.py
    exit_on_interrupt("slowllm-node", grace=None)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")

    try:
        urls, secret_files = _coordinators(args.coordinator, args.secret_file)
        check_model_path(args.model)  # before torch is imported and anything loads
        n_layer = model_layers(args.model)
        if n_layer is not None and args.layers[1] >= n_layer:
            raise SlowllmError(f"--layers {args.layers[0]}-{args.layers[1]} is outside the model's blocks "
                               f"0-{n_layer - 1}: pick a range inside it.")
        import torch

        from slowllm.protocol import read_secret
        from slowllm.utils._aio import run

        from ._server import NodeServer

        if args.device == "cuda" and not torch.cuda.is_available():
            raise SlowllmError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu.")
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[args.dtype]
        server = NodeServer(first=args.layers[0], last=args.layers[1], coordinator=urls,
                            model=args.model, secret=[read_secret(f) for f in secret_files], dtype=dtype, device=args.device,
                            name=args.name, cafile=args.cafile, session_budget=parse_size(args.session_memory),
                            fault=_fault(args.inject_fault),
                            memory=None if args.memory is None else parse_size(args.memory))
        run(server.run_forever())
    except SlowllmError as e:
        print(f"slowllm-node: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
