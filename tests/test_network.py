"""Coordinator and nodes as real processes on 127.0.0.1, talking real WebSockets."""

import asyncio
import sys
import threading
import time

import msgpack
import pytest
import torch
import websockets

from conftest import hf_logprob, hf_model, run_cli
from netutil import Cluster, accept_as_coordinator, connect_as
from slowllm.coordinator import LocalRunner, Sampling, TuneOptions
from slowllm.protocol import CloseSession, Forward, Job, Limits, SlowllmError, Step, Welcome, encode_tensor, pack

PROMPTS = ["The capital of", "Once upon a time there was a researcher", "Yes", "Bloom is a large language model"]
REQUESTS = [{"context": "The quick brown fox", "continuation": " jumps over the lazy dog"},
            {"context": "Is the sky blue?", "choices": [" Yes.", " No."]}]
TUNE_DATA = [{"context": "Is the sky blue?", "continuation": " Yes."},
             {"context": "Is fire cold?", "continuation": " No."}]


@pytest.fixture(scope="module", params=[["0-1", "2-3", "4-5"], ["0-3", "2-5", "0-5"]], ids=["split", "overlap"])
def cluster(request, tiny_model, secret):
    c = Cluster(tiny_model, request.param, secret_file=secret)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def local(tiny_model):
    with LocalRunner(tiny_model, progress=False) as r:
        yield r


def test_score_generate_tune_match_local_and_transformers(cluster, local, tiny_model):
    client = cluster.client()
    got = client.score(REQUESTS)
    model = hf_model(tiny_model)
    ref = hf_logprob(model, local.ends.encode(REQUESTS[0]["context"]), local.ends.encode(REQUESTS[0]["continuation"]))
    assert got[0]["logprob"] == pytest.approx(ref[0], abs=1e-4)
    assert got[1]["logprobs"] == pytest.approx(local.score(REQUESTS)[1]["logprobs"], abs=1e-4)

    remote_gen = client.generate(PROMPTS, Sampling(max_new_tokens=8))
    assert [g["token_ids"] for g in remote_gen] == [g["token_ids"] for g in local.generate(PROMPTS, Sampling(max_new_tokens=8))]

    options = TuneOptions(prompt_tokens=4, steps=3, lr=0.05, batch_size=2, seed=3)
    remote_prompt = client.tune(TUNE_DATA, options)
    local_prompt = local.tune(TUNE_DATA, options)
    assert torch.allclose(remote_prompt, local_prompt, atol=1e-4)


