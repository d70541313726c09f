"""Failures injected for real: nodes killed with SIGKILL, nodes that die or hang mid-request (the node's
--inject-fault), and more clients than the admission limits allow (a coordinator's restart: test_coordinators.py)."""

import random
import threading
import time

import psutil
import pytest

from netutil import Cluster
from slowllm.coordinator import LocalRunner, Sampling, TuneOptions
from slowllm.protocol import BusyError, SlowllmError

PROMPT = "Once upon a time there was a researcher"
REQUESTS = [{"context": "The quick brown fox", "continuation": " jumps over the lazy dog"},
            {"context": "Is the sky blue?", "choices": [" Yes.", " No."]}]
TUNE_DATA = [{"context": "Is the sky blue?", "continuation": " Yes."},
             {"context": "Is fire cold?", "continuation": " No."}]
TUNE = TuneOptions(prompt_tokens=4, steps=2, lr=0.05, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def local(tiny_model):
    with LocalRunner(tiny_model, progress=False) as r:
        yield r


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # handed to the test
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.slow
def test_kill_9_a_node_mid_generation_4_times(tiny_model, secret, local):
    sampling = Sampling(max_new_tokens=300)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    rng = random.Random(0)
    with Cluster(tiny_model, ["0-2", "3-5", "0-2", "3-5"], secret_file=secret) as c:
        client = c.client()
        for run in range(4):  # (20, then 6 before: the suite's longest test; test_families kills mid-generation too)
            started = threading.Event()
            before = client.status()["failovers"]
            thread, out = _in_thread(lambda: client.generate([PROMPT], sampling, on_text=lambda i, t: started.set()))
            assert started.wait(60)
            busy = [n for n in client.status()["nodes"] if n["sessions"]]
            victim = rng.choice(busy)
            c.nodes[victim["name"]].kill()  # SIGKILL, mid-generation
            thread.join(120)
            assert "error" not in out, out.get("error")
            assert out["value"][0]["token_ids"] == expected, f"run {run}"
            assert client.status()["failovers"] > before, f"run {run}: the kill landed after the generation"
            first, last = victim["layers"]
            c.start_node(f"{first}-{last}", name=victim["name"])
            c.wait_covered(4)


def test_a_node_dying_mid_request_during_scoring_tuning_and_generation(tiny_model, secret, local):
    """The whole-model node dies on a request; its blocks continue on two smaller nodes."""
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret) as c:
        client = c.client()
        c.start_node("0-5", name="dies-on-forward", extra=["--inject-fault", "exit:1"])
        c.wait_covered(3)
        got = client.score(REQUESTS)
        assert got[0]["logprob"] == pytest.approx(local.score(REQUESTS)[0]["logprob"], abs=1e-4)
        assert c.nodes["dies-on-forward"].wait(10) == 137

        c.start_node("0-5", name="dies-on-backward", extra=["--inject-fault", "exit:2"])
        c.wait_covered(3)
        prompt = client.tune(TUNE_DATA, TuneOptions(prompt_tokens=4, steps=1, lr=0.05, batch_size=2, seed=3))
        assert c.nodes["dies-on-backward"].wait(10) == 137
        reference = local.tune(TUNE_DATA, TuneOptions(prompt_tokens=4, steps=1, lr=0.05, batch_size=2, seed=3))
        assert (prompt - reference).abs().max() < 1e-4  # the step was applied once, completely

        c.start_node("0-5", name="dies-mid-session", extra=["--inject-fault", "exit:6"])
        c.wait_covered(3)
        out = client.generate([PROMPT], Sampling(max_new_tokens=12))
        assert c.nodes["dies-mid-session"].wait(10) == 137
        assert out[0]["token_ids"] == local.generate([PROMPT], Sampling(max_new_tokens=12))[0]["token_ids"]


