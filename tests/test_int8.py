"""int8 checkpoints (`slowllm quantize`), int8 and bf16 decode kernels, in-place KV caches."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from netutil import Cluster
from slowllm.coordinator import LocalRunner, Sampling, make_checkpoint, tiny_config
from slowllm.coordinator.jobs._fidelity import compare
from slowllm.node import BlockCache, Checkpoint
from slowllm.node.kernels._kernels import kernels
from slowllm.node.kernels._linears import Int8Linear, int8_matmul, quantize_rows
from slowllm.node.engine._quantize import quantize_checkpoint
from slowllm.protocol import CheckpointError

GREEDY = Sampling(max_new_tokens=10)
PROMPTS = ["The quick brown fox", "Is the sky blue?", "Once"]


@pytest.fixture(scope="module")
def models(models_dir):
    """A context-sensitive model (std 0.25) and a mild one (std 0.02), each with its int8 copy."""
    out = {}
    for name, std in (("ctx", 0.25), ("mild", 0.02)):
        original = models_dir / f"q-{name}"
        if not (original / "config.json").exists():
            make_checkpoint(original, tiny_config(std=std), seed=0)
        quantized = models_dir / f"q-{name}-int8"
        if not (quantized / "config.json").exists():
            quantize_checkpoint(original, quantized, progress=False)
        out[name], out[name + "8"] = original, quantized
    return out


def ids(results):
    return [r["token_ids"] for r in results]


def test_quantize_writes_a_smaller_checkpoint_with_the_same_fingerprint(models):
    original, quantized = Checkpoint(models["ctx"]), Checkpoint(models["ctx8"])
    assert quantized.int8 and not original.int8
    assert quantized.fingerprint() == original.fingerprint() == quantized.quantization["fingerprint"]
    index = json.loads((models["ctx8"] / "model.safetensors.index.json").read_text())
    shards = {f for f in index["weight_map"].values()}
    assert len(shards) == original.n_layer + 1  # one shard per block, one for the ends
    assert len({index["weight_map"][f"transformer.h.{i}.mlp.dense_4h_to_h.weight"] for i in range(6)}) == 6
    block = quantized.read_block(2)
    assert block["h.2.self_attention.query_key_value.weight"].dtype == torch.int8
    assert block["h.2.input_layernorm.weight"].dtype == torch.bfloat16
    # weights round-trip within half a step of each row's scale
    w = original.read(["h.2.mlp.dense_h_to_4h.weight"])["h.2.mlp.dense_h_to_4h.weight"]
    q = block["h.2.mlp.dense_h_to_4h.weight"].float() * block["h.2.mlp.dense_h_to_4h.weight_scale"].float()[:, None]
    step = block["h.2.mlp.dense_h_to_4h.weight_scale"].float()[:, None]
    assert ((w - q).abs() <= step / 2 + 1e-7).all()
    # half the bytes of a bf16 copy (tiny models: vectors are a larger share than in Bloom)
    bf16_bytes = sum(original.nbytes(original.block_keys(i)) for i in range(6)) // 2  # stored fp32
    assert sum(quantized.block_nbytes() for _ in range(6)) < 0.6 * bf16_bytes
    assert "tokenizer.json" in {p.name for p in models["ctx8"].iterdir()}
    assert not (models["ctx8"].parent / "q-ctx-int8.partial").exists()


def test_quantize_refuses_what_it_cannot_do_in_one_sentence(models, tmp_path):
    cases = [
        ([str(models["ctx"]), str(tmp_path / "a"), "--bits", "4"], "--bits 4 is not supported"),
        ([str(models["ctx8"]), str(tmp_path / "b")], "already an int8 checkpoint"),
        ([str(models["ctx"]), str(models["ctx8"])], "already exists and is not an empty directory"),
        ([str(tmp_path / "missing"), str(tmp_path / "c")], "neither an existing directory nor a hub id"),
    ]
    for args, message in cases:
        out = run_cli("quantize", *args, "--no-progress")
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_int8_fidelity_against_the_original_in_bf16(models):
    """The figures docs/benchmarks.md states, asserted with margin: mean / max |logprob diff| and top-1 agreement."""
    bounds = {"ctx": (0.15, 0.75, 0.85), "mild": (0.003, 0.01, 0.99)}  # measured 0.075/0.37/0.91, 0.0012/0.004/1.0
    g = torch.Generator().manual_seed(0)
    for name, (mean_bound, max_bound, top1_bound) in bounds.items():
        reference = LocalRunner(models[name], dtype="bfloat16", keep_in_ram=True)
        candidate = LocalRunner(models[name + "8"], keep_in_ram=True)  # bf16 by default on bf16 CPUs
        sequences = [reference.ends.encode("The quick brown fox jumps over the lazy dog. Is the sky blue? Yes.")]
        sequences += [torch.randint(4, 384, (40,), generator=g).tolist() for _ in range(5)]
        f = compare(reference, candidate, sequences)
        assert f.mean_abs_logprob_diff < mean_bound and f.max_abs_logprob_diff < max_bound, (name, f)
        assert f.top1_agreement >= top1_bound, (name, f)
        assert f.mean_abs_logprob_diff > 0  # it is a different model: the comparison can see it


def test_int8_local_jobs_streaming_and_resident_agree(models, tmp_path):
    streaming = LocalRunner(models["ctx8"], dtype="bfloat16", max_ram="2GB")
    resident = LocalRunner(models["ctx8"], dtype="bfloat16", keep_in_ram=True)
    assert ids(streaming.generate(PROMPTS, GREEDY)) == ids(resident.generate(PROMPTS, GREEDY))
    requests = [{"context": "Is the sky blue?", "choices": [" Yes.", " No."]},
                {"context": "The quick", "continuation": " brown fox"}]
    a, b = streaming.score(requests), resident.score(requests)
    assert a[0]["best"] == b[0]["best"] and abs(a[1]["logprob"] - b[1]["logprob"]) < 1e-3
    # fp32 activations over int8 weights work too (the CPU default for float checkpoints)
    fp32 = LocalRunner(models["ctx8"], dtype="float32", keep_in_ram=True).score(requests)
    assert abs(fp32[1]["logprob"] - b[1]["logprob"]) < 0.1
    # tuning runs backward through int8 blocks
    data = [{"context": "Is the sky blue?", "continuation": " Yes."}] * 2
    from slowllm.coordinator import TuneOptions
    losses = []
    resident.tune(data, TuneOptions(prompt_tokens=2, steps=3, lr=0.05, batch_size=2), on_step=lambda s, l: losses.append(l))
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_int8_node_beside_bf16_nodes_and_an_int8_swarm(models, secret):
    local = LocalRunner(models["ctx8"], dtype="bfloat16", keep_in_ram=True)
    requests = [{"context": "The quick", "continuation": " brown fox"}, {"context": "Is the sky", "continuation": " blue?"}]
    expected = local.score(requests)
    # every node int8, the coordinator on the int8 copy: the same computation as local
    with Cluster(models["ctx8"], ["0-2", "3-5"], secret_file=secret, node_args=["--dtype", "bfloat16"]) as c:
        client = c.client()
        got = client.score(requests)
        assert all(abs(g["logprob"] - e["logprob"]) < 1e-3 for g, e in zip(got, expected))
        assert ids(client.generate(PROMPTS, GREEDY)) == ids(local.generate(PROMPTS, GREEDY))
    # the coordinator holds the original; one volunteer brings the int8 copy of blocks 3-5
    reference = LocalRunner(models["ctx"], dtype="bfloat16", keep_in_ram=True).score(requests)
    with Cluster(models["ctx"], [], secret_file=secret, node_args=["--dtype", "bfloat16"]) as c:
        c.start_node("0-2", "n0-0-2")
        c.start_node("3-5", "int8-node", model=models["ctx8"])
        status = c.wait_covered(2)
        kinds = {n["name"]: n["quantization"] for n in status["nodes"]}
        assert kinds == {"n0-0-2": "none", "int8-node": "int8"}
        out = run_cli("status", "--coordinator", c.url, "--secret-file", str(secret))
        assert "bfloat16+int8" in out.stdout
        got = c.client().score(requests)
        assert all(abs(g["logprob"] - r["logprob"]) < 0.75 for g, r in zip(got, reference))
        assert len(c.client().generate(PROMPTS, GREEDY)) == 3


@pytest.mark.parametrize("stored", ["bf16", "int8", "fp32"])
def test_lm_head_kernel_and_converted_chunks_agree(models, models_dir, stored):
    """Scoring and fp32 decoding read the stored bf16, int8 or fp32 head rows through the kernel up to
    `invariant_rows` positions and convert chunks beyond: both give the fp32 numbers of the dense head,
    and within the kernel's rows each position's logits are exactly its logits alone (so the coordinator
    may compute many generations' heads in one call)."""
    from slowllm.coordinator.jobs._ends import ModelEnds

    if kernels() is None:
        pytest.skip("no decode kernels here (no compiler or no AVX2): the head is PyTorch's GEMM")
    dtype = {"bf16": torch.bfloat16, "int8": torch.int8, "fp32": torch.float32}[stored]
    path = models["ctx8"] if stored == "int8" else models_dir / f"q-ctx-{stored}"
    if stored != "int8" and not (path / "config.json").exists():
        make_checkpoint(path, tiny_config(std=0.25), seed=0, dtype=dtype)
    ck = Checkpoint(path)
    assert ck.meta(ck.head_key)[1] == dtype
    ends = ModelEnds(ck, dtype=torch.float32, head_chunk_bytes=16 << 10)  # several chunks and a partial last
    w = ends._matrix(ck.head_key).float()
    if stored == "int8":
        w *= ends._scale(ck.head_key).float()[:, None]
    g = torch.Generator().manual_seed(2)
    most = ends.invariant_rows
    assert most >= 16
    before = kernels().calls()
    for rows in (1, 5, most, most + 3):  # the kernel, then converted chunks
        hidden = torch.randn(rows, ends.hidden_size, generator=g)
        targets = torch.randint(0, ends.vocab_size, (rows,), generator=g)
        ref = hidden @ w.T
        ref_lp = ref.log_softmax(-1)[torch.arange(rows), targets]
        logits = ends.logits(hidden)
        assert (logits - ref).abs().max() <= 1e-5 * ref.abs().max(), rows
        if rows <= most:
            assert all(torch.equal(logits[i], ends.logits(hidden[i:i + 1])[0]) for i in range(rows)), rows
        lp, best, _ = ends.target_stats(hidden, targets)
        assert (lp - ref_lp).abs().max() < 1e-4 and torch.equal(best, ref.argmax(-1) == targets), rows
        got = ends.token_logprobs(hidden, targets, top=2)
        assert max(abs(a - b) for (a, _), b in zip(got, ref_lp.tolist())) < 1e-4
        assert [t[0][0] for _, t in got] == ref.argmax(-1).tolist()
    entry = {"bf16": "bf16_fp32_gemv", "int8": "int8_gemv", "fp32": "fp32_gemv"}[stored]
    assert kernels().calls()[entry] > before[entry]


def test_int8_linear_every_path_and_its_gradient():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(80, 64, generator=g)
    q, scale = quantize_rows(weight)
    dense = q.float() * scale.float()[:, None]
    lin = Int8Linear(64, 80)
    lin.weight.data, lin.weight_scale.data, lin.bias.data = q, scale.float(), torch.randn(80, generator=g)
    for rows in (1, 3, 8, 40):  # the kernels, torch's int8 kernel, the dequantizing GEMM
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(2, rows, 64, generator=g).to(dtype)
            ref = F.linear(x.float(), dense, lin.bias)
            got = lin(x)
            assert got.dtype == dtype and (got.float() - ref).abs().max() <= 2e-2 * ref.abs().max(), (rows, dtype)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    (grad,) = torch.autograd.grad(lin(x).square().sum(), x)
    x2 = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.linear(x2, dense, lin.bias).square().sum(), x2)
    # (the forward's fp32 rows meet the int8 weights on a 16-bit grid of each row's largest element)
    assert (grad - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert int8_matmul(torch.zeros(0, 64), q, scale).shape == (0, 80)


def test_block_cache_writes_in_place_grows_and_rolls_back():
    cache = BlockCache()
    k = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    keys, _ = cache.update(k, -k, 0)
    assert torch.equal(keys, k) and cache.length == 5
    buffer = cache.state()["keys"]
    for step in range(70):  # decode steps: written in place until the buffer is full, then grown
        cache.update(torch.full((2, 3, 1, 4), float(step)), torch.zeros(2, 3, 1, 4), 0)
    assert cache.length == 75 and torch.equal(cache.keys[:, :, :5], k) and (cache.keys[:, :, 74] == 69).all()
    assert cache.state()["keys"] is not buffer  # grew once past its spare room
    cache.truncate(6)
    keys, _ = cache.update(torch.full((2, 3, 2, 4), -1.0), torch.zeros(2, 3, 2, 4), 0)
    assert keys.shape[2] == 8 and (keys[:, :, 6:] == -1).all() and (keys[:, :, 5] == 0).all()
    restored = BlockCache.from_state(cache.state())  # the streaming executor's spill and reload
    assert restored.length == 8 and torch.equal(restored.keys, cache.keys)
    assert cache.nbytes() >= 2 * cache.keys.numel() * 4


def test_a_checkpoint_that_declares_an_unknown_quantization_is_refused(models, tmp_path):
    import shutil
    copy = tmp_path / "odd"
    shutil.copytree(models["ctx8"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["slowllm_quantization"]["method"] = "nf4"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization slowllm does not know"):
        Checkpoint(copy)


def test_without_the_kernels_torch_kernels_give_the_same_greedy_text(models):
    """SLOWLLM_KERNELS=0 (or no AVX512-BF16 / no compiler): torch's own kernels, the same tokens."""
    for model in (models["mild8"], models["mild"]):
        args = ("generate", *PROMPTS, "--local", "--model", str(model), "--dtype", "bfloat16", "--keep-in-ram",
                "--max-new-tokens", "8", "--json", "--no-progress")
        runs = [run_cli(*args, env={"SLOWLLM_KERNELS": flag}) for flag in ("1", "0")]
        assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
        with_kernels, without = ([json.loads(line)["token_ids"] for line in r.stdout.splitlines()] for r in runs)
        assert with_kernels == without and len(with_kernels) == 3


def test_int8_node_under_verify_beside_a_liar_and_vanishing(models, secret):
    """--verify 1 with an honest int8 node, an honest bf16 node and a liar on the same blocks: the int8
    node's answers pass the int8 tolerance against bf16 ones (it is not banned), the liar is; then the int8
    node vanishes (SIGKILL) and the next generation fails over to the bf16 node."""
    from adversaries import LyingNode

    requests = [{"context": "The quick", "continuation": " brown fox"}]
    reference = LocalRunner(models["ctx"], dtype="bfloat16", keep_in_ram=True).score(requests)
    with Cluster(models["ctx"], [], secret_file=secret, node_args=["--dtype", "bfloat16"],
                 coordinator_args=["--verify", "1"]) as c:
        c.start_node("0-5", "bf16-node")
        c.start_node("0-5", "int8-node", model=models["ctx8"])
        c.wait_covered(2)
        client = c.client()
        for _ in range(2):  # routes alternate: the int8 node answers as primary and as the checker
            got = client.score(requests)
            assert abs(got[0]["logprob"] - reference[0]["logprob"]) < 0.75
        liar = LyingNode(c.url, secret.read_bytes().strip(), models["ctx"], 0, 5, "random", name="liar",
                         dtype="bfloat16").start()
        for _ in range(3):
            client.score(requests)
        nodes = {n["name"]: n for n in client.status()["nodes"]}
        assert nodes["liar"]["banned"] and liar.answered >= 1
        assert not nodes["int8-node"]["banned"] and not nodes["bf16-node"]["banned"]
        # its int8 answers were judged by the coordinator recomputing int8 arithmetic (the same quantization of
        # its own checkpoint) within bf16's tolerance of that arithmetic: not 15%
        assert nodes["int8-node"]["refereed_hops"] >= 1
        c.nodes["int8-node"].kill()
        out = client.generate(PROMPTS, Sampling(max_new_tokens=6))
        assert all(len(r["token_ids"]) == 6 for r in out)