def test_streamed_text_and_status(cluster):
    pieces = []
    out = cluster.client().generate(["Once upon a time"], Sampling(max_new_tokens=6), on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == out[0]["text"]
    status = cluster.client().status()
    assert status["n_layer"] == 6 and status["missing"] == [] and len(status["nodes"]) == 3
    assert all(set(n) >= {"name", "layers"} for n in status["nodes"])


def test_eight_concurrent_clients_get_their_own_results(cluster, local):
    prompts = [f"Client number {i} says" for i in range(8)]
    expected = [local.generate([p], Sampling(max_new_tokens=5))[0]["token_ids"] for p in prompts]
    results, errors = [None] * 8, []

    def work(i):
        try:
            results[i] = cluster.client().generate([prompts[i]], Sampling(max_new_tokens=5))[0]["token_ids"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors and results == expected


def test_wrong_or_missing_secret_is_refused(cluster, tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("this-is-not-the-right-secret-at-all")
    from slowllm.coordinator import Client
    with pytest.raises(SlowllmError, match="authentication failed"):
        Client(cluster.url, secret_file=wrong).status()
    with pytest.raises(SlowllmError, match="requires a shared secret"):
        Client(cluster.url).status()
    proc = run_cli("status", "--coordinator", cluster.url, "--secret-file", str(wrong))
    assert proc.returncode == 2 and "authentication failed" in proc.stderr and "Traceback" not in proc.stderr
    # a node keeps retrying (the refusal could come from an impostor), saying why, and never registers
    node = cluster.start_node("0-1", name="intruder", secret_file=wrong)
    deadline = time.time() + 60
    while "authentication failed" not in cluster.output(node) and time.time() < deadline:
        time.sleep(0.5)
    assert node.poll() is None and "authentication failed" in cluster.output(node)
    assert "intruder" not in [n["name"] for n in cluster.client().status()["nodes"]]
    node.kill()




def test_malformed_frames_get_errors_and_the_server_stays_up(cluster, secret):
    secret_bytes = secret.read_bytes().strip()

    async def go():
        ws, channel = await connect_as(cluster.url, secret_bytes)
        replies = []
        for frame in [b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"type": "job", "id": "x"}),
                      msgpack.packb({"type": "nonsense"}), pack(Forward(id=1, first=0, last=0,
                      hidden=encode_tensor(torch.zeros(1, 2, 64)), mask=encode_tensor(torch.ones(1, 2, dtype=torch.long))))]:
            await ws.send(channel.seal(frame))  # authentic frames with bad contents
            replies.append(channel.unpack(await ws.recv(), Limits()))
        await ws.send(channel.pack(Job(id=9, job="score", params={"requests": [{"context": 1}]})))
        replies.append(channel.unpack(await ws.recv(), Limits()))
        await ws.close()
        return replies

    replies = asyncio.run(go())
    assert all(r.type == "error" and r.message for r in replies), replies
    assert "line 1" in replies[-1].message
    assert cluster.client().score(REQUESTS[:1])  # still serving


def test_oversized_frame_is_refused_without_harming_others(cluster, secret):
    secret_bytes = secret.read_bytes().strip()

    async def go():
        ws, _ = await connect_as(cluster.url, secret_bytes)
        try:
            await ws.send(b"\x00" * (300 << 20))
            await ws.recv()
        except websockets.ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None

    assert asyncio.run(go()) == 1009  # message too big
    assert cluster.client().status()["missing"] == []


def test_bad_requests_to_a_node_get_errors(cluster, secret):
    """Talk to a live node through a fake coordinator: wrong shapes, unknown sessions, blocks it lacks."""
    # Nodes dial out, so the test plays coordinator on its own port and lets a node connect to it.
    async def fake_coordinator():
        got = asyncio.get_running_loop().create_future()

        async def handler(ws):
            channel = await accept_as_coordinator(ws, secret.read_bytes().strip())
            channel.unpack(await ws.recv(), Limits())  # register
            await ws.send(channel.pack(Welcome()))
            h = lambda shape: encode_tensor(torch.zeros(*shape))  # noqa: E731
            m = lambda shape: encode_tensor(torch.ones(*shape, dtype=torch.long))  # noqa: E731
            probes = {
                "shape": Forward(id=1, first=0, last=1, hidden=h((1, 3, 65)), mask=m((1, 3))),
                "range": Forward(id=2, first=3, last=4, hidden=h((1, 3, 64)), mask=m((1, 3))),
                "session": CloseSession(id=3, session="nope"),
                "mask": Step(id=4, session="s1", first=0, last=1, hidden=h((1, 3, 64)), mask=m((1, 5))),
                "ok": Forward(id=5, first=0, last=1, hidden=h((1, 3, 64)), mask=m((1, 3))),
            }
            for msg in probes.values():
                await ws.send(channel.pack(msg))
            replies = {}
            while len(replies) < len(probes):
                r = channel.unpack(await ws.recv(), Limits())
                if r.type in ("result", "error"):
                    replies[r.id] = r
            got.set_result({k: replies[v.id] for k, v in probes.items()})
            await ws.close()

        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-1", "--coordinator",
                f"ws://127.0.0.1:{port}", "--model", cluster.model, "--secret-file", str(secret))
            try:
                return await asyncio.wait_for(got, 60)
            finally:
                proc.terminate()
                await proc.wait()

    replies = asyncio.run(fake_coordinator())
    assert replies["shape"].type == "error" and "64" in replies["shape"].message
    assert replies["range"].type == "error" and "serves 0-1" in replies["range"].message
    assert replies["session"].type == "error" and "unknown session" in replies["session"].message
    assert replies["mask"].type == "error" and "mask" in replies["mask"].message
    assert replies["ok"].type == "result"


def test_node_out_of_range_or_other_checkpoint_is_refused(cluster, other_model):
    bad = cluster.start_node("4-9", name="too-far", model=True)
    assert cluster.wait(bad, 60) == 2 and "outside" in cluster.output(bad)
    other = cluster.start_node("0-1", name="other", model=other_model)
    assert cluster.wait(other, 60) == 2 and "different checkpoint" in cluster.output(other)
    assert cluster.client().status()["missing"] == []


def test_remote_tuning_streams_each_steps_prompt_for_saving(cluster, local):
    """What `slowllm tune --save-every` and Ctrl-C rely on through a coordinator: every step's prompt."""
    seen = []
    options = TuneOptions(prompt_tokens=2, steps=3, lr=0.05, batch_size=2, seed=1)
    final = cluster.client().tune(TUNE_DATA, options, on_prompt=lambda step, prompt: seen.append((step, prompt)))
    assert [step for step, _ in seen] == [1, 2, 3]
    assert torch.equal(seen[-1][1], final) and not torch.equal(seen[0][1], final)
