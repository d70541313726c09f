"""Speculative decoding: greedy output identical with and without a draft on every chain, speculative
sampling with the big model's distribution, adaptive draft length, rollback of every kind of cache.

The models: a big model whose last blocks barely write into the residual stream, and a draft that is the
big model without those blocks (`make_draft_pair`): their agreement is set by how much those blocks write.
"""

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch

from conftest import run_cli
from netutil import Cluster
from slowllm.coordinator import LocalRunner, Sampling, make_checkpoint, make_draft_pair, tiny_config
from slowllm.protocol import InputError

PROMPTS = ["Once upon a time there was a researcher", "Is the sky blue?", "The capital of France is Paris. The"]
GREEDY = Sampling(max_new_tokens=24)


@pytest.fixture(scope="module")
def pair(models_dir):
    """(big, draft) that agree on ~80% of greedy tokens (std 0.5: the big model's output depends on context)."""
    return make_draft_pair(models_dir / "spec-big", models_dir / "spec-draft",
                           tiny_config(n_layer=6, hidden=64, n_head=4, std=0.5), draft_layers=2, damping=0.04)


@pytest.fixture(scope="module")
def useless(models_dir):
    """A draft with the same tokenizer that agrees with nothing (other weights, other shape)."""
    return make_checkpoint(models_dir / "spec-useless", tiny_config(n_layer=2, hidden=32, n_head=4), seed=7)


def fixed(runner: LocalRunner, k: int = 4) -> LocalRunner:
    """Draft exactly k tokens per pass whatever the timing, so that rollback and holes are exercised."""
    runner.draft = dataclasses.replace(runner.draft, tokens=k, adaptive=False)
    return runner


def ids(results):
    return [r["token_ids"] for r in results]


def test_the_pair_agrees_as_built_and_the_big_model_depends_on_context(pair, useless):
    big, draft = pair
    with LocalRunner(big, keep_in_ram=True, draft_model=draft) as good, \
            LocalRunner(big, keep_in_ram=True, draft_model=useless) as bad:
        fixed(good), fixed(bad)
        got = good.generate(PROMPTS, GREEDY)
        kept = sum(r["accepted"] for r in got) / sum(r["drafted"] for r in got)
        assert kept > 0.6, kept  # measured 0.79
        worse = bad.generate(PROMPTS, GREEDY)
        assert sum(r["accepted"] for r in worse) / sum(r["drafted"] for r in worse) < 0.1
        assert all(len(set(r["token_ids"])) >= 6 for r in got), ids(got)  # not one repeated token
        assert len({tuple(r["token_ids"][:4]) for r in got}) == len(PROMPTS)


@pytest.mark.parametrize("keep_in_ram", [False, True], ids=["streaming", "resident"])
def test_greedy_output_is_identical_with_and_without_a_draft(pair, keep_in_ram):
    big, draft = pair
    with LocalRunner(big, keep_in_ram=keep_in_ram, progress=False) as plain, \
            LocalRunner(big, keep_in_ram=keep_in_ram, progress=False, draft_model=draft) as spec:
        expected = ids(plain.generate(PROMPTS, GREEDY))
        assert expected == [ids(plain.generate([p], GREEDY))[0] for p in PROMPTS]  # batching changes nothing
        for k in (1, 4, 7):
            got = fixed(spec, k).generate(PROMPTS, GREEDY)  # one batch: rows accept different numbers
            assert ids(got) == expected, k
            assert all(r["target_passes"] < len(r["token_ids"]) for r in got)
            # each pass gives its accepted drafts and one token of its own (but the last may stop at the limit)
            assert all(0 <= r["accepted"] + r["target_passes"] - len(r["token_ids"]) <= 1 for r in got)
            for p, want in zip(PROMPTS, expected):
                assert ids(spec.generate([p], GREEDY)) == [want]
        assert len({r["accepted"] for r in got}) > 1  # the rows kept different numbers: holes were made
        spec.draft = dataclasses.replace(spec.draft, tokens=4, adaptive=True)
        assert ids(spec.generate(PROMPTS, GREEDY)) == expected


