"""Trust no volunteer: every attack tried for real against live processes, with adversaries written with
slowllm.protocol (tests/adversaries.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import websockets
from websockets.protocol import State

from adversaries import LIES, LyingNode
from netutil import Cluster, connect_as
from test_operations import _chromium
from slowllm.coordinator import Client, LocalRunner, Sampling
from slowllm.coordinator.client._client import format_status
from slowllm.node import Checkpoint
from slowllm.protocol import (Challenge, Error, Hello, Limits, Register, SlowllmError,
                              Welcome, pack, unpack)

PROMPT = "Once upon a time there was a researcher"
REQUESTS = [{"context": "Is the sky blue?", "continuation": " Yes, it is."}]


@pytest.fixture(scope="module")
def local(tiny_model):
    with LocalRunner(tiny_model, progress=False) as r:
        yield r


def _browse(browser: str, page: str) -> str:
    import tempfile

    from test_operations import _browse as browse

    with tempfile.TemporaryDirectory() as profile:
        return browse(browser, profile, "--dump-dom", page)


def _key(path) -> bytes:
    return open(path, "rb").read().strip()


# ---- authentication ------------------------------------------------------------------------------------
def test_a_relay_without_the_secret_gets_nothing(tiny_model, secret, local):
    """A fake coordinator relays a real coordinator's handshake to an honest node (the old attack): it
    completes the handshake, but cannot register or say anything of its own on the relayed link."""
    fingerprint = Checkpoint(tiny_model).fingerprint()
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret) as c:
        outcome = {}

        async def relay(node_ws):
            async with websockets.connect(c.url, max_size=None) as real:
                for _ in range(2):  # hello ->, <- challenge, auth ->, <- welcome
                    await real.send(await node_ws.recv())
                    await node_ws.send(await real.recv())
                # the relay now holds an authenticated connection: it registers blocks 0-5 as its own
                await real.send(pack(Register(first=0, last=5, fingerprint=fingerprint, name="relay")))
                try:
                    while True:  # (an error reply may come first; what matters is the close)
                        await asyncio.wait_for(real.recv(), 10)
                except asyncio.TimeoutError:
                    outcome["closed"] = None
                except websockets.ConnectionClosed as e:
                    outcome["closed"] = e.rcvd.code if e.rcvd else -1

        async def serve():
            async with websockets.serve(relay, "127.0.0.1", 0, max_size=None) as server:
                port = server.sockets[0].getsockname()[1]
                c.start_node("0-5", name="relayed", coordinators=[f"ws://127.0.0.1:{port}"])
                for _ in range(300):
                    if "closed" in outcome:
                        return
                    await asyncio.sleep(0.1)

        asyncio.run(serve())
        assert outcome.get("closed") == 1008  # frame authentication failed
        names = [n["name"] for n in c.client().status()["nodes"]]
        assert "relay" not in names and "relayed" not in names
        out = c.client().generate([PROMPT], Sampling(max_new_tokens=8))
        assert out[0]["token_ids"] == local.generate([PROMPT], Sampling(max_new_tokens=8))[0]["token_ids"]


def test_a_relay_that_rewrites_the_welcome_is_refused_and_the_node_keeps_retrying(tiny_model, secret):
    """A relay passes the real handshake on but rewrites one field of the Welcome's info each time (the
    model to load, the message size, a field of its own), then relays everything unchanged. The node must
    notice every rewrite (the proof covers the info), never load or register through it, never exit."""
    # (each field alone: tests/test_protocol.py; here two live connections, before the node's backoff
    # after repeated refusals reaches 30 s)
    rewrites = [{"model": "evil-org/evil-model"}, {"max_message_size": 1 << 30, "extra": "x"}]
    seen: list[dict] = []
    with Cluster(tiny_model, [], secret_file=secret) as c:
        async def relay(node_ws):
            change = rewrites[len(seen) % len(rewrites)]
            seen.append(change)
            async with websockets.connect(c.url, max_size=None) as real:
                await real.send(await node_ws.recv())  # hello
                await node_ws.send(await real.recv())  # challenge
                await real.send(await node_ws.recv())  # auth
                welcome = unpack(await real.recv())
                await node_ws.send(pack(Welcome(info={**welcome.info, **change}, proof=welcome.proof)))

                async def pipe(a, b):
                    async for frame in a:
                        await b.send(frame)
                await asyncio.wait([asyncio.ensure_future(pipe(node_ws, real)), asyncio.ensure_future(pipe(real, node_ws))],
                                   timeout=5, return_when=asyncio.FIRST_COMPLETED)

        async def serve():
            async with websockets.serve(relay, "127.0.0.1", 0, max_size=None) as server:
                port = server.sockets[0].getsockname()[1]
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-5", "--model", str(tiny_model),
                    "--coordinator", f"ws://127.0.0.1:{port}", "--secret-file", str(secret), "--name", "relayed",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                deadline = time.monotonic() + 60
                while len(seen) < len(rewrites) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                await asyncio.sleep(2)  # (the node judges the last one)
                alive = proc.returncode is None
                proc.terminate()
                return alive, (await proc.communicate())[0].decode()

        alive, output = asyncio.run(serve())
        assert alive and len(seen) >= len(rewrites), (seen, output)
        assert output.count("was altered") >= 1, output
        assert "serving" not in output and "Traceback" not in output
        assert c.client().status()["nodes"] == []  # nothing registered through the relay


def test_a_fake_coordinator_fails_and_the_node_keeps_retrying(tiny_model, secret):
    """Impostors without the secret, each way they can answer: the node never serves, never exits."""
    behaviours = ["bad proof", "no auth", "refuse", "garbage", "welcome first", "silence-then-close"]
    seen: list[str] = []

    async def impostor(ws):
        kind = behaviours[len(seen) % len(behaviours)]
        seen.append(kind)
        hello = unpack(await ws.recv())
        assert isinstance(hello, Hello)
        if kind == "bad proof":  # plays the protocol, but cannot prove the secret
            await ws.send(pack(Challenge(version=hello.version, nonce=os.urandom(32), auth_required=True,
                                         fingerprint="f", n_layer=6)))
            await ws.recv()
            await ws.send(pack(Welcome(info={"model": "/etc"}, proof=os.urandom(32))))
        elif kind == "no auth":  # a downgrade: "no secret needed here"
            await ws.send(pack(Challenge(version=hello.version, nonce=os.urandom(32), auth_required=False,
                                         fingerprint="f", n_layer=6)))
        elif kind == "refuse":
            await ws.send(pack(Error(code="auth", message="\x1b[31mgo away\x1b[0m" * 10)))
        elif kind == "garbage":
            await ws.send(b"\xc1" * 100)
        elif kind == "welcome first":
            await ws.send(pack(Welcome(info={"model": "/etc"})))
        await asyncio.sleep(0.5)

    async def serve():
        async with websockets.serve(impostor, "127.0.0.1", 0, max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-1", "--coordinator",
                f"ws://127.0.0.1:{port}", "--secret-file", str(secret), "--name", "honest",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while len(seen) < len(behaviours) + 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            alive = proc.returncode is None
            proc.terminate()
            output = (await proc.communicate())[0].decode()
            return alive, output

    alive, output = asyncio.run(serve())
    assert alive and len(seen) > len(behaviours), (seen, output)
    assert "could not prove it holds the secret" in output
    assert "checks no secret" in output
    assert "serving" not in output and "loading" not in output and "Traceback" not in output
    assert "\x1b" not in output  # an impostor's words are shown printable only


def test_a_node_never_opens_a_local_path_the_coordinator_names(tiny_model, secret):
    with Cluster(tiny_model, ["0-5"], secret_file=secret) as c:
        node = c.start_node("0-1", name="no-model", model=False)
        assert c.wait(node, 60) == 2
        assert "never opens by the coordinator's word: start this node with --model" in c.output(node)


def test_a_sibling_checkpoint_with_equal_shapes_is_refused(tiny_model, secret, models_dir):
    """Same config, same shapes, same fingerprint, other weights (another seed, as a fine-tune would be):
    the node's weight digests differ from the coordinator's, and it is refused naming the first block that
    differs. An honest node beside it joins (its digests match, cached after the first time)."""
    from slowllm.coordinator import make_checkpoint, tiny_config

    sibling = make_checkpoint(models_dir / "sibling", tiny_config(n_layer=6, hidden=64, n_head=4), seed=11)
    assert Checkpoint(sibling).fingerprint() == Checkpoint(tiny_model).fingerprint()
    with Cluster(tiny_model, ["0-5"], secret_file=secret) as c:
        node = c.start_node("3-5", name="sibling", model=sibling)
        assert c.wait(node, 60) == 2  # an authenticated refusal of its checkpoint: retrying is no use
        assert "weights differ from the coordinator's from block 3 on" in c.output(node)
        status = c.client().status()
        assert [n["name"] for n in status["nodes"]] == ["n0-0-5"] and status["nodes"][0]["weights_proven"]
        assert "refused a node" in c.output(c.coordinator)


def carol_first(tmp_path):
    """The operator's own key, listed from the start (the test harness checks coverage with it)."""
    path = tmp_path / "operator.key"
    path.write_text("operator operator-key-0123456789abcdef\n")
    return path


