"""GPT-NeoX and Llama (grouped-query attention, untied head) against their transformers oracles, locally and
through a swarm, with left-padded batches, soft-prompt gradients, int8 copies and a failover mid-generation.

Bloom's own tests (test_local_jobs, test_network, test_resilience) cover the family-independent machinery
in depth; this file checks that every job and mode gives each other family's exact numbers too.
"""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
from netutil import Cluster
from slowllm.coordinator import LocalRunner, Sampling, TuneOptions, make_checkpoint, tiny_config
from slowllm.coordinator.jobs._tune import loss_and_grad
from slowllm.node import Checkpoint, ResidentBlocks

FAMILIES = ["gpt_neox", "llama"]
PROMPTS = ["The capital of", "Once upon a time there was a researcher", "Yes", "Bloom is a large language model"]
REQUESTS = [{"context": "The quick brown fox", "continuation": " jumps over the lazy dog"},
            {"context": "Is the sky blue?", "choices": [" Yes.", " No.", " Maybe"]},
            {"context": "", "continuation": "Bloom"}]
TUNE_DATA = [{"context": "Is the sky blue?", "continuation": " Yes."},
             {"context": "Is fire cold?", "continuation": " No."}]


def family_model(models_dir, family: str):
    path = models_dir / f"family-{family}"
    if not (path / "config.json").is_file():
        make_checkpoint(path, tiny_config(family=family), seed=0)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, models_dir):
    return family_model(models_dir, request.param)


@pytest.fixture(scope="module")
def oracle(model):
    return AutoModelForCausalLM.from_pretrained(model).float().eval()


@pytest.fixture(scope="module")
def runner(model):
    with LocalRunner(model, progress=False) as r:
        yield r


