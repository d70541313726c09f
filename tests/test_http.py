"""The OpenAI-compatible HTTP API, exercised with the official `openai` package against live servers:
`slowllm serve --local` and a coordinator with nodes (`--http-port`); lm-evaluation-harness's
`local-completions` against it, compared with lm-eval's own `hf` model."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest

from netutil import Cluster, free_port
from slowllm.coordinator import LocalRunner, Sampling, make_checkpoint, tiny_config

PROMPT = "Once upon a time there was a researcher"


@pytest.fixture(scope="module")
def model(models_dir):
    """Context-sensitive (std 0.5): different prompts give different continuations."""
    return make_checkpoint(models_dir / "http-model", tiny_config(n_layer=4, hidden=64, n_head=4, std=0.5), seed=5)


@pytest.fixture(scope="module")
def local(model):
    with LocalRunner(model, keep_in_ram=True) as r:
        yield r


def start_serve(model, *extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slowllm.coordinator.cli._main", "serve", "--local", "--model", str(model),
                             "--keep-in-ram", "--port", str(port), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "ready at http://" in line, line + proc.stdout.read()
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # keep the pipe drained
    return proc, re.search(r"(http://\S+)", line).group(1)


@pytest.fixture(scope="module")
def served(model):
    proc, url = start_serve(model)
    yield openai.OpenAI(base_url=url, api_key="none", max_retries=0), url
    proc.terminate()
    proc.wait(10)


def test_completions_equal_slowllm_generate(served, local):
    client, _ = served
    want = local.generate([PROMPT, "Is the sky blue?"], Sampling(max_new_tokens=12))
    got = client.completions.create(model="http-model", prompt=[PROMPT, "Is the sky blue?"], max_tokens=12,
                                    temperature=0)
    assert [c.text for c in got.choices] == [w["text"] for w in want]
    assert got.usage.completion_tokens == sum(len(w["token_ids"]) for w in want)
    # token-id prompts: one list, and a list of lists
    ids = local.ends.encode(PROMPT)
    assert client.completions.create(model="http-model", prompt=ids, max_tokens=12, temperature=0).choices[0].text \
        == want[0]["text"]
    two = client.completions.create(model="http-model", prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert len(two.choices) == 2 and two.choices[0].text == want[0]["text"][:len(two.choices[0].text)]
    assert client.models.list().data[0].id == "http-model"


def test_streaming_chunks_concatenate_to_the_whole_text(served):
    client, _ = served
    whole = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="http-model", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 3  # flushed per token, not at the end
    assert chunks[-1].usage.completion_tokens == 16
    chat = list(client.chat.completions.create(model="http-model", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0, stream=True))
    whole_chat = client.chat.completions.create(model="http-model", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole_chat.choices[0].message.content


def test_chat_uses_the_documented_template(served, local):
    client, _ = served
    got = client.chat.completions.create(model="http-model", temperature=0, max_tokens=10, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is the sky blue?"}])
    want = local.generate(["Answer briefly.\n\nUser: Is the sky blue?\nAssistant:"], Sampling(max_new_tokens=10))
    assert got.choices[0].message.content == want[0]["text"]
    assert got.choices[0].message.role == "assistant" and got.object == "chat.completion"
    scored = client.chat.completions.create(model="http-model", temperature=0, max_tokens=5, logprobs=True,
                                            top_logprobs=2, messages=[{"role": "user", "content": "Is fire cold?"}])
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy: the likeliest token


def test_echo_logprobs_equal_slowllm_score(served, local):
    client, _ = served
    ctx, cont = local.ends.encode("Is the sky blue?"), local.ends.encode(" Yes, it is.")
    score = local.score([{"context": "Is the sky blue?", "continuation": " Yes, it is."}])[0]
    for max_tokens in (0, 1):  # 1: what lm-evaluation-harness sends
        got = client.completions.create(model="http-model", prompt=ctx + cont, max_tokens=max_tokens, echo=True,
                                        logprobs=2, temperature=0).choices[0]
        lps = got.logprobs.token_logprobs
        assert lps[0] is None and len(lps) == len(ctx) + len(cont) + max_tokens
        assert sum(lps[len(ctx):len(ctx) + len(cont)]) == pytest.approx(score["logprob"], abs=1e-4)
        greedy = all(lps[i] == max(got.logprobs.top_logprobs[i].values()) for i in range(len(ctx), len(ctx) + len(cont)))
        assert greedy == score["is_greedy"]
    plain = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=4, logprobs=3, temperature=0)
    entry = plain.choices[0].logprobs
    assert len(entry.tokens) == 4 and all(len(t) == 3 for t in entry.top_logprobs)
    assert all(lp == max(t.values()) for lp, t in zip(entry.token_logprobs, entry.top_logprobs))  # greedy


def test_stop_and_n(served, local):
    client, _ = served
    alone = local.generate([PROMPT], Sampling(max_new_tokens=16))[0]
    text, ids = alone["text"], alone["token_ids"]
    stop = text[5:8]
    # generation ends at the token that completes the stop string, streaming or not, and usage counts
    # the tokens generated, not max_tokens
    until = next(n for n in range(1, len(ids) + 1) if stop in local.ends.decode(ids[:n]))
    assert until < 16
    got = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == text[:text.find(stop)] and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == until
    streamed = list(client.completions.create(model="http-model", prompt=PROMPT, max_tokens=16, temperature=0,
                                              stop=stop, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == got.choices[0].text
    assert streamed[-1].usage.completion_tokens == until
    chat = client.chat.completions.create(model="http-model", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=16, temperature=0)
    words = chat.choices[0].message.content
    if len(words) > 6:
        cut = client.chat.completions.create(model="http-model", messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=16, temperature=0, stop=[words[4:6]])
        assert cut.choices[0].message.content == words[:words.find(words[4:6])]
        assert cut.usage.completion_tokens < chat.usage.completion_tokens
    many = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=8, temperature=1.0, n=4, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and len({c.text for c in many.choices}) > 1
    again = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=8, temperature=1.0, n=4, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # --seed: reproducible


def test_errors_are_openai_error_objects(served):
    client, url = served
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    for bad in (dict(temperature=-1), dict(max_tokens=0), dict(prompt=[10 ** 6]), dict(n=100), dict(logprobs=50),
                dict(presence_penalty=1.0), dict(stop=["a", "b", "c", "d", "e"]), dict(seed=2 ** 80),
                dict(prompt="x " * 20000)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": "http-model", "prompt": "x", "max_tokens": 1, **bad})
        assert e.value.status_code == 400 and e.value.body["message"], bad
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/nothing")
    assert e.value.code == 404 and "error" in json.loads(e.value.read())
    assert client.completions.create(model="http-model", prompt="x", max_tokens=1).choices  # still serving


def test_keys(model, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice " + "a" * 32 + "\n")
    proc, url = start_serve(model, "--api-keys", str(keys))
    try:
        for key in ("none", "b" * 32):
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
            assert e.value.status_code == 401
        assert openai.OpenAI(base_url=url, api_key="a" * 32).models.list().data[0].id == "http-model"
    finally:
        proc.terminate()
        proc.wait(10)
    out = subprocess.run([sys.executable, "-m", "slowllm.coordinator.cli._main", "serve", "--local", "--model", str(model),
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "without keys" in out.stderr


def test_requests_that_arrive_together_share_passes_and_a_dropped_stream_stops(model, local, tmp_path):
    """In-process server: 6 concurrent requests run as one batch; a client that hangs up is stopped."""
    from slowllm.coordinator.api._app import make_app, server
    from slowllm.coordinator.api._backends import LocalBackend

    backend = LocalBackend(local, "http-model")
    jobs = []
    real_start = backend.start
    backend.start = lambda rows, s, soft: jobs.append(job := real_start(rows, s, soft)) or job
    app = make_app(backend, window=1.0)  # roomy: 6 threads start within it even on a busy machine
    port = free_port()
    http = server(app, "127.0.0.1", port, embedded=True)
    threading.Thread(target=http.run, daemon=True).start()
    while not http.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    want = local.generate([f"{i} {PROMPT}" for i in range(6)], Sampling(max_new_tokens=8))
    out = [None] * 6
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, client.completions.create(
        model="http-model", prompt=f"{i} {PROMPT}", max_tokens=8, temperature=0).choices[0].text)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [w["text"] for w in want]
    assert app.state.batcher.batches == 1 and len(jobs[0].rows) == 6
    # a request that arrives while another generates joins its next pass: it ends first
    order, long_started = [], threading.Event()

    def long_one():
        for chunk in client.completions.create(model="http-model", prompt=PROMPT, max_tokens=300, temperature=0,
                                               stream=True):
            long_started.set()
        order.append("long")

    thread = threading.Thread(target=long_one)
    thread.start()
    assert long_started.wait(30)
    short = client.completions.create(model="http-model", prompt="Is the sky blue?", max_tokens=3, temperature=0)
    order.append("short")
    assert not jobs[1].done  # the long one was still generating
    thread.join(120)
    assert order == ["short", "long"]
    assert short.choices[0].text == local.generate(["Is the sky blue?"], Sampling(max_new_tokens=3))[0]["text"]
    # a client that hangs up: its row stops at its next token
    stream = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=2000, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 30
    while not (len(jobs) == 4 and jobs[3].done) and time.time() < deadline:
        time.sleep(0.1)
    assert jobs[3].done and len(jobs[3].results()[0]["token_ids"]) < 2000
    http.should_exit = True
    # soft prompts by name, from --soft-prompts DIR
    import torch
    from slowllm.coordinator.jobs._softprompt import save_soft_prompt

    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    soft = torch.randn(3, 64) * 0.5
    save_soft_prompt(prompts_dir / "yes.safetensors", soft, local.fingerprint, "http-model")
    tuned = server(make_app(backend, soft_prompts=str(prompts_dir)), "127.0.0.1", port3 := free_port(), embedded=True)
    threading.Thread(target=tuned.run, daemon=True).start()
    while not tuned.started:
        time.sleep(0.05)
    with_soft = openai.OpenAI(base_url=f"http://127.0.0.1:{port3}/v1", api_key="x", max_retries=0)
    got = with_soft.completions.create(model="http-model", prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"soft_prompt": "yes"})
    assert got.choices[0].text == local.generate([PROMPT], Sampling(max_new_tokens=8), soft_prompt=soft)[0]["text"]
    assert got.choices[0].text != local.generate([PROMPT], Sampling(max_new_tokens=8))[0]["text"]
    for name in ("no", "../prompts/yes"):
        with pytest.raises(openai.NotFoundError):
            with_soft.completions.create(model="http-model", prompt=PROMPT, max_tokens=2, extra_body={"soft_prompt": name})
    tuned.should_exit = True
    # a full queue: 429 with Retry-After, as OpenAI's rate limits answer
    full = server(make_app(backend, max_pending=0), "127.0.0.1", port2 := free_port(), embedded=True)
    threading.Thread(target=full.run, daemon=True).start()
    while not full.started:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        openai.OpenAI(base_url=f"http://127.0.0.1:{port2}/v1", api_key="x", max_retries=0).completions.create(
            model="http-model", prompt="x", max_tokens=1)
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "5"
    full.should_exit = True


def test_through_the_swarm(model, local, secret, tmp_path):
    keys, bob = tmp_path / "clients.txt", tmp_path / "bob.key"
    keys.write_text("bob " + "c" * 32 + "\n")
    bob.write_text("bob " + "c" * 32 + "\n")
    port = free_port()
    with Cluster(model, [], secret_file=secret, client_secret_file=bob,
                 coordinator_args=["--http-port", str(port), "--client-keys", str(keys), "--wait-for-nodes", "1",
                                   "--max-jobs-per-client", "1"]) as c:
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="c" * 32, max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:  # 503: no node yet
            client.completions.create(model="http-model", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 503 and "blocks 0-3" in e.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="d" * 32, max_retries=0).models.list()
        c.start_node("0-1", name="a")
        c.start_node("2-3", name="b")
        c.wait_covered(2)
        want = local.generate([PROMPT], Sampling(max_new_tokens=10))[0]["text"]
        got = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=10, temperature=0)
        assert got.choices[0].text == want
        streamed = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
        assert "".join(x.choices[0].text for x in streamed if x.choices) == want
        ctx, cont = local.ends.encode("Is the sky blue?"), local.ends.encode(" Yes.")
        echo = client.completions.create(model="http-model", prompt=ctx + cont, max_tokens=0, echo=True, logprobs=1)
        score = local.score([{"context": "Is the sky blue?", "continuation": " Yes."}])[0]["logprob"]
        assert sum(echo.choices[0].logprobs.token_logprobs[len(ctx):]) == pytest.approx(score, abs=1e-4)
        models = client.models.list().data[0]
        assert models.model_extra["nodes"] == 2 and models.model_extra["missing"] == []
        # one admission for both front doors: HTTP requests count in /status.json and against the limits
        status_url = c.url.replace("ws://", "http://") + "/status.json"
        assert json.load(urllib.request.urlopen(status_url, timeout=10))["jobs_done"] == {"bob": 3}
        long = client.completions.create(model="http-model", prompt=PROMPT, max_tokens=400, temperature=0, stream=True)
        next(iter(long))  # bob's one job is running
        running = json.load(urllib.request.urlopen(status_url, timeout=10))
        assert running["active_jobs"] == 1 and running["jobs"][0]["user"] == "bob" and running["jobs"][0]["via"] == "http"
        with pytest.raises(openai.RateLimitError, match="1 of your jobs are already running"):
            client.completions.create(model="http-model", prompt=PROMPT, max_tokens=2)
        from slowllm.protocol import BusyError
        with pytest.raises(BusyError, match="1 of your jobs are already running"):
            c.client().generate(["Once"], Sampling(max_new_tokens=2))  # the WebSocket door, the same slot
        long.close()  # hanging up gives the slot back
        deadline = time.monotonic() + 60
        while json.load(urllib.request.urlopen(status_url, timeout=10))["active_jobs"]:
            assert time.monotonic() < deadline  # a hang guard
            time.sleep(0.1)


def test_lm_evaluation_harness_local_completions_matches_its_hf_model(model, tmp_path):
    """lm-eval's local-completions against `slowllm serve`, on a multiple-choice task written here as local
    JSON; its per-sample loglikelihoods equal lm-eval's own `hf` model on the same checkpoint."""
    data = tmp_path / "yesno.jsonl"
    data.write_text("".join(json.dumps({"question": q, "label": a}) + "\n" for q, a in [
        ("Is the sky blue?", 0), ("Is fire cold?", 1), ("Is water wet?", 0), ("Is ice hot?", 1)]))
    (tmp_path / "yesno.yaml").write_text(f"""task: slowllm_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
""")
    script = tmp_path / "run.py"
    script.write_text(f"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
url = sys.argv[1]
for which, args in (("local-completions", f"model=http-model,base_url={{url}}/completions,tokenizer={model},"
                                          "tokenizer_backend=huggingface,num_concurrent=1"),
                    ("hf", "pretrained={model},dtype=float32")):
    out = lm_eval.simple_evaluate(model=which, model_args=args, tasks=["slowllm_yesno"], log_samples=True,
                                  task_manager=TaskManager(include_path="{tmp_path}"), device="cpu", batch_size=1)
    print("RESULT " + which + " " + json.dumps([[r[0] for r in s["resps"]] for s in out["samples"]["slowllm_yesno"]]))
""")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "none"}
    proc, url = start_serve(model)
    try:
        out = subprocess.run([sys.executable, str(script), url], capture_output=True, text=True, timeout=600,
                             env=env, cwd=tmp_path)  # (one process: lm_eval's imports take seconds)
        lines = [ln.split(" ", 2) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        assert len(lines) == 2, out.stdout[-3000:] + out.stderr[-3000:]
        results = {which: json.loads(data) for _, which, data in lines}
    finally:
        proc.terminate()
        proc.wait(10)
    api, hf = results["local-completions"], results["hf"]
    assert len(api) == len(hf) == 4
    for a_doc, h_doc in zip(api, hf):
        for (a_lp, a_greedy), (h_lp, h_greedy) in zip(a_doc, h_doc):
            assert a_lp == pytest.approx(h_lp, abs=1e-4) and a_greedy == h_greedy


def _rss(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1)) * 1024


def _post(url: str, body: bytes, key: str | None, declared: int | None = None, chunks: int = 0):
    """(status, error object) of a POST over a raw socket: `declared` a Content-Length larger than what is
    sent, or `chunks` MB more of body after `body` (chunked); the answer is read without sending the rest,
    as a server that refuses early is entitled to."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    head = [f"POST {where.path}/completions HTTP/1.1", f"Host: {where.netloc}", "Content-Type: application/json"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    head.append(f"Content-Length: {declared or len(body)}" if not chunks else "Transfer-Encoding: chunked")
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            if chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(body), body))
                piece = b"x" * (1 << 20)
                for _ in range(chunks):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                sock.sendall(body)
        except OSError:
            pass  # the server answered and closed before taking it all: what we want to read
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + _length(reply):
            data = sock.recv(1 << 16)
            if not data:
                break
            reply += data
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