def test_spilled_streaming_caches_are_rolled_back_too(pair):
    """With no activation budget every KV cache goes to disk between passes; rollback still applies."""
    big, draft = pair
    with LocalRunner(big, progress=False) as plain, LocalRunner(big, progress=False, draft_model=draft) as spec:
        expected = ids(plain.generate(PROMPTS, GREEDY))
        spec.chain.executor.activation_budget = 0
        assert ids(fixed(spec, 3).generate(PROMPTS, GREEDY)) == expected


def test_a_soft_prompt_applies_to_the_big_model_only(pair, tmp_path):
    big, draft = pair
    with LocalRunner(big, keep_in_ram=True) as plain, LocalRunner(big, keep_in_ram=True, draft_model=draft) as spec:
        soft = torch.randn(3, 64) * 0.5  # the big model's hidden size; the draft never sees it
        expected = ids(plain.generate(PROMPTS, GREEDY, soft_prompt=soft))
        assert expected != ids(plain.generate(PROMPTS, GREEDY))
        assert ids(fixed(spec).generate(PROMPTS, GREEDY, soft_prompt=soft)) == expected


def test_eos_and_max_new_tokens_end_a_round_early(pair):
    big, draft = pair
    with LocalRunner(big, keep_in_ram=True) as plain, LocalRunner(big, keep_in_ram=True, draft_model=draft) as spec:
        for n in (1, 2, 5):
            s = Sampling(max_new_tokens=n)
            want = plain.generate(PROMPTS, s)
            got = fixed(spec, 4).generate(PROMPTS, s)
            assert ids(got) == ids(want) and all(len(r["token_ids"]) == n for r in got)
        eos = plain.ends.eos_token_id
        plain.ends.eos_token_id = spec.ends.eos_token_id = ids(want)[0][3]  # a token it will draft
        try:
            want, got = plain.generate(PROMPTS, GREEDY), spec.generate(PROMPTS, GREEDY)
        finally:
            plain.ends.eos_token_id = spec.ends.eos_token_id = eos
        assert ids(got) == ids(want) and got[0]["finish_reason"] == "eos" == want[0]["finish_reason"]


def _chi2_critical(df: int, z: float = 3.29) -> float:
    """Wilson-Hilferty: the chi-square value exceeded with probability ~5e-4 (z = 3.29)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact(model_dir, prompt_ids: list[int], s: Sampling, depth: int) -> dict[tuple, float]:
    """P(first `depth` tokens) under `s` for the checkpoint, enumerated with transformers' BloomForCausalLM."""
    from conftest import hf_model
    from slowllm.coordinator.jobs._generate import probabilities

    model = hf_model(model_dir)
    dist = {(): 1.0}
    for _ in range(depth):
        seqs = list(dist)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + list(x) for x in seqs])).logits[:, -1].float()
        probs = probabilities(logits, s)
        nxt = {}
        for seq, row in zip(seqs, probs):
            for t in row.nonzero().squeeze(1).tolist():
                nxt[seq + (t,)] = dist[seq] * row[t].item()
        dist = nxt
    return dist


