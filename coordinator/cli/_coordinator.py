"""`slowllm-coordinator --model MODEL`: the hub nodes and clients connect to."""

from __future__ import annotations

import argparse
import logging
import ssl
import sys

from slowllm.protocol._errors import InputError, SlowllmError
from slowllm.utils._openmp import share_cores

EXAMPLES = """examples:
  openssl rand -hex 32 > secret.txt
  slowllm-coordinator --model bigscience/bloom --host 0.0.0.0 --secret-file secret.txt
  slowllm-coordinator --model /data/bloom --certfile cert.pem --keyfile key.pem --secret-file secret.txt

Nodes dial in with `slowllm-node --layers A-B --coordinator ws://THIS:8765 --secret-file secret.txt`;
open http://THIS:8765/status in a browser to see which blocks are covered."""


def build_parser() -> argparse.ArgumentParser:
    from slowllm.utils._cli_common import HelpFormatter, version

    p = argparse.ArgumentParser(prog="slowllm-coordinator", formatter_class=HelpFormatter, epilog=EXAMPLES,
                                description="Own the model's ends (tokenizer, embeddings, head), route activations "
                                            "through the nodes and run clients' jobs. One port for nodes, clients "
                                            "and the /status page.")
    p.add_argument("--version", action="version", version=f"slowllm-coordinator {version()}")
    p.add_argument("--model", required=True, help="local directory or hub id of a checkpoint (Bloom, GPT-NeoX, Llama, Mistral, Qwen2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--secret-file", metavar="PATH",
                   help="the nodes' secret (16+ bytes); also the clients' unless --client-keys is given")
    p.add_argument("--client-keys", metavar="FILE",
                   help="per-user client keys, lines `NAME KEY`; re-read when the file changes or on SIGHUP "
                        "(revoke a user by deleting the line); a client key never registers a node")
    p.add_argument("--public-status", action="store_true",
                   help="serve /status and /status.json without a key on a non-loopback address")
    p.add_argument("--verify", type=float, default=0.05, metavar="F",
                   help="re-run this fraction of hops on a second node covering the same blocks; a node proven "
                        "wrong is banned (1: every hop; 0: none)")
    p.add_argument("--wait-for-nodes", type=float, default=60.0, metavar="S",
                   help="how long a job waits for missing blocks to be covered")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="S",
                   help="a node that does not answer a request within S seconds is failed over")
    p.add_argument("--max-jobs-per-client", type=int, default=8, metavar="N",
                   help="jobs one client address may run at once; beyond: a 'busy, retry' error")
    p.add_argument("--max-jobs", type=int, default=32, metavar="N", help="jobs running at once in all")
    p.add_argument("--max-message-size", default="256MB", metavar="SIZE",
                   help="largest WebSocket message anyone sends (at least 1MB); jobs of any size are cut to fit")
    p.add_argument("--max-new-tokens", type=int, default=4096, metavar="N",
                   help="most tokens one generation request may ask for")
    p.add_argument("--draft-model", metavar="MODEL",
                   help="a small model with the same tokenizer, run here in RAM, that drafts tokens for the big "
                        "model to check several at a time (clients choose with --draft/--no-draft)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="most tokens drafted per pass when the client does not say (fewer when few are accepted)")
    p.add_argument("--http-port", type=int, metavar="PORT",
                   help="also serve the OpenAI-compatible HTTP API on this port (0 picks one), keys as for clients")
    p.add_argument("--soft-prompts", metavar="DIR",
                   help="soft prompts HTTP requests may name (\"soft_prompt\": \"NAME\" uses DIR/NAME.safetensors)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja2 template of /v1/chat/completions prompts")
    p.add_argument("--max-prompt-tokens", type=int, default=16384, metavar="N",
                   help="longest prompt one HTTP request may send (a longer one is a 400, not minutes of work)")
    p.add_argument("--max-request-bytes", type=int, metavar="N",
                   help="largest HTTP request body (default: what the longest prompt needs; larger: 413)")
    p.add_argument("--certfile", help="TLS certificate (serve wss://)")
    p.add_argument("--keyfile", help="TLS private key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a secret")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return p


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SlowllmError(f"cannot read --chat-template {path}: {e.strerror}.") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    share_cores()  # before torch is imported: see utils/_openmp.py
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("slowllm.nodes").setLevel(logging.INFO)  # joins, leaves, refusals, bans: one line each
    try:
        from slowllm.utils._cli_common import check_model_path, check_port

        check_model_path(args.model)  # before torch and the model's ends load (~10 s)
        check_port(args.host, args.port, "--port")
        if args.http_port:
            check_port(args.host, args.http_port, "--http-port")
        if args.max_prompt_tokens < 1 or (args.max_request_bytes is not None and args.max_request_bytes < 1024):
            raise InputError("--max-prompt-tokens must be at least 1 and --max-request-bytes at least 1024.")
        from slowllm.coordinator.swarm._keys import is_loopback
        from slowllm.coordinator.swarm._server import Coordinator
        from slowllm.protocol import read_secret
        from slowllm.utils._aio import run

        secret = read_secret(args.secret_file)
        if secret is None and not is_loopback(args.host):
            if not args.insecure:
                raise SlowllmError(f"refusing to listen on {args.host} without a shared secret: pass --secret-file "
                                   "(or --insecure if this network is trusted).")
            print("slowllm-coordinator: warning: listening without a secret; anyone who reaches this port can use "
                  "it.", file=sys.stderr)
        ctx = None
        if args.certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args.certfile, args.keyfile)
        from slowllm.protocol import Limits
        from slowllm.utils._units import parse_size

        size = parse_size(args.max_message_size)
        if not 1 << 20 <= size <= 1 << 30:
            raise SlowllmError(f"--max-message-size {args.max_message_size} must be between 1MB and 1GB.")
        if not 0 <= args.verify <= 1:
            raise SlowllmError(f"--verify {args.verify} must be a fraction between 0 and 1.")
        if args.max_new_tokens < 1:
            raise SlowllmError("--max-new-tokens must be at least 1.")
        coordinator = Coordinator(args.model, host=args.host, port=args.port, secret=secret,
                                  limits=Limits(max_frame=size), max_new_tokens=args.max_new_tokens,
                                  wait_for_nodes=args.wait_for_nodes, ssl_context=ctx,
                                  request_timeout=args.request_timeout, max_jobs_per_client=args.max_jobs_per_client,
                                  max_jobs=args.max_jobs, client_keys=args.client_keys,
                                  public_status=args.public_status, verify=args.verify,
                                  draft_model=args.draft_model, draft_tokens=args.draft_tokens,
                                  http_port=args.http_port, soft_prompts=args.soft_prompts,
                                  chat_template=_read(args.chat_template), max_prompt_tokens=args.max_prompt_tokens,
                                  max_request_bytes=args.max_request_bytes)
        run(coordinator.serve())
    except SlowllmError as e:
        print(f"slowllm-coordinator: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"slowllm-coordinator: error: cannot listen on {args.host}:{args.port} ({e.strerror}): "
              "pick another --port.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
