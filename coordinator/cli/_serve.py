"""`slowllm serve --local --model MODEL`: the OpenAI-compatible HTTP API over this machine's chain.

The coordinator serves the same API over its swarm (`slowllm-coordinator --http-port`, swarm/_server.py).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from slowllm.protocol import InputError
from slowllm.utils._openmp import ComputeThread


def serve(args) -> int:
    from slowllm.coordinator.api._app import make_app, server
    from slowllm.coordinator.api._backends import LocalBackend, served_name
    from slowllm.coordinator.swarm._keys import is_loopback

    if args.api_keys is None and not is_loopback(args.host) and not args.insecure:
        raise InputError(f"refusing to serve on {args.host} without keys: pass --api-keys FILE (lines `NAME KEY`), "
                         "or --insecure if this network is trusted.")
    if args.max_new_tokens < 1 or args.max_prompt_tokens < 1:
        raise InputError("--max-new-tokens and --max-prompt-tokens must be at least 1.")
    if args.max_request_bytes is not None and args.max_request_bytes < 1024:
        raise InputError("--max-request-bytes must be at least 1024.")
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read --chat-template {args.chat_template}: {e.strerror}.") from None
    if args.soft_prompts and not Path(args.soft_prompts).is_dir():
        raise InputError(f"--soft-prompts {args.soft_prompts} is not a directory.")
    from ._main import _backend

    args.no_progress = True  # a server's log is no place for a progress bar per pass
    # the same LocalRunner as every --local job, loaded on the thread that will run every pass
    compute = ComputeThread()
    runner = compute.submit(_backend, args).result()
    backend = LocalBackend(runner, served_name(args.model, args.served_model_name), args.api_keys, args.max_new_tokens)
    app = make_app(backend, soft_prompts=args.soft_prompts, chat_template=template,
                   max_prompt_tokens=args.max_prompt_tokens, max_request_bytes=args.max_request_bytes, compute=compute)
    http = server(app, args.host, args.port)

    def announce():  # once uvicorn listens (port 0 picks one): the line scripts wait for
        while not http.started:
            if http.should_exit:
                return
            threading.Event().wait(0.05)
        port = http.servers[0].sockets[0].getsockname()[1]
        print(f"slowllm serve: {backend.model_id} ready at http://{args.host}:{port}/v1", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    http.run()
    print("slowllm serve: stopped", flush=True)
    sys.stderr.flush()
    # Straight out: the batcher thread may be inside a long pass (a 16k-token prompt), and interpreter
    # shutdown would wait for it or abort in a native read; nothing is left to save.
    os._exit(0)