def _chi2(counts: Counter, expected: dict, n: int) -> tuple[float, int]:
    cells, small_obs, small_exp = [], 0, 0.0
    for key, p in expected.items():
        if p * n >= 5:
            cells.append((counts.get(key, 0), p * n))
        else:
            small_obs, small_exp = small_obs + counts.get(key, 0), small_exp + p * n
    small_obs += sum(c for key, c in counts.items() if key not in expected)  # impossible under `expected`
    cells.append((small_obs, max(small_exp, 1e-9)))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def test_speculative_sampling_has_the_big_models_distribution(models_dir):
    """4,000 samples of 3 tokens: a chi-square test against the big model's exact joint distribution passes;
    the draft sampling alone fails it (so the test can tell the two apart)."""
    big, draft = make_draft_pair(models_dir / "chi-big", models_dir / "chi-draft",
                                 tiny_config(n_layer=4, hidden=64, n_head=4), draft_layers=1, damping=0.6)
    s = Sampling(max_new_tokens=3, temperature=1.0, top_k=5)
    prompt = "Is the sky blue?"
    with LocalRunner(big, keep_in_ram=True, draft_model=draft) as spec, LocalRunner(draft, keep_in_ram=True) as small:
        prompt_ids = spec.ends.encode(prompt)
        exact_big, exact_draft = _exact(big, prompt_ids, s, 3), _exact(draft, prompt_ids, s, 3)
        assert sum(abs(exact_big.get(x, 0) - exact_draft.get(x, 0)) for x in exact_big | exact_draft) > 0.3
        fixed(spec, 2)
        samples, drafted = Counter(), Counter()
        for seed in range(8):
            rows = spec.generate([prompt] * 500, dataclasses.replace(s, seed=seed))
            samples.update(tuple(r["token_ids"]) for r in rows if len(r["token_ids"]) == 3)
            drafted.update(tuple(r["token_ids"]) for r in small.generate([prompt] * 500, dataclasses.replace(s, seed=seed))
                           if len(r["token_ids"]) == 3)
        assert sum(r["accepted"] for r in rows) > 0  # drafts were accepted, and some rejected
        assert sum(r["accepted"] for r in rows) < sum(r["drafted"] for r in rows)
        n = sum(samples.values())
        assert n > 3500  # (rows that hit EOS early are left out of the joint; the model rarely does)
        stat, df = _chi2(samples, exact_big, n)
        assert stat < _chi2_critical(df), (stat, df)
        stat_draft, df = _chi2(drafted, exact_big, sum(drafted.values()))
        assert stat_draft > 3 * _chi2_critical(df), (stat_draft, df)
        # reproducible with --seed
        again = spec.generate([prompt] * 20, dataclasses.replace(s, seed=3, max_new_tokens=8))
        assert ids(again) == ids(spec.generate([prompt] * 20, dataclasses.replace(s, seed=3, max_new_tokens=8)))


def test_a_useless_draft_soon_drafts_nothing(pair, useless):
    big, _ = pair
    with LocalRunner(big, progress=False, draft_model=useless) as spec:
        got = spec.generate(PROMPTS[:1], Sampling(max_new_tokens=48))[0]
        assert got["accepted"] <= 2
        assert got["drafted"] <= 24, got  # a few rounds of falling k, then a one-token probe per 16 passes
        assert got["target_passes"] >= 44


