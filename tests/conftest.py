"""Shared fixtures: tiny random Bloom checkpoints made here (never downloaded) and the HF oracle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from slowllm.coordinator import make_checkpoint, tiny_config  # noqa: E402

# An AVX2-only PC on an AVX512 machine (as bench/decode.py): PyTorch, oneDNN and MKL capped at AVX2, for
# subprocesses (they read these before torch loads)
AVX2_PC = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

LAYOUTS = {
    # name: make_checkpoint keyword arguments
    "st-sharded": dict(fmt="safetensors", sharded=True, prefix=True),
    "st-single": dict(fmt="safetensors", sharded=False, prefix=True),
    "st-sharded-noprefix": dict(fmt="safetensors", sharded=True, prefix=False),
    "bin-sharded": dict(fmt="bin", sharded=True, prefix=True),
    "bin-single-noprefix": dict(fmt="bin", sharded=False, prefix=False),
    "st-bf16": dict(fmt="safetensors", sharded=True, prefix=True, dtype=torch.bfloat16),
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A shared secret file for the coordinator, its nodes and clients."""
    path = tmp_path_factory.mktemp("secret") / "secret.txt"
    path.write_text("a-long-random-shared-secret-for-tests-0123456789")
    return path


def debian_tool(command: str, package: str) -> str | None:
    """`command`'s path; as root on Debian, installs `package` first when it is missing (else None)."""
    import shutil

    found = shutil.which(command)
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    subprocess.run(f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}",
                   shell=True, capture_output=True, timeout=900)
    return shutil.which(command)


@pytest.fixture(scope="session")
def tiny_model(models_dir) -> Path:
    """The default test model: 6 blocks, hidden 64, fp32, sharded safetensors via save_pretrained."""
    return make_checkpoint(models_dir / "tiny", tiny_config(n_layer=6, hidden=64, n_head=4), seed=0)


@pytest.fixture(scope="session")
def other_model(models_dir) -> Path:
    """A model of another shape (for 'made for another model' errors)."""
    return make_checkpoint(models_dir / "other", tiny_config(n_layer=4, hidden=32, n_head=4), seed=1)


@pytest.fixture(scope="session")
def layout_model(models_dir):
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_checkpoint(models_dir / name, tiny_config(n_layer=4, hidden=64, n_head=4), seed=3,
                                         **LAYOUTS[name])
        return made[name]
    return get


_oracles: dict = {}


def hf_model(path: Path):
    """transformers' BloomForCausalLM in fp32 on the same checkpoint: the correctness oracle."""
    from transformers import BloomForCausalLM

    if path not in _oracles:
        # (no dtype argument: its name changed across transformers versions; the suite runs on several)
        _oracles[path] = BloomForCausalLM.from_pretrained(path).float().eval()
    return _oracles[path]


def hf_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    seq = ctx + cont
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
    total = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    greedy = all(lp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
    return total, greedy


def run_cli(*args: str, timeout: int = 300, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slowllm.coordinator.cli._main", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
