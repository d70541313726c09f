"""HTTP API benchmark: 8 concurrent streaming clients vs one, and the API's cost per token.

(Named api.py: a bench/http.py would shadow the standard library's `http` for every script in bench/.)

    python bench/api.py [--tokens 64] [--clients 8] [--repeat 3]

`slowllm serve --local --keep-in-ram --dtype bfloat16` on a random checkpoint (hidden 1024, 24 blocks,
bf16), driven by the official `openai` client:
  - one streaming client: tokens/s;
  - --clients streaming clients started together: total tokens/s (the batcher runs them as one batch,
    one pass over the weights for all of them);
  - ms/token of one streamed completion vs the same generation through the Python API in one process
    (`LocalRunner.generate`, measured after the server stopped): the API's overhead per token.
Prints a table and one JSON line; figures are ratios against baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

WORK = Path(__file__).parent / "_work"
PROMPT = "Once upon a time there was a researcher without a cluster who read every block"


def stream_tokens(client, prompt: str, tokens: int) -> tuple[int, float, float]:
    """(tokens received, seconds to the first text, seconds in all) of one streamed completion: the
    tokens the server generated (its usage), which EOS or a stop may make fewer than asked for."""
    start = time.perf_counter()
    first, received = None, 0
    for chunk in client.completions.create(model="model", prompt=prompt, max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - start
        if chunk.usage is not None:
            received = chunk.usage.completion_tokens
    return received, first or 0.0, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import openai
    import torch
    from slowllm.coordinator import LocalRunner, Sampling, make_checkpoint, tiny_config

    model = WORK / "http-h1024-l24"
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(n_layer=24, hidden=1024, n_head=16, vocab_size=8192, std=0.5),
                        dtype=torch.bfloat16)
    proc = subprocess.Popen([sys.executable, "-m", "slowllm.coordinator.cli._main", "serve", "--local", "--model", str(model),
                             "--keep-in-ram", "--dtype", "bfloat16", "--port", "0", "--served-model-name", "model"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    url = re.search(r"(http://\S+)", line).group(1)
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    try:
        stream_tokens(client, PROMPT, 4)  # warm up
        one, many, first_token = [], [], []
        for _ in range(args.repeat):
            n, first, seconds = stream_tokens(client, PROMPT, args.tokens)
            one.append(n / seconds)
            first_token.append(first)
            results: list = [None] * args.clients
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(
                i, stream_tokens(client, f"{i} {PROMPT}", args.tokens))) for i in range(args.clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            many.append(sum(r[0] for r in results) / (time.perf_counter() - start))
    finally:
        proc.terminate()
        proc.wait(30)
    with LocalRunner(model, dtype="bfloat16", keep_in_ram=True) as runner:
        runner.generate([PROMPT], Sampling(max_new_tokens=4))
        inproc = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            made = runner.generate([PROMPT], Sampling(max_new_tokens=args.tokens))[0]["token_ids"]
            inproc.append(len(made) / (time.perf_counter() - start))
    r = {"one_client_tokens_per_s": statistics.median(one), "clients": args.clients,
         "many_clients_tokens_per_s": statistics.median(many), "in_process_tokens_per_s": statistics.median(inproc),
         "first_token_s": statistics.median(first_token)}
    r["many_vs_one"] = r["many_clients_tokens_per_s"] / r["one_client_tokens_per_s"]
    r["api_ms_per_token"] = 1000 / r["one_client_tokens_per_s"]
    r["in_process_ms_per_token"] = 1000 / r["in_process_tokens_per_s"]
    r["api_overhead_ms_per_token"] = r["api_ms_per_token"] - r["in_process_ms_per_token"]
    r["api_vs_in_process"] = r["api_ms_per_token"] / r["in_process_ms_per_token"]
    print(f"{'run':<34} {'tokens/s':>10} {'ratio':>22}")
    print(f"{'1 streaming client':<34} {r['one_client_tokens_per_s']:>10.1f} {'1.00x':>22}")
    print(f"{f'{args.clients} streaming clients together':<34} {r['many_clients_tokens_per_s']:>10.1f} "
          f"{r['many_vs_one']:>21.2f}x")
    print(f"{'Python API, in process':<34} {r['in_process_tokens_per_s']:>10.1f} "
          f"{'API: %.2fx ms/token' % r['api_vs_in_process']:>22}")
    print(f"API overhead: {r['api_overhead_ms_per_token']:.1f} ms per token "
          f"({r['api_ms_per_token']:.1f} vs {r['in_process_ms_per_token']:.1f})")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