def test_a_draft_with_another_tokenizer_is_refused_in_one_sentence(pair, models_dir, tmp_path):
    big, _ = pair
    other = make_checkpoint(models_dir / "spec-other-vocab", tiny_config(n_layer=2, hidden=32, n_head=4, vocab_size=320))
    with pytest.raises(InputError, match="does not share the big model's tokenizer"):
        LocalRunner(big, draft_model=other)
    out = run_cli("generate", "Hi", "--local", "--model", str(big), "--draft-model", str(other))
    assert out.returncode == 2 and "does not share the big model's tokenizer" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_through_the_network_with_failover(pair, secret):
    """Coordinator with a draft and 2 nodes (plus a spare 3-5 node that dies mid-session): identical greedy
    output with and without the draft; the replay record forgets rolled-back positions."""
    big, draft = pair
    with LocalRunner(big, keep_in_ram=True) as plain:
        expected = ids(plain.generate(PROMPTS, GREEDY))
    with Cluster(big, ["0-2", "3-5"], secret_file=secret, coordinator_args=["--draft-model", str(draft)]) as c:
        client = c.client()
        got = client.generate(PROMPTS, GREEDY, draft_tokens=4)
        assert ids(got) == expected and all(r["target_passes"] < len(r["token_ids"]) for r in got)
        plain_remote = client.generate(PROMPTS, GREEDY, draft=False)
        assert ids(plain_remote) == expected and "target_passes" not in plain_remote[0]
        # a node that dies at its 5th request, mid-session: the session is replayed on the spare
        c.nodes["n1-3-5"].kill()
        c.nodes["n1-3-5"].wait()
        c.start_node("3-5", name="dies", extra=["--inject-fault", "exit:5"])
        c.start_node("3-5", name="spare")
        c.wait_covered(3)
        before = client.status()["failovers"]
        for _ in range(8):  # the router prefers the faster of the two: jobs until one has met the faulty node
            got = client.generate(PROMPTS, GREEDY, draft_tokens=3)
            assert ids(got) == expected
            if c.nodes["dies"].poll() is not None:
                break
        assert client.status()["failovers"] > before
        assert c.nodes["dies"].wait(10) == 137
        # the CLI: --json adds the speculative figures; --draft-model names a local draft only
        out = run_cli("generate", PROMPTS[0], "--max-new-tokens", "24", "--json", "--coordinator", c.url,
                      "--secret-file", str(secret))
        line = json.loads(out.stdout)
        assert out.returncode == 0 and line["token_ids"] == expected[0] and line["target_passes"] < 24
        out = run_cli("generate", PROMPTS[0], "--json", "--no-draft", "--coordinator", c.url, "--secret-file", str(secret))
        assert "target_passes" not in json.loads(out.stdout)
        out = run_cli("generate", "Hi", "--draft-model", str(draft), "--coordinator", c.url, "--secret-file", str(secret))
        assert out.returncode == 2 and "runs at the coordinator" in out.stderr


def test_asking_for_a_draft_where_there_is_none_says_so(tiny_model):
    with LocalRunner(tiny_model, keep_in_ram=True) as runner:
        assert "target_passes" not in runner.generate(["Hi"], Sampling(max_new_tokens=2))[0]
        with pytest.raises(InputError, match="no draft model"):
            runner.generate(["Hi"], Sampling(max_new_tokens=2), draft=True)
        with pytest.raises(InputError, match="--draft-tokens must be"):
            runner.generate(["Hi"], Sampling(max_new_tokens=2), draft_tokens=0)


def test_node_sessions_roll_back_only_what_they_hold():
    from slowllm.node.engine._blocks import BlockCache
    from slowllm.node.server._sessions import Sessions

    sessions = Sessions(1 << 30)
    caches = sessions.get("s", range(2, 4), position_bytes=0, new=5, max_length=16)
    for cache in caches.values():
        cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    sessions.truncate("s", range(2, 4), 3)
    assert sessions.past_length("s", 2) == 3 == sessions.past_length("s", 3)
    with pytest.raises(InputError, match="holds 3 positions here, it cannot be rolled back to 4"):
        sessions.truncate("s", range(2, 4), 4)
    with pytest.raises(InputError):
        sessions.truncate("gone", range(2, 4), 1)
    cache = BlockCache()
    cache.truncate(0)
    assert cache.length == 0


def test_lying_nodes_under_verify_1_never_change_speculative_output(pair, secret):
    """Drafted steps, rollbacks and trimmed replay records through --verify 1: a lying node that joins
    is caught by re-running its span's (trimmed) history, banned, and the output stays the big model's."""
    from adversaries import LyingNode

    big, draft = pair
    with LocalRunner(big, keep_in_ram=True) as plain:
        expected = ids(plain.generate(PROMPTS, GREEDY))
    with Cluster(big, ["0-2", "3-5"], secret_file=secret,
                 coordinator_args=["--verify", "1", "--draft-model", str(draft)]) as c:
        client = c.client()
        for lie in ("random", "nudge"):
            liar = LyingNode(c.url, secret.read_bytes().strip(), big, 0, 5, lie, name=lie).start()
            got = client.generate(PROMPTS, GREEDY)
            assert ids(got) == expected and all(r["target_passes"] < len(r["token_ids"]) for r in got), lie
            assert liar.answered >= 1 and next(n for n in client.status()["nodes"] if n["name"] == lie)["banned"]
