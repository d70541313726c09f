"""`slowllm demo`: everything end to end, offline, on a small random checkpoint (Bloom, or `--family`)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from slowllm.coordinator.jobs._options import Sampling, TuneOptions
from slowllm.coordinator.jobs._runner import LocalRunner

from ._tiny import TINY_FAMILIES, make_checkpoint, tiny_config

SCORE_REQUESTS = [
    {"context": "Is the sky blue?", "choices": [" Yes.", " No."]},
    {"context": "The capital of France is", "continuation": " Paris."},
]
TUNE_DATA = [
    {"context": "Is the sky blue?", "continuation": " Yes."},
    {"context": "Is fire cold?", "continuation": " No."},
    {"context": "Which is larger, a mouse or an elephant?", "continuation": " An elephant."},
]
PROMPTS = ["Once upon a time", "The capital of Italy is"]


def demo_model(workdir: str | None, family: str = "bloom") -> Path:
    if family not in TINY_FAMILIES:
        raise SystemExit(f"slowllm demo: --family {family!r} is not one of {', '.join(TINY_FAMILIES)}.")
    root = Path(workdir).expanduser() if workdir else Path.home() / ".cache" / "slowllm" / "demo"
    model = root / f"{family.replace('_', '-')}-tiny"
    if not (model / "config.json").is_file():
        make_checkpoint(model, tiny_config(n_layer=6, hidden=64, n_head=4, family=family))
    return model


def _timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"  {label:<28} {time.perf_counter() - start:7.2f} s", flush=True)
    return result


def run_local(model: Path) -> dict:
    print(f"local mode (blocks streamed from {model}):", flush=True)
    with LocalRunner(model, progress=False) as runner:
        out = {
            "generate": _timed("generate 2 prompts x 12", lambda: runner.generate(PROMPTS, Sampling(max_new_tokens=12))),
            "score": _timed("score 2 lines", lambda: runner.score(SCORE_REQUESTS)),
        }
        with tempfile.TemporaryDirectory() as tmp:
            prompt = Path(tmp) / "prompt.safetensors"
            losses = []
            _timed("tune 4 steps", lambda: runner.tune(TUNE_DATA, TuneOptions(prompt_tokens=4, steps=4, lr=0.05),
                                                       prompt, on_step=lambda s, loss: losses.append(loss)))
            out["tune_losses"] = losses
            out["score_with_prompt"] = runner.score(SCORE_REQUESTS, soft_prompt=prompt)
    return out


def run_demo(workdir: str | None = None, family: str = "bloom") -> int:
    model = demo_model(workdir, family)
    print(f"family {family}: {model}", flush=True)
    local = run_local(model)
    for r in local["generate"]:
        print(f"  generate: {json.dumps(r['prompt'])} -> {json.dumps(r['text'])}")
    for r in local["score"]:
        print(f"  score: {json.dumps(r)}")
    print(f"  tune losses: {' '.join(f'{x:.3f}' for x in local['tune_losses'])}")
    print("  (the demo model has random weights, so its text is gibberish: what matters is that local and "
          "remote agree)")
    from ._demo_network import run_network
    return run_network(model, local)
