"""Jobs cut to fit the wire, bounded memory at the nodes, cancellation (real processes on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
import torch
import websockets
from netutil import Cluster, accept_as_coordinator, connect_as

from slowllm.coordinator import LocalRunner, Sampling, TuneOptions, make_checkpoint, tiny_config
from slowllm.coordinator.demo._tiny import CORPUS
from slowllm.protocol import (Event, Forward, InputError, Job, Limits, Register, SlowllmError, Welcome, encode_tensor,
                              pack, peek, unpack)

MB = 1 << 20
LONG = " ".join(CORPUS.split() * 8)  # ~1,000 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def wide_model(models_dir):
    """Hidden 512: 4 KB a token on the wire, so a 1 MB message holds ~240 tokens of a forward."""
    path = models_dir / "wide"
    if not (path / "config.json").is_file():
        make_checkpoint(path, tiny_config(n_layer=4, hidden=512, n_head=8), seed=5)
    return path


@pytest.fixture(scope="module")
def wide_local(wide_model):
    with LocalRunner(wide_model, progress=False) as r:
        yield r


def _requests(local):
    rows = [{"context": f"Line {i}: " + CORPUS.split(".")[i % 8], "continuation": " Yes, indeed."} for i in range(48)]
    rows.append({"context": LONG, "continuation": " The end."})  # longer than one forward message
    rows.append({"context": "Is the sky blue?", "choices": [" Yes.", " No."]})
    assert len(local.ends.encode(LONG)) > 400
    return rows


def test_jobs_larger_than_a_1mb_message_match_local_mode(wide_model, wide_local):
    requests = _requests(wide_local)
    prompts = [LONG[:2500], "Once upon a time"]
    with Cluster(wide_model, ["0-1", "2-3"], coordinator_args=["--max-message-size", "1MB"]) as c:
        client = c.client()
        assert client.status()["max_message_size"] == MB
        remote = client.score(requests)
        sampling = Sampling(max_new_tokens=6)
        generated = client.generate(prompts, sampling)
        # a tuning example longer than one message can carry: one sentence, before anything is sent
        with pytest.raises(InputError, match=r"line 1: \d+ tokens plus the prompt are more than one request"):
            client.tune([{"context": LONG, "continuation": " x"}], TuneOptions(steps=1))
        assert client.status()["active_jobs"] == 0
    local = wide_local.score(requests)
    for r, l in zip(remote, local):
        if "logprob" in r:
            assert r["logprob"] == pytest.approx(l["logprob"], abs=1e-3) and r["is_greedy"] == l["is_greedy"]
        else:
            assert r["logprobs"] == pytest.approx(l["logprobs"], abs=1e-3)
    assert [g["token_ids"] for g in generated] == [g["token_ids"] for g in wide_local.generate(prompts, sampling)]


@pytest.mark.slow
def test_failover_replay_larger_than_the_message_limit(wide_model, wide_local):
    """The session's node dies after the prompt; its ~1,000 positions are replayed in several frames."""
    prompt, sampling = LONG[:2500], Sampling(max_new_tokens=8)
    expected = wide_local.generate([prompt], sampling)[0]["token_ids"]
    with Cluster(wide_model, [], coordinator_args=["--max-message-size", "1MB"]) as c:
        # dies at its 4th request: the prompt took two frames, so this is the second generated token
        c.start_node("0-3", name="faulty", extra=["--inject-fault", "exit:4"])
        c.wait_covered(1)
        out = {}
        job = threading.Thread(target=lambda: out.update(ids=c.client().generate([prompt], sampling)[0]["token_ids"]))
        job.start()
        c.start_node("0-3", name="spare")  # registers while the job waits for blocks 0-3
        job.join(180)
        status = c.client().status()
    assert out.get("ids") == expected
    assert status["failovers"] >= 1 and status["replayed_bytes"] > MB  # more than one message's worth


