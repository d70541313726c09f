"""Fuzz a live coordinator and a live node with mutated frames: no crash, no handler traceback, flat RSS.

    python bench/fuzz.py [--frames 100000] [--seed 0]

Half the frames go to a coordinator (as an authenticated client and as an authenticated node, so the
mutations reach the message parser instead of stopping at the frame MAC; plus some unauthenticated
pre-handshake frames on fresh connections), half to a real node process through a fake coordinator
that holds the node secret. Each frame is a valid message of the protocol mutated one way: bytes
flipped, truncated, spliced, type swapped, fields with wrong types or huge values, random msgpack.
Between rounds an honest client checks the coordinator still answers jobs correctly. Prints a table
and a JSON line: frames sent per target, replies, crashes, tracebacks, RSS before/after (MB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import msgpack
import torch
import websockets

from slowllm.coordinator import Sampling, make_checkpoint, tiny_config
from slowllm.coordinator.demo._launch import LocalCluster
from slowllm.node import Checkpoint
from slowllm.protocol import (Backward, CloseSession, CoordinatorHandshake, Forward, Heartbeat, Job, Limits,
                              PeerHandshake, Register, Step, Steps, Welcome, encode_tensor, pack)

WORK = Path(__file__).parent / "_work"
SECRET = b"fuzzing-secret-0123456789abcdef"
FIELDS = ["type", "id", "first", "last", "hidden", "mask", "grad", "session", "job", "params", "dtype", "shape",
          "codec", "data", "scales", "tensor", "max_length", "prompts", "requests", "name", "fingerprint"]
ODD = [None, True, -1, 0, 2 ** 31, 2 ** 63 - 1, -(2 ** 63), 1e308, float("nan"), float("inf"), "", "x" * 300,
       b"\x00" * 64, [], [1, 2, 3], {}, {"a": 1}, [2 ** 40, 2 ** 40], "generate", "forward", "float32", "int8"]


def templates(hidden: int, fingerprint: str) -> dict[str, list[bytes]]:
    h = lambda *s: encode_tensor(torch.randn(*s))  # noqa: E731
    m = lambda *s: encode_tensor(torch.ones(*s, dtype=torch.long))  # noqa: E731
    node = [Forward(id=1, first=0, last=1, hidden=h(1, 3, hidden), mask=m(1, 3)),
            Forward(id=2, first=0, last=1, hidden=h(1, 2, hidden), mask=m(1, 2), compression="int8"),
            Backward(id=3, first=0, last=1, hidden=h(1, 2, hidden), mask=m(1, 2), grad=h(1, 2, hidden)),
            Step(id=4, session="s", first=0, last=1, hidden=h(1, 2, hidden), mask=m(1, 2)),
            CloseSession(id=5, session="s"),
            Steps(id=6, items=[Step(id=7, session="t", first=0, last=1, hidden=h(1, 1, hidden), mask=m(1, 1)),
                               Step(id=8, session="u", first=0, last=1, hidden=h(2, 3, hidden), mask=m(2, 3))])]
    client = [Job(id=1, job="status"), Job(id=2, job="score", params={"requests": [{"context": "a", "continuation": "b"}]}),
              Job(id=3, job="generate", params={"prompts": ["a"], "max_new_tokens": 1}),
              Job(id=4, job="tune", params={"data": [{"context": "a", "continuation": "b"}], "steps": 1})]
    as_node = [Heartbeat(load=1, sessions=1), Register(first=0, last=1, fingerprint=fingerprint)]
    return {k: [pack(x) for x in v] for k, v in (("node", node), ("client", client), ("as_node", as_node))}


def mutate(frame: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(7)
    b = bytearray(frame)
    if op == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 1:  # truncate
        return bytes(b[: rng.randrange(len(b))])
    if op == 2:  # splice random bytes in
        at = rng.randrange(len(b))
        return bytes(b[:at] + rng.randbytes(rng.randint(1, 32)) + b[at:])
    obj = msgpack.unpackb(frame, raw=False)
    if op == 3:  # a field gets an odd value
        obj[rng.choice(list(obj))] = rng.choice(ODD)
    elif op == 4:  # a field is added or removed
        if rng.random() < 0.5 and len(obj) > 1:
            del obj[rng.choice([k for k in obj if k != "type"] or ["type"])]
        else:
            obj[rng.choice(FIELDS)] = rng.choice(ODD)
    elif op == 5:  # a nested tensor's header lies
        tensors = [k for k, v in obj.items() if isinstance(v, dict) and "shape" in v]
        if tensors:
            t = obj[rng.choice(tensors)]
            t[rng.choice(["shape", "dtype", "codec", "data", "scales"])] = rng.choice(ODD)
        else:
            obj["type"] = rng.choice(["forward", "step", "steps", "job", "result", "error", "hello", "register", "nope"])
    else:  # random msgpack
        return msgpack.packb({rng.choice(FIELDS): rng.choice(ODD) for _ in range(rng.randint(0, 5))})
    return msgpack.packb(obj, use_bin_type=True)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def pump(ws, channel, frames: list[bytes], counts: dict) -> None:
    """Send sealed frames, reading replies concurrently (replies may lag or never come)."""
    async def reader():
        try:
            async for _ in ws:
                counts["replies"] += 1
        except websockets.ConnectionClosed:
            pass

    task = asyncio.create_task(reader())
    try:
        for frame in frames:
            await ws.send(channel.seal(frame))
            counts["sent"] += 1
        seen, quiet = -1, 0
        while quiet < 4:  # until no reply came for 2 s: everything answerable was answered
            await asyncio.sleep(0.5)
            quiet = quiet + 1 if counts["replies"] == seen else 0
            seen = counts["replies"]
    except websockets.ConnectionClosed:
        counts["closed"] += 1
    finally:
        task.cancel()


async def fuzz_coordinator(url: str, frames: int, rng: random.Random, tpl: dict, counts: dict) -> None:
    batch = 500
    done = 0
    while done < frames:
        role = "node" if rng.random() < 0.3 else "client"
        kind = "as_node" if role == "node" else "client"
        if rng.random() < 0.05:  # pre-auth: mutated hellos on a fresh connection
            try:
                async with websockets.connect(url, max_size=None) as ws:
                    hello = PeerHandshake(role, SECRET).hello()
                    await ws.send(mutate(hello, rng))
                    await asyncio.wait_for(ws.recv(), 5)
            except (websockets.ConnectionClosed, asyncio.TimeoutError):
                pass
            counts["sent"] += 1
            done += 1
            continue
        ws = await websockets.connect(url, max_size=None)
        hs = PeerHandshake(role, SECRET, "fuzz")
        await ws.send(hs.hello())
        await ws.send(hs.on_challenge(await ws.recv()))
        hs.on_welcome(await ws.recv())
        n = min(batch, frames - done)
        # jobs that happen to stay valid run for real; closing the connection cancels them
        await pump(ws, hs.channel, [mutate(rng.choice(tpl[kind]), rng) for _ in range(n)], counts)
        await ws.close()
        done += n


async def fuzz_node(node_cmd: list[str], frames: int, rng: random.Random, tpl: dict, counts: dict) -> None:
    state: dict = {}

    async def handler(ws):
        if "done" in state:  # the node came back after the fuzzing connection closed: nothing more to send
            return
        hs = CoordinatorHandshake(lambda role: [(role, SECRET)], "x", 6)
        await ws.send(hs.on_hello(await ws.recv()))
        await ws.send(hs.on_auth(await ws.recv(), {"max_message_size": 16 << 20}))
        hs.channel.unpack(await ws.recv(), Limits())  # its Register
        await ws.send(hs.channel.pack(Welcome()))
        state["rss0"] = rss_mb(state["pid"])
        await pump(ws, hs.channel, [mutate(rng.choice(tpl["node"]), rng) for _ in range(frames)], counts)
        state["done"] = True

    async with websockets.serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(*node_cmd, "--coordinator", f"ws://127.0.0.1:{port}",
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        state["pid"] = proc.pid
        while "done" not in state and proc.returncode is None:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        alive = proc.returncode is None
        counts["rss_before_mb"], counts["rss_after_mb"] = state.get("rss0", 0), rss_mb(proc.pid) if alive else 0
        proc.terminate()
        output = (await proc.communicate())[0].decode(errors="replace")
        counts["crashed"] = 0 if alive else 1
        counts["tracebacks"] = output.count("Traceback")
        if counts["tracebacks"]:
            print(output[-3000:], file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = WORK / "fuzz-tiny"
    if not (model / "config.json").exists():
        make_checkpoint(model, tiny_config(n_layer=6, hidden=64, n_head=4), seed=0)
    secret = WORK / "fuzz-secret.txt"
    secret.write_bytes(SECRET)
    rng = random.Random(args.seed)
    tpl = templates(64, Checkpoint(model).fingerprint())
    coord = {"sent": 0, "replies": 0, "closed": 0}
    node = {"sent": 0, "replies": 0, "closed": 0}
    start = time.perf_counter()
    with LocalCluster(model, ["0-5"], secret_file=secret) as c:
        expected = c.client().generate(["Once upon a time"], Sampling(max_new_tokens=8))[0]["token_ids"]
        coord["rss_before_mb"] = rss_mb(c.coordinator.pid)
        rounds = 4
        for _ in range(rounds):
            asyncio.run(fuzz_coordinator(c.url, args.frames // 2 // rounds, rng, tpl, coord))
            assert c.client().generate(["Once upon a time"], Sampling(max_new_tokens=8))[0]["token_ids"] == expected
        time.sleep(1.0)
        coord["rss_after_mb"] = rss_mb(c.coordinator.pid)
        coord["crashed"] = int(c.coordinator.poll() is not None or c.nodes["n0-0-5"].poll() is not None)
        coord["tracebacks"] = c.output(c.coordinator).count("Traceback") + c.output(c.nodes["n0-0-5"]).count("Traceback")
    node_cmd = [sys.executable, "-m", "slowllm.node.server._cli", "--layers", "0-1", "--model", str(model),
                "--secret-file", str(secret), "--name", "fuzzed"]
    asyncio.run(fuzz_node(node_cmd, args.frames - args.frames // 2, rng, tpl, node))
    seconds = time.perf_counter() - start
    print(f"{'target':<12}{'frames':>9}{'replies':>9}{'crashes':>9}{'tracebacks':>12}{'RSS MB before':>15}{'after':>8}")
    for name, r in (("coordinator", coord), ("node", node)):
        print(f"{name:<12}{r['sent']:>9}{r['replies']:>9}{r['crashed']:>9}{r['tracebacks']:>12}"
              f"{r['rss_before_mb']:>15.0f}{r['rss_after_mb']:>8.0f}")
    print(json.dumps({"bench": "fuzz", "frames": coord["sent"] + node["sent"], "seconds": round(seconds, 1),
                      "coordinator": coord, "node": node}))
    if coord["crashed"] or node["crashed"] or coord["tracebacks"] or node["tracebacks"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