def test_client_keys_per_user_reload_revoke_and_status_needs_a_key(tiny_model, secret, tmp_path):
    keys = tmp_path / "clients.txt"
    keys.write_text("alice alice-key-0123456789abcdef\n# a comment\nbob bob-key-0123456789abcdef\n"
                    "operator operator-key-0123456789abcdef\n")
    alice, bob, carol = tmp_path / "alice.key", tmp_path / "bob.key", tmp_path / "carol.key"
    alice.write_text("alice alice-key-0123456789abcdef\n")
    bob.write_text("bob-key-0123456789abcdef\n")  # a bare key works too
    carol.write_text("carol carol-key-0123456789abcdef\n")
    with Cluster(tiny_model, ["0-5"], secret_file=secret, client_secret_file=carol_first(tmp_path),
                 coordinator_args=["--host", "0.0.0.0", "--client-keys", str(keys)]) as c:
        url = c.url.replace("0.0.0.0", "127.0.0.1")
        assert Client(url, secret_file=alice).score(REQUESTS)
        assert Client(url, secret_file=bob).score(REQUESTS)
        with pytest.raises(SlowllmError, match="client key .* does not match"):
            Client(url, secret_file=secret).status()  # the node secret is not a client key here

        # a client key cannot register a node: the node retries, saying why, and never serves
        intruder = c.start_node("0-1", name="intruder", secret_file=alice,
                                coordinators=[url])
        deadline = time.time() + 30
        while "authentication failed" not in c.output(intruder) and time.time() < deadline:
            time.sleep(0.3)
        assert "authentication failed" in c.output(intruder) and intruder.poll() is None
        intruder.kill()

        # /status needs a key beyond loopback: Bearer, or Basic with the key as password
        http = url.replace("ws://", "http://")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(http + "/status.json", timeout=10)
        assert refused.value.code == 401 and "Basic" in refused.value.headers["WWW-Authenticate"]
        bearer = urllib.request.Request(http + "/status.json",
                                        headers={"Authorization": "Bearer alice-key-0123456789abcdef"})
        status = json.load(urllib.request.urlopen(bearer, timeout=10))
        assert status["jobs_done"] == {"alice": 1, "bob": 1}  # who ran what
        basic = base64.b64encode(b"anyone:bob-key-0123456789abcdef").decode()
        page = urllib.request.urlopen(urllib.request.Request(http + "/status",
                                      headers={"Authorization": f"Basic {basic}"}), timeout=10).read().decode()
        assert "slowllm coordinator" in page

        # revoking alice (editing the file) and adding carol; SIGHUP reloads at once
        keys.write_text("bob bob-key-0123456789abcdef\ncarol carol-key-0123456789abcdef\n"
                        "operator operator-key-0123456789abcdef\n")
        c.coordinator.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        with pytest.raises(SlowllmError, match="does not match"):
            Client(url, secret_file=alice).status()
        assert Client(url, secret_file=carol).score(REQUESTS)

        # editing the file alone (no SIGHUP, no new handshake) closes a revoked user's open connection
        outcome = {}

        def long_job():
            try:
                Client(url, secret_file=bob).generate([PROMPT], Sampling(max_new_tokens=4000))
                outcome["error"] = None
            except SlowllmError as e:
                outcome["error"] = e
            outcome["at"] = time.monotonic()
        job = threading.Thread(target=long_job)
        job.start()
        time.sleep(1.5)
        keys.write_text("carol carol-key-0123456789abcdef\noperator operator-key-0123456789abcdef\n")
        edited = time.monotonic()
        job.join(30)
        assert outcome["error"] is not None and "key revoked" in str(outcome["error"]), outcome
        assert outcome["at"] - edited < 5

        # a broken file keeps the keys that worked (and says so in the log)
        keys.write_text("just-one-field\n")
        c.coordinator.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert Client(url, secret_file=carol).status()
        assert "not reloaded" in c.output(c.coordinator)