# ---- bounded memory at the nodes ------------------------------------------------------------------
RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from slowllm.node import Checkpoint, ResidentBlocks
    model, length = sys.argv[1], int(sys.argv[2])
    blocks = ResidentBlocks(Checkpoint(model), 0, 1, torch.float32, score_budget=16 << 20)
    def hwm():
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
    x = torch.randn(1, 64, 512)
    blocks.forward(x, torch.ones(1, 64, dtype=torch.long), 0, 1)  # warm up allocator and kernels
    base = hwm()
    x = torch.randn(1, length, 512)
    blocks.forward(x, torch.ones(1, length, dtype=torch.long), 0, 1)
    print(hwm() - base)
""")


@pytest.mark.slow
def test_node_attention_memory_grows_linearly_with_the_prompt(wide_model):
    def growth(length: int) -> int:
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(wide_model), str(length)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    small, large = growth(2048), growth(4096)
    # Unchunked, 8 heads x 4096^2 fp32 scores (x5 copies) would be 2.7 GB, four times the 2k figure;
    # chunked it is activations and the key/value cache: linear, with some allocator slack.
    assert large < 300 * MB, large
    assert large < 3.0 * max(small, 8 * MB), (small, large)


def test_session_budget_errors_and_idle_expiry(monkeypatch):
    from slowllm.node import BlockCache
    from slowllm.node.server._sessions import Sessions
    from slowllm.protocol import BusyError

    s = Sessions(budget=1000, idle_timeout=60)  # 2 blocks, 4 bytes per position and block (keys + values)
    caches = s.get("a", range(2), position_bytes=4, new=75, max_length=100)  # (prompt + room: 100 positions)
    caches[0] = BlockCache(torch.zeros(1, 75, 1), torch.zeros(1, 75, 1))  # 2 x 300 bytes held
    with pytest.raises(BusyError, match="KV-cache budget of 1000 B is full"):
        s.get("b", range(2), position_bytes=4, new=75, max_length=100)
    with pytest.raises(InputError, match="more than its --session-memory"):
        s.get("c", range(2), position_bytes=4, new=250, max_length=250)  # can never fit: not "busy"
    later = time.monotonic() + 61
    monkeypatch.setattr(time, "monotonic", lambda: later)
    s.expire()
    assert len(s) == 0 and s.nbytes() == 0
    assert s.get("b", range(2), position_bytes=4, new=75, max_length=100) is not None


def test_session_budget_counts_what_is_allocated_spare_room_and_copies_included():
    """A prompt pass reserves room for the first decode steps, caches grow by half when full and copy
    when they grow: the budget holds the bytes allocated, the new buffer beside the old while copying, and
    spare room never passes max_length."""
    from slowllm.node import BlockCache
    from slowllm.node.server._sessions import Sessions
    from slowllm.protocol import BusyError

    position = 2 * 4 * 4  # keys and values, 4 numbers of fp32, per position and block
    budget = 3 * 300 * position  # two blocks of 300 positions, and room to copy one while it grows
    s = Sessions(budget=budget)
    layers = range(2)

    def step(session, new, max_length):
        caches = s.get(session, layers, position, new, max_length)
        for cache in caches.values():
            cache.update(torch.zeros(1, 1, new, 4), torch.zeros(1, 1, new, 4), 0)
        return caches

    peak = 0
    caches = step("long", 100, 300)  # a prompt pass, then decode steps up to the session's max length
    for _ in range(200):
        held = s.nbytes()
        for c in caches.values():  # block by block, as a step runs them: old and new buffer side by side
            if c.capacity_for(1) != c.capacity:
                peak = max(peak, held + c.capacity_for(1) * position)
                held += (c.capacity_for(1) - c.capacity) * position
        step("long", 1, 300)
    assert all(c.length == 300 and c.capacity == 300 for c in caches.values())  # room capped at max_length
    assert s.nbytes() == 2 * 300 * position and peak <= budget
    with pytest.raises(BusyError):  # 300 positions left: a prompt of 100 and its room, 2 x 164, do not fit
        step("other", 100, 200)
    other = step("other", 80, 200)  # 2 x (80 + 64) do...
    for _ in range(BlockCache.GROW_MIN):  # ...and take decode steps up to the room in place...
        step("other", 1, 200)
    assert all(c.capacity == 144 for c in other.values())
    with pytest.raises(BusyError):  # ...but not the growth to 200 past it (the copy beside)
        step("other", 1, 200)
    s.close("other")
    s.close("long")
    short = step("short", 10, 20)
    assert all(c.capacity == 20 for c in short.values())  # room capped at its max length
    for _ in range(10):
        step("short", 1, 20)
    assert all(c.capacity == 20 and c.length == 20 for c in short.values())


async def _fake_coordinator(port_box: list, flood: int, frame_bytes: int, out: dict):
    """An adversarial coordinator: registers the node, then sends it `flood` forwards without waiting."""
    async def handler(ws):
        try:
            await flood_node(ws)
        finally:
            out.setdefault("busy", -1)  # the test's wait ends whatever happened here

    async def flood_node(ws):
        await accept_as_coordinator(ws, None, info={"max_message_size": 8 * MB})
        assert isinstance(unpack(await ws.recv()), Register)
        await ws.send(pack(Welcome(info={})))
        out["registered"] = True
        await asyncio.sleep(1.0)  # the test reads the node's resting RSS
        rows = frame_bytes // (64 * 4 * 64)
        hidden = encode_tensor(torch.randn(rows, 64, 64))
        mask = encode_tensor(torch.ones(rows, 64, dtype=torch.long))
        for i in range(flood):
            await ws.send(pack(Forward(id=i, first=0, last=5, hidden=hidden, mask=mask)))
        busy = answered = 0
        try:
            async with asyncio.timeout(120):
                async for reply in ws:
                    kind, _ = peek(reply)
                    if kind == "error" and unpack(reply).code == "busy":
                        busy += 1
                    elif kind in ("result", "error"):
                        answered += 1
                    if busy + answered >= flood:
                        break
        except TimeoutError:
            pass
        out.update(busy=busy, answered=answered)

    async with websockets.serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port_box.append(server.sockets[0].getsockname()[1])
        deadline = time.monotonic() + 240
        while "busy" not in out and time.monotonic() < deadline:
            await asyncio.sleep(0.2)


@pytest.mark.slow
def test_a_flood_of_requests_gets_busy_and_node_memory_stays_bounded(tiny_model):
    from slowllm.node.engine._blocks import block_nbytes
    from slowllm.node.engine._memory import NODE_RUNTIME_BYTES

    port_box, out = [], {}
    thread = threading.Thread(target=lambda: asyncio.run(_fake_coordinator(port_box, 300, 4 * MB, out)), daemon=True)
    thread.start()
    while not port_box:
        time.sleep(0.05)
    session = 64 * MB
    memory = NODE_RUNTIME_BYTES + session + 6 * block_nbytes(tiny_config(), torch.float32) + 16 * MB  # -> 256 MB queue
    node = subprocess.Popen([sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-5", "--model", str(tiny_model),
                             "--coordinator", f"ws://127.0.0.1:{port_box[0]}", "--memory", str(memory),
                             "--session-memory", str(session)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak, rest = 0, None
    try:
        while thread.is_alive():
            status = open(f"/proc/{node.pid}/status").read()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
            if rest is None and out.get("registered"):
                rest = rss
            peak = max(peak, rss)
            time.sleep(0.05)
        assert node.poll() is None  # the node survived the flood
    finally:
        node.kill()
        node.wait()
    assert out["busy"] >= 150 and out["busy"] + out["answered"] == 300, out
    # 300 x 4 MB = 1.2 GB were sent (2.4 GB once decoded); what waits is bounded by the 256 MB queue budget
    assert peak - rest < 800 * MB, (rest / MB, peak / MB)  # all 300 queued: 2.4 GB of frames and copies


# ---- cancellation ---------------------------------------------------------------------------------
async def _start_and_drop(url: str, params: dict, events: int, secret: bytes | None = None) -> None:
    """A client that starts a long generation, reads a few tokens, and goes away without a word."""
    ws, channel = await connect_as(url, secret, compression=None)
    async with ws:
        await ws.send(channel.pack(Job(id=1, job="generate", params=params)))
        for _ in range(events):
            assert isinstance(channel.unpack(await ws.recv(), Limits()), Event)
        ws.transport.abort()  # no close frame: like a killed process or a cut cable


def _status(url: str) -> dict:
    return json.load(urllib.request.urlopen(url.replace("ws://", "http://") + "/status.json", timeout=10))


def test_a_client_that_goes_away_cancels_its_job(tiny_model):
    with Cluster(tiny_model, ["0-2", "3-5"], coordinator_args=["--max-new-tokens", "4000"]) as c:
        before = _status(c.url)
        asyncio.run(_start_and_drop(c.url, {"prompts": ["Once upon a time"], "max_new_tokens": 4000}, events=3))
        dropped = time.time()
        while True:
            now = _status(c.url)
            if now["active_jobs"] == before["active_jobs"] and now["sessions"] == before["sessions"]:
                break
            assert time.time() - dropped < 30, now  # a hang guard: cancellation itself is the assertion
            time.sleep(0.05)
        deadline = time.time() + 12  # nodes report their sessions with the next heartbeat (every 5 s)
        while any(n["node_sessions"] for n in _status(c.url)["nodes"]):
            assert time.time() < deadline, _status(c.url)["nodes"]
            time.sleep(0.2)
        # the cap: one sentence, and the admission slot is free again
        with pytest.raises(InputError, match="max_new_tokens 4001 exceeds this coordinator's limit of 4000"):
            c.client().generate(["x"], Sampling(max_new_tokens=4001))
        assert c.client().generate(["x"], Sampling(max_new_tokens=2))


# ---- what the README claims -----------------------------------------------------------------------
def test_max_jobs_busy_status_json_and_compression(tiny_model):
    local = LocalRunner(tiny_model, progress=False)
    requests = [{"context": "The quick brown fox", "continuation": " jumps over the lazy dog"}]
    with Cluster(tiny_model, ["0-5"], coordinator_args=["--max-jobs", "1"]) as c:
        status = _status(c.url)
        for key in ("model", "n_layer", "nodes", "missing", "active_jobs", "sessions", "failovers", "replayed_bytes"):
            assert key in status
        assert status["nodes"][0]["layers"] == [0, 5] and status["missing"] == []
        thread = threading.Thread(target=lambda: c.client().generate(["Once"], Sampling(max_new_tokens=300)))
        thread.start()
        while _status(c.url)["active_jobs"] < 1:
            time.sleep(0.02)
        from slowllm.protocol import BusyError
        with pytest.raises(BusyError, match="busy with 1 jobs"):
            c.client().score(requests)
        thread.join()
        exact = local.score(requests)[0]["logprob"]
        for codec, tol in (("raw", 1e-4), ("fp16", 5e-2), ("bf16", 2e-1), ("int8", 3e-1)):
            got = c.client(compression=codec).score(requests)[0]["logprob"]
            assert got == pytest.approx(exact, abs=tol), codec
    local.close()


def test_hidden_states_travel_in_the_dtype_each_node_computes_in(tiny_model, secret):
    """A bf16 node gets bf16 (half the bytes; it would round fp32 to the same values itself), an fp32 node
    fp32, whatever the job; a lossy codec the job chose is kept where it is not the node's own dtype."""
    from adversaries import LyingNode

    from slowllm.protocol import read_secret

    key = read_secret(secret)
    requests = [{"context": "The quick brown fox", "continuation": " jumps"}]
    # (echo nodes: --verify 0, or the coordinator's first-hop check would ban them before they saw anything)
    with Cluster(tiny_model, [], secret_file=secret, coordinator_args=["--verify", "0"]) as c:
        half = LyingNode(c.url, key, tiny_model, 0, 2, "echo", name="bf16-node", dtype="bfloat16").start()
        full = LyingNode(c.url, key, tiny_model, 3, 5, "echo", name="fp32-node", dtype="float32").start()
        c.wait_covered(2)
        c.client().score(requests)
        c.client().generate(["Once"], Sampling(max_new_tokens=3))
        c.client(compression="bf16").score(requests)
        c.client(compression="int8").score(requests)
    assert set(half.received) == {("forward", "bfloat16", "raw"), ("step", "bfloat16", "raw"),
                                  ("forward", "float32", "int8")}
    assert set(full.received) == {("forward", "float32", "raw"), ("step", "float32", "raw"),
                                  ("forward", "float32", "bf16"), ("forward", "float32", "int8")}


