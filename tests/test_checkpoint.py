"""Checkpoint access: every supported layout reads the same tensors, lazily; bad checkpoints fail clearly."""

import json
import shutil

import pytest
import torch

from conftest import LAYOUTS, hf_logprob, hf_model
from slowllm.coordinator import LocalRunner
from slowllm.node import Checkpoint, block_keys
from slowllm.protocol import CheckpointError


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_scores_like_transformers(layout, layout_model):
    path = layout_model(layout)
    ck = Checkpoint(path)
    assert ck.n_layer == 4
    assert set(ck.read(block_keys(2))) == set(block_keys(2))
    # fp32 asked for: a bf16 checkpoint computes in bf16 by default where that is fast (test_kernels.py)
    with LocalRunner(path, dtype="float32", progress=False) as runner:
        ends = runner.ends
        req = {"context": "The quick brown fox", "continuation": " jumps over"}
        got = runner.score([req])[0]
    ref, greedy = hf_logprob(hf_model(path), ends.encode(req["context"]), ends.encode(req["continuation"]))
    assert got["logprob"] == pytest.approx(ref, abs=1e-4)
    assert got["is_greedy"] == greedy


def test_layouts_share_a_fingerprint_and_bf16_is_stored_as_bf16(layout_model):
    prints = {name: Checkpoint(layout_model(name)).fingerprint() for name in ("st-sharded", "bin-sharded", "st-bf16")}
    assert len(set(prints.values())) == 1
    assert Checkpoint(layout_model("st-bf16")).storage_dtype() == torch.bfloat16


def test_reads_are_lazy_memory_maps(tiny_model):
    ck = Checkpoint(tiny_model)
    t = ck.read(["h.1.mlp.dense_h_to_4h.weight"])["h.1.mlp.dense_h_to_4h.weight"]
    # a memory-mapped tensor: its storage is not an anonymous allocation we made
    assert t.shape == (256, 64)
    assert ck.weight_map["h.1.mlp.dense_h_to_4h.weight"][1].startswith("transformer.")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory():
    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id"):
        Checkpoint("/nonexistent/model")


def test_unsupported_family_or_mislabelled_checkpoint(tmp_path, tiny_model):
    d = _copy(tiny_model, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported: slowllm runs bloom, gpt_neox, "
                                              "llama, mistral, qwen2 checkpoints"):
        Checkpoint(d)
    cfg["model_type"] = "llama"  # Bloom's tensors under a Llama config: named, not a traceback
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no tensor 'embed_tokens.weight'.*not a llama checkpoint"):
        Checkpoint(d)


def test_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path / "m")


def test_missing_shard(tmp_path, tiny_model):
    d = _copy(tiny_model, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["transformer.h.3.mlp.dense_4h_to_h.weight"]
    (d / shard).unlink()
    ck = Checkpoint(d)
    with pytest.raises(CheckpointError, match="is missing"):
        ck.read(block_keys(3))


def test_truncated_shard(tmp_path, tiny_model):
    d = _copy(tiny_model, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"]["transformer.h.2.mlp.dense_4h_to_h.weight"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    ck = Checkpoint(d)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ck.read(block_keys(2))


def test_tensor_missing_from_index(tmp_path, tiny_model):
    d = _copy(tiny_model, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["transformer.h.5.self_attention.dense.bias"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no tensor 'h.5.self_attention.dense.bias'"):
        Checkpoint(d)


def test_bin_that_is_not_a_tensor_file(tmp_path, layout_model):
    d = _copy(layout_model("bin-sharded"), tmp_path / "m")
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    (d / index["weight_map"]["transformer.h.1.input_layernorm.weight"]).write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a tensor file"):
        Checkpoint(d).read(block_keys(1))


def test_hub_id_downloads_only_needed_files(monkeypatch, tiny_model):
    """A hub id resolves files one by one through hf_hub_download (mocked: tests never reach a hub)."""
    fetched = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False):
        assert repo_id == "bigscience/bloom-tiny"
        if local_files_only:  # nothing is cached yet
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError(filename)
        fetched.append(filename)
        path = tiny_model / filename
        if not path.exists():
            from huggingface_hub.errors import EntryNotFoundError
            raise EntryNotFoundError(filename)
        return str(path)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("slowllm.node.engine._checkpoint._check_hub_reachable", lambda *a: None)  # the mock hub is up
    ck = Checkpoint("bigscience/bloom-tiny")
    ck.read(block_keys(4))
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {index[f"transformer.{k}"] for k in block_keys(4)}
    shards = {f for f in fetched if f.endswith(".safetensors")}
    assert shards == needed
    assert len(shards) < len(set(index.values()))


def test_unreachable_hub_says_so_in_seconds(tmp_path):
    """No network: one sentence saying the hub cannot be reached (not "has no config.json"), without a
    minute of retries. The hub endpoint is a closed local port, so nothing leaves this machine."""
    import time

    from conftest import run_cli

    (tmp_path / "in.jsonl").write_text('{"context": "a", "continuation": " b"}\n')
    start = time.time()
    proc = run_cli("score", "--input", str(tmp_path / "in.jsonl"), "--local", "--model", "bigscience/bloom",
                   env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot reach the hub" in proc.stderr and "local directory" in proc.stderr
    assert time.time() - start < 20
    offline = run_cli("score", "--input", str(tmp_path / "in.jsonl"), "--local", "--model", "bigscience/bloom",
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr
