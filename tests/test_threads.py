"""How slowllm's processes use CPU threads (utils/_openmp.py): one thread per process runs torch's
parallel work, and the commands keep idle OpenMP workers from spinning for milliseconds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest
import torch

from slowllm.utils._openmp import SPIN_COUNT, ComputeThread
from slowllm.node.server._passes import _Queue
from slowllm.node.server._server import NodeServer
from slowllm.protocol import Channel, CloseSession, Error, Result, Step, encode_tensor, unpack


def test_a_node_does_all_its_torch_work_on_its_compute_thread(tiny_model, monkeypatch):
    """Loading, decoding the request, the blocks, encoding the reply: one thread, hence one OpenMP team."""
    hidden = encode_tensor(torch.randn(1, 3, 64))
    mask = encode_tensor(torch.ones(1, 3, dtype=torch.uint8))
    frames = [Channel().pack(msg) for msg in (Step(id=1, session="s" * 32, first=0, last=5, hidden=hidden, mask=mask),
                                              CloseSession(id=2, session="s" * 32), CloseSession(id=3, session="s" * 32))]
    seen: dict[str, set[str]] = {}

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, set()).add(threading.current_thread().name)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    import slowllm.node.server._passes as passes
    from slowllm.node import Checkpoint
    from slowllm.node.engine._resident import ResidentBlocks
    spy(Checkpoint, "read_block")
    spy(ResidentBlocks, "forward")
    spy(Channel, "unpack")
    spy(passes, "decode_tensor")
    spy(passes, "encode_tensor")
    node = NodeServer(first=0, last=5, coordinator="ws://127.0.0.1:9", model=str(tiny_model))
    replies: list = []

    async def send(frame: bytes) -> None:
        replies.append(unpack(frame))

    async def serve() -> None:
        loop_thread = threading.current_thread().name
        link = node.links[0]
        link.queue = _Queue(Channel())
        for frame in frames:
            node.inflight += len(frame)
            await node._handle(frame, send, None, len(frame), link)
        return loop_thread

    loop_thread = asyncio.run(serve())
    compute = {name for names in seen.values() for name in names}
    assert set(seen) == {"read_block", "forward", "unpack", "decode_tensor", "encode_tensor"}
    assert len(compute) == 1 and compute.pop().startswith("slowllm-compute") and loop_thread == "MainThread"
    assert isinstance(replies[0], Result) and replies[0].tensor.shape == [1, 3, 64]
    assert isinstance(replies[1], Result) and replies[1].tensor is None
    assert isinstance(replies[2], Error) and "unknown session" in replies[2].message  # errors still answered
    assert node.inflight == 0 and node.load == 0


def test_compute_thread_runs_tasks_in_order_and_hands_back_errors():
    compute = ComputeThread("test-compute")
    names = [compute.submit(lambda: threading.current_thread().name) for _ in range(3)]
    assert {f.result(5) for f in names} == {"test-compute"}
    order: list[int] = []
    futures = [compute.submit(order.append, i) for i in range(20)]
    [f.result(5) for f in futures]
    assert order == list(range(20))
    with pytest.raises(ZeroDivisionError):
        compute.submit(lambda: 1 / 0).result(5)
    assert compute.submit(lambda: 7).result(5) == 7  # the thread survived the error
    # a daemon: a process whose compute thread runs forever (a server's batch loop) still exits
    code = ("from slowllm.utils._openmp import ComputeThread; import threading; "
            "ComputeThread().submit(threading.Event().wait); print('done')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "done"


@pytest.mark.parametrize("env, expected", [
    ({}, str(SPIN_COUNT)),
    ({"GOMP_SPINCOUNT": "5"}, "5"),  # the user's choice stands
    ({"OMP_WAIT_POLICY": "ACTIVE"}, None),  # so does a wait policy (the spin count follows from it)
])
def test_commands_shorten_openmp_spinning_unless_the_user_chose(env, expected):
    code = ("import os; from slowllm.utils._openmp import share_cores; share_cores(); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    clean = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**clean, **env})
    assert out.stdout.strip() == str(expected)


def test_a_local_job_keeps_openmps_own_spinning(monkeypatch, tiny_model):
    """`--local` jobs are the only process computing: nothing to shorten the spinning for."""
    from slowllm.coordinator.cli import _main

    asked = []
    monkeypatch.setattr(_main, "share_cores", lambda threads=None, alone=False: asked.append(alone))
    monkeypatch.setattr(_main, "run", lambda args: 0)  # (only the choice before torch is imported)
    for argv in (["generate", "--local", "--model", str(tiny_model), "Hi"],
                 ["score", "--local", "--model", str(tiny_model), "--input", "x.jsonl"],
                 ["generate", "--coordinator", "ws://127.0.0.1:9", "Hi"], ["status", "--coordinator", "ws://127.0.0.1:9"]):
        assert _main.main(argv) == 0
    assert asked == [True, True, False, False]
    code = ("import os; from slowllm.utils._openmp import share_cores; share_cores(alone=True); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    clean = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean)
    assert out.stdout.strip() == "None"