def _length(reply: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", reply.split(b"\r\n\r\n")[0], re.I)
    return int(found.group(1)) if found else 0


def test_big_bodies_and_prompts_are_refused_before_any_work(model, tmp_path):
    """No key: 401 from the headers, the body never read; a body over --max-request-bytes: 413 from its
    Content-Length or as it streams; a prompt longer than --max-prompt-tokens could ever hold: 400 before
    tokenizing. RSS stays bounded and /v1/models answers all along."""
    keys = tmp_path / "keys.txt"
    keys.write_text("alice " + "a" * 32 + "\n")
    proc, url = start_serve(model, "--api-keys", str(keys), "--max-prompt-tokens", "1000",
                            "--max-request-bytes", str(64 << 20))
    key = "a" * 32
    try:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        rest = _rss(proc.pid)
        start = b'{"model": "http-model", "prompt": "'
        status, err = _post(url, start, None, chunks=300)  # 300 MB without a key: never read
        assert status == 401 and err["code"] == "invalid_api_key"
        status, err = _post(url, start, key, chunks=300)  # with a key, over the body limit: 413 as it streams
        assert status == 413 and "--max-request-bytes" in err["message"], err
        status, err = _post(url, b"{}", key, declared=1 << 30)  # declared too large: 413 from the header
        assert status == 413
        # 8 MB one-word prompts, within the body limit: refused by their length before tokenization, while
        # /v1/models keeps answering
        answers = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                answers.append(client.models.list().data[0].id)
                time.sleep(0.05)
        poller = threading.Thread(target=poll)
        poller.start()
        for _ in range(3):
            body = json.dumps({"model": "http-model", "prompt": "y" * (8 << 20), "max_tokens": 1}).encode()
            status, err = _post(url, body, key)
            assert status == 400 and err["code"] == "context_length_exceeded", err
        stop.set()
        poller.join()
        assert answers and set(answers) == {"http-model"}
        assert _rss(proc.pid) - rest < 400 << 20  # nothing big was kept
        assert client.completions.create(model="http-model", prompt="x", max_tokens=1).choices  # still serving
    finally:
        proc.terminate()
        proc.wait(10)