def test_pre_auth_floods_do_not_stop_a_legitimate_job(tiny_model, secret, local):
    with Cluster(tiny_model, ["0-5"], secret_file=secret) as c:
        result = {}

        async def flood():
            silent = [await websockets.connect(c.url, max_size=None) for _ in range(300)]  # never say hello
            big = []
            for _ in range(4):  # frames over the 1 MB pre-auth limit
                ws = await websockets.connect(c.url, max_size=None)
                try:
                    await ws.send(b"\x00" * (8 << 20))
                    await ws.recv()
                except websockets.ConnectionClosed as e:
                    big.append(e.rcvd.code if e.rcvd else None)
            job = asyncio.get_running_loop().run_in_executor(
                None, lambda: c.client().generate([PROMPT], Sampling(max_new_tokens=8)))
            result["tokens"] = (await asyncio.wait_for(job, 60))[0]["token_ids"]
            await asyncio.sleep(11)  # past the 10 s hello deadline: the silent ones were closed
            result["closed"] = sum(ws.state is State.CLOSED for ws in silent)
            result["big"] = big

        asyncio.run(flood())
        assert result["tokens"] == local.generate([PROMPT], Sampling(max_new_tokens=8))[0]["token_ids"]
        assert result["big"] == [1009] * 4
        assert result["closed"] == 300


# ---- lying nodes ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lying_nodes_never_change_output_under_verify_1_and_are_banned(tiny_model, secret, local):
    sampling = Sampling(max_new_tokens=6)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    scores = local.score(REQUESTS)
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret, coordinator_args=["--verify", "1"]) as c:
        client = c.client()
        for lie in LIES:
            liar = LyingNode(c.url, _key(secret), tiny_model, 0, 5, lie, name=f"<img src=x onerror=alert('{lie}')>",
                             device="<script>alert(1)</script>").start()
            out = client.generate([PROMPT], sampling)
            assert out[0]["token_ids"] == expected, lie
            got = client.score(REQUESTS)
            assert abs(got[0]["logprob"] - scores[0]["logprob"]) < 1e-4, lie
            assert liar.answered >= 1, f"{lie}: the liar was never asked"
            status = client.status()
            entry = next(n for n in status["nodes"] if n["name"] == liar.name)
            assert entry["banned"] and entry["reason"], (lie, entry)
            assert liar.done.wait(10), f"{lie}: the banned liar was not disconnected"
        status = client.status()
        honest = [n for n in status["nodes"] if not n["banned"]]
        assert sorted(n["name"] for n in honest) == ["n0-0-2", "n1-3-5"]
        assert status["refereed_hops"] >= 2  # the honest two, checked on probation (each liar: before its re-run)
        assert format_status(status).count("BANNED") == len(LIES)
        browser = _chromium()
        if browser is not None:  # every field a stranger sent shows as text, and runs nothing
            dom = _browse(browser, c.url.replace("ws://", "http://") + "/status")
            assert dom.split("<title>")[1].startswith("slowllm status")
            assert "<img src=x" not in dom and "&lt;img src=x onerror=alert('zeros')&gt;" in dom
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
        # banned means banned: it cannot come back under the same name
        with pytest.raises(RuntimeError, match="did not register: .* was banned by this coordinator"):
            LyingNode(c.url, _key(secret), tiny_model, 0, 5, "zeros", name="<img src=x onerror=alert('zeros')>"
                      ).start()