def test_unreachable_coordinator_is_one_sentence():
    from netutil import free_port

    from slowllm.coordinator import Client

    with pytest.raises(SlowllmError, match=r"cannot reach the coordinator at ws://127.0.0.1:\d+: connection refused"):
        Client(f"ws://127.0.0.1:{free_port()}").status()


def test_router_avoids_a_penalized_node():
    from slowllm.coordinator.swarm._links import NodeLink
    from slowllm.coordinator.swarm._router import Router

    router = Router(6)
    a, b = (NodeLink(None, name, 0, 5, "cpu", "float32", speed) for name, speed in (("a", 10.0), ("b", 1.0)))
    router.nodes = [a, b]
    assert router.route()[0][0] is a  # faster
    router.penalize(a)
    assert router.route()[0][0] is b and a.failures == 1 and a.avoid_until > time.monotonic() + 4
    router.penalize(a)
    assert a.avoid_until > time.monotonic() + 9  # doubling


def test_a_scoring_file_larger_than_one_message_is_sent_as_several_jobs(tiny_model):
    # what lm-evaluation-harness-style files carry beside the text makes the message large, not the tokens
    unique = [{"context": f"Question {i}: is the sky blue?", "continuation": " Yes.", "doc": "z" * 1000}
              for i in range(4)]
    requests = unique * 300  # ~1.2 MB of JSON: more than one 1 MB job message
    local = LocalRunner(tiny_model, progress=False).score(unique)
    with Cluster(tiny_model, ["0-5"], coordinator_args=["--max-message-size", "1MB"]) as c:
        got = c.client().score(requests)
    assert len(got) == len(requests)
    for i in (0, 1, 2, 3, len(requests) - 1):
        assert got[i]["logprob"] == pytest.approx(local[i % 4]["logprob"], abs=1e-4)


def test_generate_splits_its_prompts_the_same_way(monkeypatch):
    from slowllm.coordinator import Client
    from slowllm.coordinator.client._client import _TooLarge

    rows = []

    def fake_run(self, spec, on_event=None, state=None):
        if len(spec.prompts) > 2:
            raise _TooLarge("too large")
        rows.append(spec.rows)
        for i, prompt in enumerate(spec.prompts):
            state.on_event({"prompt": i, "text": prompt.upper(), "token_ids": [i]})
        return {"results": [{"prompt": p, "text": p.upper(), "token_ids": [i], "finish_reason": "length"}
                            for i, p in enumerate(spec.prompts)]}

    monkeypatch.setattr(Client, "_run", fake_run)
    streamed = []
    prompts = ["a", "b", "c", "d", "e"]
    out = Client("ws://127.0.0.1:1").generate(prompts, on_text=lambda i, t: streamed.append((i, t)))
    assert [r["prompt"] for r in out] == prompts
    assert sorted(streamed) == [(i, p.upper()) for i, p in enumerate(prompts)]
    assert sorted(r for part in rows for r in part) == [0, 1, 2, 3, 4]  # each prompt keeps its row (seeded draws)