def test_no_replacement_fails_clearly_and_a_late_node_resumes_the_job(tiny_model, secret, local):
    sampling = Sampling(max_new_tokens=12)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    # each cluster starts covered (0-2 and 0-5), then 0-5 is replaced by a 3-5 node that dies mid-job
    with Cluster(tiny_model, ["0-2", "0-5"], secret_file=secret, coordinator_args=["--wait-for-nodes", "3"]) as c:
        c.nodes["n1-0-5"].kill()
        c.nodes["n1-0-5"].wait()
        c.start_node("3-5", name="doomed", extra=["--inject-fault", "exit:4"])
        c.wait_covered(2)
        start = time.time()
        with pytest.raises(SlowllmError, match=r"no node serves blocks 3-5 .*start nodes covering them"):
            c.client().generate([PROMPT], sampling)
        assert time.time() - start >= 3

    with Cluster(tiny_model, ["0-2", "0-5"], secret_file=secret, coordinator_args=["--wait-for-nodes", "60"]) as c:
        c.nodes["n1-0-5"].kill()
        c.nodes["n1-0-5"].wait()
        c.start_node("3-5", name="doomed", extra=["--inject-fault", "exit:4"])
        c.wait_covered(2)
        thread, out = _in_thread(lambda: c.client().generate([PROMPT], sampling))
        assert c.nodes["doomed"].wait(30) == 137
        time.sleep(1)
        assert thread.is_alive()  # waiting for blocks 3-5
        c.start_node("3-5", name="late")
        thread.join(60)
        assert "error" not in out, out.get("error")
        assert out["value"][0]["token_ids"] == expected


def test_a_hung_node_is_timed_out_and_others_are_unaffected(tiny_model, secret, local):
    sampling = Sampling(max_new_tokens=10)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret, coordinator_args=["--request-timeout", "3"]) as c:
        # it hangs from its first request on: whichever job the router sends there first must fail over
        c.start_node("0-5", name="hangs", extra=["--inject-fault", "hang:1"])
        c.wait_covered(3)
        client = c.client()
        gen_thread, gen = _in_thread(lambda: client.generate([PROMPT], sampling))
        score_thread, score = _in_thread(lambda: client.score(REQUESTS))
        gen_thread.join(60)
        score_thread.join(60)
        assert "error" not in gen and "error" not in score, (gen.get("error"), score.get("error"))
        assert gen["value"][0]["token_ids"] == expected
        assert score["value"][0]["logprob"] == pytest.approx(local.score(REQUESTS)[0]["logprob"], abs=1e-4)
        status = client.status()
        hung = next(n for n in status["nodes"] if n["name"] == "hangs")
        assert hung["failures"] >= 1 and status["failovers"] >= 1
        # the router now avoids the hung node: a new job does not wait for the timeout again
        start = time.time()
        assert client.generate([PROMPT], sampling)[0]["token_ids"] == expected
        assert time.time() - start < 3


@pytest.mark.slow
def test_32_concurrent_sessions_with_admission_control(tiny_model, secret, local):
    prompts = [f"Client {i} says that" for i in range(32)]
    sampling = Sampling(max_new_tokens=8)
    expected = [local.generate([p], sampling)[0]["token_ids"] for p in prompts]
    with Cluster(tiny_model, ["0-1", "2-3", "4-5"], secret_file=secret,
                 coordinator_args=["--max-jobs-per-client", "8"], node_args=["--session-memory", "64MB"]) as c:
        busy = []

        def one(i):
            while True:
                try:
                    return c.client().generate([prompts[i]], sampling)[0]["token_ids"]
                except BusyError as e:
                    busy.append(str(e))
                    time.sleep(0.2)

        runs = [_in_thread(lambda i=i: one(i)) for i in range(32)]
        for thread, _ in runs:
            thread.join(300)
        assert [out.get("value") for _, out in runs] == expected
        assert busy and all("retry" in b for b in busy)
        for name, proc in c.nodes.items():
            assert psutil.Process(proc.pid).memory_info().rss < 2 << 30, name