@pytest.mark.parametrize("verify", ["1", "0.05"])
def test_colluding_liars_are_banned_and_never_change_an_answer(tiny_model, secret, local, verify):
    """Two nodes telling the same input-dependent lie (5%) agree with each other; alone on their span they
    must still be banned and their answers never used; beside an honest node the output is unchanged."""
    sampling = Sampling(max_new_tokens=6)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    with Cluster(tiny_model, [], secret_file=secret,
                 coordinator_args=["--verify", verify, "--wait-for-nodes", "2"]) as c:
        client = c.client()
        c.start_node("0-2", name="n0-0-2")
        liars = [LyingNode(c.url, _key(secret), tiny_model, 3, 5, "collude", name=f"colluder-{i}").start()
                 for i in range(2)]
        c.wait_covered(3)
        with pytest.raises(SlowllmError, match="no node serves blocks 3-5"):
            client.generate([PROMPT], sampling)  # (or an answer: but never theirs; here they are gone)
        assert all(liar.done.wait(10) for liar in liars)  # both banned and disconnected
        status = client.status()
        assert sorted(n["name"] for n in status["nodes"] if n["banned"]) == ["colluder-0", "colluder-1"]
        # an honest node joins; two fresh colluders beside it change nothing
        c.start_node("3-5", name="honest")
        c.wait_covered(2)
        liars = [LyingNode(c.url, _key(secret), tiny_model, 3, 5, "collude", name=f"again-{i}").start()
                 for i in range(2)]
        for _ in range(3):
            assert client.generate([PROMPT], sampling)[0]["token_ids"] == expected
        status = client.status()
        banned = {n["name"] for n in status["nodes"] if n["banned"]}
        assert all(liar.name in banned for liar in liars if liar.answered), (banned, [x.answered for x in liars])
        assert status["unrefereed_spans"] == [] and status["refereed_hops"] >= 2


def test_a_five_percent_lie_is_caught_whatever_the_node_declares(tiny_model, secret, local):
    """A node that computes its blocks for real and scales the answer by 1.05, declaring int8 weights (whose
    tolerance between nodes is 15%): the referee recomputes int8 arithmetic itself and bans it at its first
    hop, under the default --verify; the job's scores are unchanged."""
    scores = local.score(REQUESTS)
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret) as c:
        liar = LyingNode(c.url, _key(secret), tiny_model, 3, 5, "off5", name="int8-liar", quantization="int8",
                         speed=1e12).start()
        c.nodes["n1-3-5"].kill()  # the liar alone on blocks 3-5: the job's hop goes to it
        c.wait(c.nodes["n1-3-5"], 30)
        while any(n["name"] == "n1-3-5" for n in c.client().status()["nodes"]):
            time.sleep(0.1)
        got = c.client().score(REQUESTS)  # the hop's answer is the coordinator's own
        assert abs(got[0]["logprob"] - scores[0]["logprob"]) < 1e-4
        assert liar.answered >= 1 and liar.done.wait(10)
        entry = next(n for n in c.client().status()["nodes"] if n["name"] == "int8-liar")
        assert entry["banned"] and "coordinator's own computation" in entry["reason"]


def test_busy_and_internal_nodes_are_failed_over_not_banned(tiny_model, secret, local):
    sampling = Sampling(max_new_tokens=6)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret) as c:
        client = c.client()
        for kind in ("busy", "internal"):
            refuser = LyingNode(c.url, _key(secret), tiny_model, 0, 5, kind, name=kind).start()
            start = time.time()
            assert client.generate([PROMPT], sampling)[0]["token_ids"] == expected
            assert time.time() - start < 20  # no waiting for nodes: the failover goes to the honest ones
            entry = next(n for n in client.status()["nodes"] if n["name"] == kind)
            assert refuser.answered >= 1 and entry["failures"] >= 1 and not entry["banned"]


def test_a_check_that_cannot_run_leaves_the_users_answer_standing(tiny_model, secret, local):
    """Under --verify 1 every hop is re-run on another node; that checker refusing the re-run (a request
    it calls bad) must not fail the user's job: the answer stands, unchecked."""
    sampling = Sampling(max_new_tokens=4)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    with Cluster(tiny_model, ["0-5"], secret_file=secret, coordinator_args=["--verify", "1"]) as c:
        checker = LyingNode(c.url, _key(secret), tiny_model, 0, 5, "bad_input", name="refuses-checks",
                            speed=1e-3).start()  # slow: never the first choice, only the checker
        c.wait_covered(2)
        client = c.client()
        assert client.generate([PROMPT], sampling)[0]["token_ids"] == expected
        assert client.score([{"context": "Is the sky blue?", "continuation": " Yes."}])
        assert checker.answered >= 2 and client.status()["verified_hops"] == 0  # it was asked, and refused


