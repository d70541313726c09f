"""The code blocks of the README and of docs/ run, so the docs cannot drift from the code.

Every `slowllm`, `slowllm-node` and `slowllm-coordinator` command in a shell block must parse with
today's options; the `--local` jobs run for real on a tiny checkpoint (the model names replaced by
its path, `examples/` as the job files); every Python block runs as written, with the model path, the
coordinator URL and the secret file pointing at a tiny checkpoint and a live coordinator + nodes on
127.0.0.1. A command or block that appears on several pages runs once. Every relative link resolves.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from netutil import Cluster, free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md", ROOT / "deploy" / "GUIDE.md"]
MODELS = ("bigscience/bloom", "/data/bloom", "bigscience/bloom-560m")  # (a draft for itself)


def blocks(language: str) -> list[str]:
    found = [b for doc in DOCS for b in re.findall(rf"```{language}\n(.*?)```", doc.read_text(), re.S)]
    return list(dict.fromkeys(found))  # a block shown on two pages runs once


def commands() -> list[list[str]]:
    out = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] in ("slowllm", "slowllm-node", "slowllm-coordinator") and words not in out:
                    out.append(words)
    return out


def test_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 2 and len(commands()) >= 8
    assert [w for w in commands() if "--local" in w and w[1] in ("generate", "score", "tune")]
    assert len(README.read_bytes()) <= 16 * 1024, "the README is read in ten minutes: put depth in docs/"


def test_every_relative_link_resolves():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"


@pytest.mark.parametrize("words", commands(), ids=lambda w: " ".join(w)[:60])
def test_every_command_parses(words):
    from slowllm.coordinator.cli._main import build_parser as jobs
    from slowllm.coordinator.cli._coordinator import build_parser as coordinator
    from slowllm.node.server._cli import build_parser as node

    parser = {"slowllm": jobs, "slowllm-node": node, "slowllm-coordinator": coordinator}[words[0]]()
    try:
        parser.parse_args(words[1:])
    except SystemExit as e:  # argparse exits 0 for --help and 2 for an unknown option
        assert e.code == 0, f"README command no longer parses: {' '.join(words)}"


def test_local_commands_run(tiny_model, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # the job files the commands name
    ran = checked = 0
    int8 = tmp_path / "bloom-int8"  # README's `slowllm quantize /data/bloom /data/bloom-int8` writes it
    for words in commands():
        runs = words[0] == "slowllm" and "--local" in words and words[1] in ("generate", "score", "tune")
        if not runs and words[:2] != ["slowllm", "quantize"]:
            continue  # (`serve` runs until stopped: tests/test_http.py starts it)
        args = [str(tiny_model) if w in MODELS else str(int8) if w == "/data/bloom-int8" else w for w in words[1:]]
        proc = run_cli(*args, "--no-progress", cwd=tmp_path)
        assert proc.returncode == 0, f"{' '.join(words)}: {proc.stderr}"
        if words[1] == "score" and "--json" in words and "--soft-prompt" not in words:
            checked += _scores_match_transformers(tiny_model, tmp_path / args[args.index("--input") + 1],
                                                  proc.stdout, "bfloat16" if "bfloat16" in words else "float32")
        ran += 1
    assert ran >= 4 and (int8 / "config.json").exists() and checked >= 1


def _scores_match_transformers(model, questions, stdout: str, dtype: str) -> int:
    """The README's score command prints what transformers computes: each choice's log-likelihood (to
    bf16 rounding where the command asks for bf16), and the likeliest choice where the gap is clear."""
    from conftest import hf_logprob, hf_model
    from slowllm.coordinator.jobs._ends import ModelEnds
    from slowllm.node import Checkpoint

    ends = ModelEnds(Checkpoint(model))
    oracle = hf_model(model)
    tolerance = 0.1 if dtype == "bfloat16" else 1e-4
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    outs = [json.loads(line) for line in stdout.splitlines()]
    assert len(outs) == len(rows)
    for row, out in zip(rows, outs):
        ctx = ends.encode_prompt(row["context"])
        if "continuation" in row:
            want = hf_logprob(oracle, ctx, ends.encode(row["continuation"]))[0]
            assert out["logprob"] == pytest.approx(want, abs=tolerance), (out, want)
            continue
        want = [hf_logprob(oracle, ctx, ends.encode(c))[0] for c in row["choices"]]
        assert out["logprobs"] == pytest.approx(want, abs=tolerance), (out, want)
        if abs(want[0] - want[1]) > 2 * tolerance:
            assert out["best"] == max(range(len(want)), key=want.__getitem__)
    return len(rows)


def test_python_blocks_run(tiny_model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("readme-secret-0123456789abcdef")
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "slowllm.coordinator.cli._main", "serve", "--local", "--model",
                            str(tiny_model), "--keep-in-ram", "--port", str(port), "--served-model-name", "bloom"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "ready at" in api.stdout.readline()
        with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret) as cluster:
            _run_python_blocks(tiny_model, tmp_path, cluster, port)
    finally:
        api.terminate()
        api.wait(10)


def _run_python_blocks(tiny_model, tmp_path, cluster, port):
    """Each block as written, pointed at the live coordinator and `slowllm serve` (served as "bloom")."""
    for code in blocks("python"):
        code = code.replace("ws://127.0.0.1:8765", cluster.url).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        for name in MODELS:
            code = code.replace(f'"{name}"', json.dumps(str(tiny_model)))
        code = code.replace(f'model={json.dumps(str(tiny_model))}', 'model="bloom"')  # the API's model id
        cwd, out = os.getcwd(), io.StringIO()
        os.chdir(tmp_path)
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, "README.md", "exec"), {})
        finally:
            os.chdir(cwd)
        assert out.getvalue().strip(), code