def reference_score(oracle, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        lp = torch.log_softmax(oracle(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
    rows = [lp[len(ctx) - 1 + i] for i in range(len(cont))]
    return sum(r[t].item() for r, t in zip(rows, cont)), all(r.argmax().item() == t for r, t in zip(rows, cont))


def reference_generate(oracle, ids: list[int], n: int) -> list[int]:
    out = oracle.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                          pad_token_id=3)[0, len(ids):].tolist()
    return out[: out.index(2)] if 2 in out else out


def reference_scores(oracle, ends) -> list:
    out = []
    for req in REQUESTS:
        ctx = ends.encode_prompt(req["context"], empty=ends.eos_token_id)
        conts = req.get("choices") or [req["continuation"]]
        out.append([reference_score(oracle, ctx, ends.encode(c)) for c in conts])
    return out


def check_scores(got: list[dict], ref: list) -> None:
    for g, r in zip(got, ref):
        if "logprobs" in g:
            assert g["logprobs"] == pytest.approx([x[0] for x in r], abs=1e-4)
            assert g["is_greedy"] == [x[1] for x in r]
        else:
            assert g["logprob"] == pytest.approx(r[0][0], abs=1e-4)


def test_the_family_is_read_from_the_config(model, runner):
    ck = runner.checkpoint
    assert ck.family.name == ck.config.model_type
    assert ck.head_key != ck.embedding_key  # untied: its own head matrix
    if ck.family.name == "llama":
        assert ck.config.num_key_value_heads < ck.config.num_attention_heads  # grouped-query attention
        assert ck.head_key == "lm_head.weight" and ck.embedding_key == "embed_tokens.weight"
        assert runner.ends.encode_prompt("Yes")[0] == 1  # Llama's prompts start with BOS
    else:
        assert ck.head_key == "embed_out.weight" and 0 < ck.config.rope_parameters["partial_rotary_factor"] < 1
        assert runner.ends.encode_prompt("Yes") == runner.ends.encode("Yes")
        # transformers 5 names GPT-NeoX's head lm_head: a checkpoint saved so is the same model
        import json
        import shutil

        from safetensors.torch import load_file, save_file

        alias = shutil.copytree(model, model.parent / f"{model.name}-lm-head", dirs_exist_ok=True)
        index = json.loads((alias / "model.safetensors.index.json").read_text())
        shard = index["weight_map"].pop("embed_out.weight")
        tensors = load_file(alias / shard)
        tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
        save_file(tensors, alias / shard, metadata={"format": "pt"})
        index["weight_map"]["lm_head.weight"] = shard
        (alias / "model.safetensors.index.json").write_text(json.dumps(index))
        with LocalRunner(alias, progress=False) as renamed:
            assert renamed.checkpoint.head_key == "lm_head.weight" and renamed.fingerprint == runner.fingerprint
            assert renamed.score(REQUESTS[:1]) == runner.score(REQUESTS[:1])
    bloom = make_checkpoint(model.parent / f"{model.name}-as-bloom", tiny_config(), tokenizer=False)
    assert Checkpoint(bloom).fingerprint() != runner.fingerprint  # the family is part of the identity


@pytest.mark.parametrize("post_processor", [True, False])
def test_bos_is_what_the_checkpoints_own_tokenizer_adds(model, runner, oracle, post_processor, tmp_path):
    """As transformers' tokenizer does with its defaults: a Llama's tokenizer adds BOS; one whose
    tokenizer.json adds none (SmolLM-style Llamas) gets none; never twice."""
    import json
    import shutil

    from transformers import AutoTokenizer

    path = model
    if not post_processor:
        path = shutil.copytree(model, tmp_path / "copy")
        spec = json.loads((path / "tokenizer.json").read_text())
        (path / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    hf = AutoTokenizer.from_pretrained(path)
    with LocalRunner(path, progress=False) as local:
        assert local.ends.adds_bos == (post_processor and runner.checkpoint.family.prepend_bos)
        for text in ("Yes", "Is the sky blue?"):
            assert local.ends.encode_prompt(text) == hf(text)["input_ids"], (text, post_processor)
        once = local.ends.encode_prompt("<s>Already there")  # transformers would put a second BOS here
        assert once[0] == 1 and once[1] != 1
        context, continuation = "Is the sky blue?", " Yes."
        want, _ = reference_score(oracle, hf(context)["input_ids"], local.ends.encode(continuation))
        got = local.score([{"context": context, "continuation": continuation}])[0]["logprob"]
        assert got == pytest.approx(want, abs=1e-4)


def test_weights_give_context_dependent_output(runner):
    outs = runner.generate(PROMPTS, Sampling(max_new_tokens=6))
    assert len({tuple(o["token_ids"]) for o in outs}) == len(PROMPTS)
    assert all(len(set(o["token_ids"])) > 1 for o in outs)


def test_score_matches_transformers(runner, oracle):
    check_scores(runner.score(REQUESTS), reference_scores(oracle, runner.ends))


def test_left_padded_batch_generates_what_transformers_generates_alone(runner, oracle):
    """Four prompts of different lengths in one left-padded batch: each row's rotary positions count only
    its real tokens, so every row generates exactly what transformers generates for that prompt alone."""
    outs = runner.generate(PROMPTS, Sampling(max_new_tokens=10))
    for prompt, out in zip(PROMPTS, outs):
        assert out["token_ids"] == reference_generate(oracle, runner.ends.encode_prompt(prompt), 10), prompt


def test_soft_prompt_gradient_matches_autograd_through_transformers(runner, oracle):
    ends = runner.ends
    batch = [(ends.encode_prompt("Is the sky blue?"), ends.encode(" Yes.")),
             (ends.encode_prompt("Which is larger, a mouse or an elephant?"), ends.encode(" An elephant."))]
    prompt = torch.randn(5, ends.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    loss, grad = loss_and_grad(ends, runner.chain, prompt, batch)
    ref_prompt = prompt.clone().requires_grad_(True)
    total, count = 0.0, 0
    for ctx, cont in batch:
        embeds = torch.cat([ref_prompt, oracle.get_input_embeddings()(torch.tensor(ctx + cont))])[None]
        logits = oracle(inputs_embeds=embeds).logits[0]
        start = ref_prompt.shape[0] + len(ctx) - 1
        lp = torch.log_softmax(logits[start:start + len(cont)], dim=-1)
        total = total - lp[torch.arange(len(cont)), torch.tensor(cont)].sum()
        count += len(cont)
    (total / count).backward()
    assert loss == pytest.approx((total / count).item(), rel=1e-5)
    assert (grad - ref_prompt.grad).norm() / ref_prompt.grad.norm() < 1e-4


def test_resident_and_spilled_streaming_give_the_same_numbers(model, runner):
    requests = [{"context": p, "continuation": " and then"} for p in PROMPTS]
    expected = [r["logprob"] for r in runner.score(requests)]
    with LocalRunner(model, keep_in_ram=True) as resident:
        assert [r["logprob"] for r in resident.score(requests)] == pytest.approx(expected, abs=1e-5)
        assert resident.generate(PROMPTS, Sampling(max_new_tokens=6)) == runner.generate(PROMPTS, Sampling(max_new_tokens=6))
    with LocalRunner(model, progress=False) as spilled:
        spilled.chain.executor.activation_budget = 0
        spilled.chain.max_batch_tokens = 16
        assert [r["logprob"] for r in spilled.score(requests)] == pytest.approx(expected, abs=1e-5)


def test_rotary_positions_skip_holes_in_the_mask(model):
    """A position with mask 0 (left padding, a rejected draft's hole) is not counted: the real tokens get the
    positions, and so the outputs, they have without it; chunked queries agree with one pass."""
    ck = Checkpoint(model)
    blocks = ResidentBlocks(ck, 0, ck.n_layer - 1, torch.float32)
    x = torch.randn(1, 7, ck.hidden_size, generator=torch.Generator().manual_seed(1))
    holed = torch.cat([x[:, :3], torch.randn(1, 2, ck.hidden_size), x[:, 3:]], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1]])
    plain = blocks.forward(x, torch.ones(1, 7, dtype=torch.long), 0, ck.n_layer - 1)
    with_holes = blocks.forward(holed, mask, 0, ck.n_layer - 1)
    # values reach ~60: fp32 summation order differs by ~1e-4 there (2e-6 of the largest, measured), so
    # the bound is relative to the largest value rather than each element's
    assert (with_holes[:, mask[0].bool()] - plain).abs().max() <= 1e-5 * plain.abs().max()
    blocks.score_budget = 1  # one query per chunk through a temporary cache
    assert (blocks.forward(holed, mask, 0, ck.n_layer - 1) - with_holes).abs().max() <= 1e-5 * with_holes.abs().max()


def test_int8_copy_of_the_family(model, runner, tmp_path):
    from slowllm.coordinator.jobs._fidelity import compare
    from slowllm.node.engine._quantize import quantize_checkpoint

    out = quantize_checkpoint(model, tmp_path / "int8", progress=False)
    ck = Checkpoint(out)
    assert ck.int8 and ck.fingerprint() == runner.fingerprint
    assert ck.read([ck.head_key])[ck.head_key].dtype == torch.int8  # the untied head too
    sequences = [runner.ends.encode_prompt(p) + runner.ends.encode(" and then the model said") for p in PROMPTS]
    with LocalRunner(model, dtype="bfloat16", progress=False) as original, \
            LocalRunner(out, dtype="bfloat16", progress=False) as int8, \
            LocalRunner(out, dtype="bfloat16", keep_in_ram=True) as resident:
        f = compare(original, int8, sequences)
        rounding = compare(runner, original, sequences)  # bf16 vs fp32: how sensitive this random model is
        # measured, int8 vs bf16 (bf16 vs fp32): gpt_neox mean 0.044 (0.021), max 0.14, top-1 97%; llama
        # 0.153 (0.064), max 0.63, top-1 82% (this tiny GQA model is 3x as sensitive as the others); Bloom's
        # int8 error was 2.4x its bf16 rounding too (transformers 4.45's llama config: 0.171 vs 0.073, max 0.89
        # vs 0.23). Bounds: 3.5x the rounding on average, 5x at the worst position.
        assert 0 < f.mean_abs_logprob_diff < 3.5 * rounding.mean_abs_logprob_diff, (f, rounding)
        assert f.max_abs_logprob_diff < 5 * rounding.max_abs_logprob_diff and f.top1_agreement >= 0.75, (f, rounding)
        assert int8.generate(PROMPTS, Sampling(max_new_tokens=5)) == resident.generate(PROMPTS, Sampling(max_new_tokens=5))


def test_swarm_matches_transformers_and_fails_over_mid_generation(model, runner, oracle, secret):
    """Two nodes cover the blocks, a third holds a replica of the second range: scores equal transformers',
    generation and tuning equal local mode's, and a SIGKILL of the busy replica mid-generation changes nothing."""
    with Cluster(model, ["0-2", "3-5", "3-5"], secret_file=secret) as c:
        client = c.client()
        check_scores(client.score(REQUESTS), reference_scores(oracle, runner.ends))
        status = client.status()
        assert status["family"] == runner.checkpoint.family.name
        assert f"({status['family']}): 6 blocks, 3 nodes" in run_cli("status", "--coordinator", c.url, "--secret-file",
                                                                        str(secret)).stdout
        sampling = Sampling(max_new_tokens=8)
        assert [g["token_ids"] for g in client.generate(PROMPTS, sampling)] == \
            [g["token_ids"] for g in runner.generate(PROMPTS, sampling)]
        options = TuneOptions(prompt_tokens=4, steps=2, lr=0.05, batch_size=2, seed=3)
        assert torch.allclose(client.tune(TUNE_DATA, options), runner.tune(TUNE_DATA, options), atol=1e-4)

        long = Sampling(max_new_tokens=120)
        expected = runner.generate(PROMPTS[:2], long)
        started, out = threading.Event(), {}

        def generate():
            out["value"] = client.generate(PROMPTS[:2], long, on_text=lambda i, t: started.set())
        thread = threading.Thread(target=generate)
        thread.start()
        assert started.wait(60)
        deadline = time.time() + 10
        while not (busy := [n for n in client.status()["nodes"] if n["sessions"] and n["layers"][0] == 3]):
            assert time.time() < deadline
        c.nodes[busy[0]["name"]].kill()
        thread.join(120)
        assert out["value"] == expected
        assert client.status()["failovers"] >= 1


def test_openai_api_serves_a_llama_with_its_own_chat_template(models_dir, tmp_path):
    """`slowllm serve` on a Llama checkpoint: completions are the local runner's, and chat uses the template
    that the checkpoint's tokenizer_config.json ships (with `bos_token`, never a second BOS)."""
    import json
    import shutil

    import openai

    from test_http import start_serve

    model = shutil.copytree(family_model(models_dir, "llama"), tmp_path / "llama-chat")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    proc, url = start_serve(model)
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        with LocalRunner(model, keep_in_ram=True) as local:
            got = client.completions.create(model="llama-chat", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
            want = local.generate(PROMPTS[:2], Sampling(max_new_tokens=6))
            assert [c.text for c in got.choices] == [w["text"] for w in want]
            assert got.usage.prompt_tokens == sum(len(local.ends.encode_prompt(p)) for p in PROMPTS[:2])  # + BOS
            chat = client.chat.completions.create(model="llama-chat", temperature=0, max_tokens=6,
                                                  messages=[{"role": "user", "content": "Is the sky blue?"}])
            rendered = "<s><|user|> Is the sky blue?\n<|assistant|>"
            assert local.ends.encode_prompt(rendered).count(1) == 1
            assert chat.choices[0].message.content == local.generate([rendered], Sampling(max_new_tokens=6))[0]["text"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_demo_runs_a_llama_end_to_end(tmp_path):
    proc = run_cli("demo", "--family", "llama", "--workdir", str(tmp_path), timeout=600, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "family llama" in proc.stdout and "demo passed" in proc.stdout and "identical" in proc.stdout
    assert Checkpoint(tmp_path / "llama-tiny").family.name == "llama"


def test_readme_table_of_models_is_computed_from_the_node_formula():
    from pathlib import Path

    from slowllm.node.engine._memory import family_table

    root = Path(__file__).parents[1]
    table = family_table()
    assert table in (root / "docs" / "families.md").read_text(), \
        "docs/families.md's table of models per family drifted from slowllm.node.engine._memory.family_table"
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    pcs = {name: (row[5], row[7]) for name, row in rows.items()}  # PCs in bf16, in int8
    assert pcs["EleutherAI/gpt-neox-20b"][0] == "4" and pcs["meta-llama/Llama-3.1-70B"] == ("14", "7")
    assert pcs["meta-llama/Llama-3.1-405B"] == ("126", "42")  # as deploy/GUIDE.md quotes them
    assert "GPT-NeoX-20B: 4 PCs" in (root / "deploy" / "GUIDE.md").read_text()


def test_speculative_rounds_leave_holes_that_rotary_positions_skip(models_dir):
    """A Llama big model and its draft (`make_draft_pair`): rows of one batch accept different numbers of
    drafted tokens, leaving holes in the mask; greedy output stays the plain model's, streamed and resident."""
    import dataclasses

    from slowllm.coordinator import make_draft_pair

    big, draft = make_draft_pair(models_dir / "spec-llama-big", models_dir / "spec-llama-draft",
                                 tiny_config(family="llama", std=0.5), draft_layers=2, damping=0.04)
    greedy = Sampling(max_new_tokens=16)
    for keep_in_ram in (False, True):
        with LocalRunner(big, keep_in_ram=keep_in_ram, progress=False) as plain, \
                LocalRunner(big, keep_in_ram=keep_in_ram, progress=False, draft_model=draft) as spec:
            expected = [r["token_ids"] for r in plain.generate(PROMPTS, greedy)]
            spec.draft = dataclasses.replace(spec.draft, tokens=4, adaptive=False)
            got = spec.generate(PROMPTS, greedy)
            assert [r["token_ids"] for r in got] == expected
            assert len({r["accepted"] for r in got}) > 1 and sum(r["accepted"] for r in got) > 0  # holes were made


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_with_a_sliding_window_and_qwen2_match_transformers(family, models_dir):
    """The two other rotary families, locally: Mistral with a sliding window shorter than the prompts (the
    window goes into slowllm's mask), Qwen2 with its biased q/k/v projections and a head tied to the
    embedding (as the small Qwen2.5 and Llama-3.2 models have)."""
    window = {"sliding_window": 6} if family == "mistral" else {"tie_word_embeddings": True}
    path = models_dir / f"family-{family}"
    if not (path / "config.json").is_file():
        make_checkpoint(path, tiny_config(family=family, **window), seed=0)
    oracle = AutoModelForCausalLM.from_pretrained(path).float().eval()
    with LocalRunner(path, progress=False) as runner:
        assert runner.checkpoint.family.name == family
        tied = runner.checkpoint.head_key == runner.checkpoint.embedding_key
        assert tied == (family == "qwen2")
        check_scores(runner.score(REQUESTS), reference_scores(oracle, runner.ends))
        outs = runner.generate(PROMPTS, Sampling(max_new_tokens=8))
        for prompt, out in zip(PROMPTS, outs):
            assert out["token_ids"] == reference_generate(oracle, runner.ends.encode_prompt(prompt), 8), prompt
        assert len({tuple(o["token_ids"]) for o in outs}) == len(PROMPTS)


@pytest.mark.parametrize("family,kv_heads", [("gpt_neox", None), ("llama", 4), ("llama", 2)])
def test_bf16_decode_steps_take_the_attention_that_is_faster_with_the_same_numbers(family, kv_heads, models_dir,
                                                                                    monkeypatch):
    """The rotary families call transformers' sdpa, except single-query-per-key-head steps (decode, up to 8
    new positions) in bf16 where oneDNN computes it: there the family's own eager attention, 3-6x faster
    (node/engine/_attention.py). Grouped keys (Llama's 4 heads on 2), prompts and fp32 stay on sdpa. The
    calls are counted; a prompt and decode steps through the caches are as close to the fp32 truth (all
    positions at once) as with sdpa alone."""
    import sys

    from slowllm.node.engine import _attention
    from slowllm.node.engine._blocks import BlockCache

    extra = {} if kv_heads is None else {"num_key_value_heads": kv_heads}
    path = make_checkpoint(models_dir / f"attention-{family}-{kv_heads}",
                           tiny_config(n_layer=2, hidden=64, n_head=4, family=family, **extra), seed=8)
    truth_blocks = ResidentBlocks(Checkpoint(path), 0, 1, torch.float32)
    blocks = ResidentBlocks(Checkpoint(path), 0, 1, torch.bfloat16)
    gen = torch.Generator().manual_seed(8)
    hidden = 3 * torch.randn(2, 14, 64, generator=gen)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    truth = truth_blocks.forward(hidden, mask, 0, 1)
    modeling = sys.modules[type(blocks.blocks[0]).__module__]
    calls = {"sdpa": 0, "eager": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(_attention, "sdpa_attention_forward", counted("sdpa", _attention.sdpa_attention_forward))
    monkeypatch.setattr(modeling, "eager_attention_forward", counted("eager", modeling.eager_attention_forward))

    def error(runner) -> float:
        caches = {layer: BlockCache() for layer in range(2)}
        outs = [runner.forward(hidden[:, :10].to(runner.dtype), mask[:, :10], 0, 1, caches)]  # > 8 positions
        for t in range(10, 14):
            outs.append(runner.forward(hidden[:, t:t + 1].to(runner.dtype), mask[:, :t + 1], 0, 1, caches))
        return (torch.cat(outs, 1).float() - truth).abs().max().item()

    chosen = error(blocks)
    mha = kv_heads in (None, 4)
    eager_here = mha and _attention.onednn_attention(torch.bfloat16, torch.device("cpu"))
    # per block: the prompt, then 4 decode steps
    assert calls == ({"sdpa": 2, "eager": 8} if eager_here else {"sdpa": 10, "eager": 0}), calls
    calls.update(sdpa=0, eager=0)
    error(truth_blocks)  # fp32: sdpa throughout
    assert calls == {"sdpa": 10, "eager": 0}, calls
    monkeypatch.setattr(_attention, "eager_pays", lambda *args: False)
    sdpa_only = error(blocks)
    scale = truth.abs().max()
    assert chosen < 0.03 * scale and chosen <= 1.5 * sdpa_only + 1e-3 * scale, (chosen, sdpa_only)
