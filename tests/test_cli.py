"""The `slowllm` command as users script it: formats from SPEC.md, and one-sentence errors."""

import json

from conftest import run_cli


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("slowllm: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_generate_json(tiny_model):
    proc = run_cli("generate", "The capital of", "Yes", "--max-new-tokens", "5", "--json",
                   "--local", "--model", str(tiny_model), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["The capital of", "Yes"]
    for r in rows:
        assert isinstance(r["text"], str) and all(isinstance(t, int) for t in r["token_ids"])
        assert 1 <= len(r["token_ids"]) <= 5


def test_output_into_a_pipe_that_closes_early_ends_quietly(tiny_model):
    """`slowllm generate ... --json | head -1`: no BrokenPipeError traceback, exit 0 (as `cat` does)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "slowllm.coordinator.cli._main", "generate", "a", "b", "c", "--max-new-tokens", "2",
           "--json", "--local", "--model", str(tiny_model), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_score_tune_and_soft_prompt_round_trip(tiny_model, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"context": "Is the sky blue?", "continuation": " Yes."},
                                         {"context": "Is fire cold?", "continuation": " No."}])
    mc = _jsonl(tmp_path / "mc.jsonl", [{"context": "Is the sky blue?", "choices": [" Yes.", " No."]},
                                        {"context": "Is fire cold?", "continuation": " No."}])
    local = ["--local", "--model", str(tiny_model), "--no-progress"]
    proc = run_cli("score", "--input", str(mc), "--json", *local)
    assert proc.returncode == 0, proc.stderr
    first, second = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert set(first) == {"logprobs", "is_greedy", "best"} and len(first["logprobs"]) == 2
    assert set(second) == {"logprob", "is_greedy"}

    out = tmp_path / "prompt.safetensors"
    proc = run_cli("tune", "--data", str(data), "--out", str(out), "--steps", "6", "--prompt-tokens", "4",
                   "--lr", "0.05", *local)
    assert proc.returncode == 0, proc.stderr
    losses = [float(ln.split()[-1]) for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert out.is_file()

    before = [json.loads(ln)["logprob"] for ln in run_cli("score", "--input", str(data), "--json", *local).stdout.splitlines()]
    after = run_cli("score", "--input", str(data), "--json", "--soft-prompt", str(out), *local)
    assert after.returncode == 0, after.stderr
    assert sum(json.loads(ln)["logprob"] for ln in after.stdout.splitlines()) > sum(before)
    gen = run_cli("generate", "Yes", "--soft-prompt", str(out), "--max-new-tokens", "3", "--json", *local)
    assert gen.returncode == 0, gen.stderr


def test_bad_inputs_give_one_sentence(tiny_model, other_model, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    local = ["--local", "--model", str(tiny_model), "--no-progress"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "continuation": "b"}\n{"context": "a", oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    wrong = _jsonl(tmp_path / "w.jsonl", [{"context": "a"}])
    cases = [  # (arguments, what the one sentence says); independent: run three at a time
        (["score", "--input", str(bad), *local], ["line 2"]),
        (["score", "--input", str(empty), *local], ["empty"]),
        (["score", "--input", str(wrong), *local], ["line 1"]),
        (["score", "--input", str(wrong), "--local", "--model", str(tmp_path / "nope")], ["nope"]),
        (["generate", "x", *local, "--soft-prompt", str(tmp_path / "missing.safetensors")], ["does not exist"]),
        (["generate", "x", "--local", "--model", str(tiny_model), "--max-ram", "200MB"], ["--max-ram", "needs at least"]),
        (["generate", "x"], ["--coordinator URL"]),
    ]
    with ThreadPoolExecutor(3) as pool:
        for (_, says), proc in zip(cases, pool.map(lambda case: run_cli(*case[0]), cases)):
            _one_clean_error(proc, *says)

    # a soft prompt tuned for another model
    data = _jsonl(tmp_path / "d.jsonl", [{"context": "Is the sky blue?", "continuation": " Yes."}])
    other_prompt = tmp_path / "other.safetensors"
    proc = run_cli("tune", "--data", str(data), "--out", str(other_prompt), "--steps", "1",
                   "--local", "--model", str(other_model), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    _one_clean_error(run_cli("generate", "x", *local, "--soft-prompt", str(other_prompt)), "another model")

    # a tuning run that fails leaves no partial output file behind
    out = tmp_path / "never.safetensors"
    _one_clean_error(run_cli("tune", "--data", str(wrong), "--out", str(out), *local), "line 1")
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_simple_mistakes_are_one_sentence_before_torch_is_imported(tiny_model, tmp_path):
    """A missing model directory, --layers beyond the model, a taken port, a missing or mismatched soft
    prompt: told at once. A `torch` that refuses to import stands in for the ~10 s it takes to load."""
    import socket
    import subprocess
    import sys

    poisoned = tmp_path / "poisoned"
    (poisoned / "torch").mkdir(parents=True)
    (poisoned / "torch" / "__init__.py").write_text("raise ImportError('torch was imported before the check')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(poisoned)}
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    wide = tmp_path / "wide.safetensors"  # a soft prompt of another model's width (64 here)
    header = b'{"prompt":{"dtype":"F32","shape":[2,128],"data_offsets":[0,1024]}}'
    wide.write_bytes(len(header).to_bytes(8, "little") + header + bytes(1024))
    slowllm = [sys.executable, "-m", "slowllm.coordinator.cli._main"]
    cases = [
        (slowllm + ["generate", "x", "--local", "--model", str(tmp_path / "nowhere")], "is not a directory"),
        (slowllm + ["generate", "x", "--local", "--model", str(tiny_model), "--soft-prompt", str(tmp_path / "no.st")],
         "does not exist"),
        (slowllm + ["generate", "x", "--local", "--model", str(tiny_model), "--soft-prompt", str(wide)],
         "tuned for another model (width 128"),
        (slowllm + ["serve", "--local", "--model", str(tiny_model), "--port", port], "pick another --port"),
        ([sys.executable, "-m", "slowllm.coordinator.cli._coordinator", "--model", str(tiny_model), "--port", "0",
          "--http-port", port], "pick another --http-port"),
        ([sys.executable, "-m", "slowllm.node.server._cli", "--layers", "4-9", "--model", str(tiny_model)],
         "outside the model's blocks 0-5"),
    ]
    try:
        procs = [(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), words)
                 for cmd, words in cases]
        for proc, words in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 2 and "Traceback" not in err and "torch was imported" not in err, err
            lines = [line for line in err.strip().splitlines() if ": error: " in line]
            assert len(lines) == 1 and words in lines[0], err
    finally:
        taken.close()
