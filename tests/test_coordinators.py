"""No single point of failure: two coordinators of one swarm, nodes that serve both, and a client that
knows both. Each coordinator is killed with SIGKILL in the middle of a job: the client's generation
(greedy and seeded), scoring and tuning go on at the other one; the killed coordinator, restarted with the
same flags, has its nodes back within 10 s. Each node link proves its own coordinator's secret."""

import threading
import time

import pytest

from netutil import Cluster
from slowllm.coordinator import Client, LocalRunner, Sampling, TuneOptions
from slowllm.coordinator.client import _resume
from slowllm.protocol import SlowllmError, UnavailableError

PROMPT = "Once upon a time there was a researcher"
REQUESTS = [{"context": "The quick brown fox", "continuation": " jumps over the lazy dog"},
            {"context": "Is the sky blue?", "choices": [" Yes.", " No."]},
            {"context": "A long context " * 12, "continuation": " and its end"}] * 16
TUNE_DATA = [{"context": "Is the sky blue?", "continuation": " Yes."},
             {"context": "Is fire cold?", "continuation": " No."}]


def _kill_on_first(monkeypatch, state_class, cluster: Cluster, killed: list) -> None:
    """Kill `cluster`'s coordinator (SIGKILL) as soon as the client hears the first event of a job."""
    original = state_class.on_event

    def on_event(self, data):
        original(self, data)
        if not killed:
            killed.append(time.time())
            cluster.coordinator.kill()
    monkeypatch.setattr(state_class, "on_event", on_event)


def _restart(cluster: Cluster, nodes: int) -> None:
    """Restart the killed coordinator with the same flags: once it is up, every node is back within 10 s
    (their backoff is capped at ~4 s, jittered) with nothing else to do."""
    cluster.coordinator.wait()
    cluster.start_coordinator()
    cluster.wait_covered(nodes, timeout=10)


@pytest.mark.slow
def test_jobs_go_on_at_the_other_coordinator_when_theirs_is_killed(tiny_model, tmp_path, monkeypatch):
    secret_a, secret_b, clients, key = (tmp_path / n for n in ("a.txt", "b.txt", "clients.txt", "alice.key"))
    secret_a.write_text("node-secret-of-a-0123456789abcdef")
    secret_b.write_text("node-secret-of-b-0123456789abcdef")
    clients.write_text("alice alice-key-0123456789abcdef\n")  # one swarm: its coordinators share client keys
    key.write_text("alice alice-key-0123456789abcdef\n")
    args = dict(client_secret_file=key, coordinator_args=["--client-keys", str(clients)])
    with LocalRunner(tiny_model, progress=False) as local, \
            Cluster(tiny_model, [], secret_file=secret_a, **args) as a, \
            Cluster(tiny_model, [], secret_file=secret_b, **args) as b:
        for layers in ("0-2", "3-5"):  # each link with its own coordinator's secret
            a.start_node(layers, f"both-{layers}", secret_file=None, coordinators=[a.url, b.url],
                         extra=["--secret-file", str(secret_a), "--secret-file", str(secret_b)])
        # a node that has only a's secret serves a, and b refuses it: the links keep their secrets apart
        loner = a.start_node("0-5", "a-only", secret_file=None, coordinators=[a.url, b.url],
                             extra=["--secret-file", str(secret_a)])
        a.wait_covered(3)
        b.wait_covered(2)
        assert {n["name"] for n in b.client().status()["nodes"]} == {"both-0-2", "both-3-5"}
        assert any(n["joined"] for n in b.client().status()["nodes"])
        deadline = time.time() + 30
        while "keeps refusing this node" not in a.output(loner) and time.time() < deadline:
            time.sleep(0.2)
        assert "keeps refusing this node" in a.output(loner) and loner.poll() is None

        # a client that knows only a, mid-job when a dies, is told to retry (as before several coordinators)
        alone, started = {}, threading.Event()

        def lone_job():
            try:
                Client(a.url, secret_file=key).generate([PROMPT], Sampling(max_new_tokens=3000),
                                                        on_text=lambda i, text: started.set())
            except SlowllmError as e:
                alone["error"] = e
        lone = threading.Thread(target=lone_job)
        lone.start()
        assert started.wait(60)

        notices: list[str] = []
        client = Client([a.url, b.url], secret_file=key, on_notice=notices.append)
        for sampling in (Sampling(max_new_tokens=24), Sampling(max_new_tokens=24, temperature=1.0, top_k=20, seed=3)):
            killed: list = []
            _kill_on_first(monkeypatch, _resume.GenerateState, a, killed)
            want = local.generate([PROMPT, "Is the sky blue?"], sampling)
            client._at = 0  # start at a, every time
            got = client.generate([PROMPT, "Is the sky blue?"], sampling)
            assert killed and [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
            assert [r["text"] for r in got] == [r["text"] for r in want]
            _restart(a, 3)
            lone.join(30)
            assert isinstance(alone.get("error"), UnavailableError) and "retry" in str(alone["error"])
        assert any("goes on at " + b.url in n for n in notices)

        # scoring: only the lines b did not answer go to a; every value equals the uninterrupted run
        sent: list[int] = []
        original_rest = _resume.ScoreState.rest
        monkeypatch.setattr(_resume.ScoreState, "rest",
                            lambda self: sent.append(len(x.requests)) or x if (x := original_rest(self)) else x)
        killed = []
        _kill_on_first(monkeypatch, _resume.ScoreState, b, killed)
        client._at = 1  # this time b goes away
        # A job of ~1.7 s: its first lines stream out after 1 s (STREAM_LINES_S) and the kill lands while
        # the rest are computed. (A short job's lines all come at its end, with the result: written in
        # microseconds, they can all reach the client before the kill does, and nothing is left to resume.)
        lines = REQUESTS * 16
        got = client.score(lines)
        want = local.score(REQUESTS) * 16  # (the same lines again: equal within the tolerance below)
        assert killed and len(sent) == 1 and 0 < sent[0] < len(lines)
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for k in ("logprob", "logprobs"):
                if k in w:
                    assert g[k] == pytest.approx(w[k], abs=1e-4)
        _restart(b, 2)

        # tuning goes on from the prompt after the last step the client heard of
        steps: list[int] = []
        killed = []
        _kill_on_first(monkeypatch, _resume.TuneState, a, killed)
        client._at = 0
        notices.clear()
        prompt = client.tune(TUNE_DATA, TuneOptions(prompt_tokens=4, steps=4, lr=0.05, batch_size=2, seed=1),
                             on_step=lambda step, loss: steps.append(step))
        assert killed and steps == [1, 2, 3, 4] and prompt.shape[0] == 4
        assert any("at step 2 from the prompt after step 1" in n for n in notices), notices

        # with neither coordinator there, the client says so within its bound instead of hanging
        a.coordinator.kill()
        b.coordinator.kill()
        a.coordinator.wait()
        b.coordinator.wait()
        quick = Client([a.url, b.url], secret_file=key, resume_within=2)
        started = time.time()
        with pytest.raises(Exception, match="no coordinator of .* could finish the job within 2 s"):
            quick.status()
        assert time.time() - started < 15