@pytest.mark.slow
def test_a_liar_is_banned_within_bounded_jobs_under_verify_5_percent(tiny_model, secret, local):
    sampling = Sampling(max_new_tokens=8)
    expected = local.generate([PROMPT], sampling)[0]["token_ids"]
    with Cluster(tiny_model, ["0-2", "3-5"], secret_file=secret) as c:  # --verify 0.05 is the default
        client = c.client()
        liar = LyingNode(c.url, _key(secret), tiny_model, 0, 5, "random", name="sometimes-caught").start()
        jobs = 0
        while not liar.done.is_set() and jobs < 60:
            client.generate([PROMPT], sampling)
            jobs += 1
        print(f"liar banned after {jobs} jobs ({liar.answered} lying answers) under --verify 0.05")
        assert liar.done.wait(10), f"not banned after {jobs} jobs"
        assert next(n for n in client.status()["nodes"] if n["name"] == "sometimes-caught")["banned"]
        assert client.generate([PROMPT], sampling)[0]["token_ids"] == expected  # honest nodes only now


def test_unverified_spans_are_reported_and_job_parameters_checked(tiny_model, secret):
    with Cluster(tiny_model, ["0-3", "2-5"], secret_file=secret) as c:
        status = c.client().status()
        assert status["unverified_spans"] == [[0, 1], [4, 5]] and status["verify"] == 0.05

        async def raw(params):
            ws, channel = await connect_as(c.url, _key(secret))
            from slowllm.protocol import Job
            async with ws:
                await ws.send(channel.pack(Job(id=1, job=params.pop("job"), params=params)))
                return channel.unpack(await ws.recv(), Limits())

        for params, words in [({"job": "generate", "prompts": ["a"], "max_new_tokens": 2.5}, "whole number"),
                              ({"job": "generate", "prompts": ["a"], "temperature": float("nan")}, "finite"),
                              ({"job": "tune", "data": [{"context": "a", "continuation": "b"}], "lr": float("nan")},
                               "finite"),
                              ({"job": "tune", "data": [{"context": "a", "continuation": "b"}], "lr": float("inf")},
                               "finite")]:
            reply = asyncio.run(raw(dict(params)))
            assert reply.type == "error" and reply.code == "bad_input" and words in reply.message, (params, reply)


@pytest.mark.slow
def test_a_short_fuzz_run_finds_no_crash_and_no_traceback():
    """bench/fuzz.py (10^5 frames in the bench) kept from rotting with a short run."""
    import subprocess
    from pathlib import Path

    bench = Path(__file__).parent.parent / "bench" / "fuzz.py"
    proc = subprocess.run([sys.executable, str(bench), "--frames", "1000", "--seed", "7"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["frames"] == 1000 and result["node"]["tracebacks"] == 0 and result["coordinator"]["crashed"] == 0


def test_close_reasons_are_cut_by_bytes_and_key_files_are_checked(tmp_path):
    from slowllm.coordinator.swarm._keys import KeyRing, parse_client_keys
    from slowllm.coordinator.swarm._server import close_reason
    from slowllm.protocol import AuthError

    reason = close_reason("é" * 200 + "✓")
    assert len(reason.encode()) <= 123 and reason == "é" * 60
    for text, words in [("alice\n", "line 1: write `NAME KEY`"), ("a short\n", "fewer than 16"),
                        ("a 0123456789abcdef\na 0123456789abcdef\n", "listed twice"),
                        ("<b> 0123456789abcdef\n", "NAME of letters")]:
        with pytest.raises(AuthError, match=words):
            parse_client_keys(text, "keys.txt")
    with pytest.raises(AuthError, match="needs --secret-file"):
        KeyRing(None, tmp_path / "keys.txt")
    path = tmp_path / "keys.txt"
    path.write_text("alice 0123456789abcdef\n")
    ring = KeyRing(b"node-secret-0123456789", path)
    assert ring.keys("node") == [("node", b"node-secret-0123456789")]  # client keys never authenticate nodes
    assert ring.keys("client") == [("alice", b"0123456789abcdef")]
    assert ring.check_bearer("0123456789abcdef") == "alice" and ring.check_bearer("nope") is None
