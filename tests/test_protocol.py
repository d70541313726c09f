"""Protocol property tests: every message and dtype round-trips; random bytes only raise ProtocolError."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slowllm.protocol import (Auth, Backward, Challenge, CloseSession, Error, Event, Forward, Heartbeat, Hello, Job,
                              JobResult, Limits, ProtocolError, Register, Result, Step, Welcome, decode_tensor,
                              encode_tensor, pack, unpack)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8]
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)


def _tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


@given(st.sampled_from(DTYPES), shapes, st.integers(0, 1000))
def test_raw_tensors_round_trip_exactly(dtype, shape, seed):
    t = _tensor(dtype, shape, seed)
    back = decode_tensor(unpack(pack(Result(id=1, tensor=encode_tensor(t)))).tensor)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


@given(shapes, st.integers(0, 1000), st.sampled_from(["fp16", "bf16", "int8"]))
def test_compression_error_is_within_its_documented_bound(shape, seed, codec):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    back = decode_tensor(unpack(pack(Result(id=1, tensor=encode_tensor(t, codec)))).tensor)
    assert back.shape == t.shape and back.dtype == torch.float32
    if t.numel():
        err = (back - t).abs()
        if codec == "int8":
            assert err.max() <= t.abs().max() / 254 + 1e-6
        else:
            rel = 2.0 ** -11 if codec == "fp16" else 2.0 ** -8
            assert (err <= t.abs() * rel + 1e-7).all()


def test_every_message_round_trips():
    w = encode_tensor(torch.randn(2, 3, 4))
    m = encode_tensor(torch.ones(2, 3, dtype=torch.long))
    msgs = [Hello(version=1, role="node", name="a", nonce=b"z" * 32), Challenge(version=1, nonce=b"x" * 32,
            auth_required=True, fingerprint="f", n_layer=3), Auth(mac=b"y"), Welcome(info={"a": 1}),
            Error(id=3, code="busy", message="busy"), Register(first=0, last=2, fingerprint="f"),
            Heartbeat(load=1, sessions=2), Forward(id=1, first=0, last=1, hidden=w, mask=m),
            Backward(id=2, first=0, last=1, hidden=w, mask=m, grad=w), Step(id=3, session="s", first=0, last=0,
            hidden=w, mask=m), CloseSession(id=4, session="s"), Result(id=5, tensor=w),
            Job(id=6, job="score", params={"requests": []}), Event(id=6, data={"step": 1}), JobResult(id=6, data={})]
    for msg in msgs:
        assert unpack(pack(msg)) == msg


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(data):
    try:
        unpack(data)
    except ProtocolError:
        pass


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=8), st.binary(max_size=8),
                                                     st.none()), max_size=5))
def test_random_maps_raise_only_protocol_errors(obj):
    import msgpack
    try:
        unpack(msgpack.packb(obj, use_bin_type=True))
    except ProtocolError:
        pass


def test_limits_and_inconsistent_tensors():
    big = pack(Result(id=1, tensor=encode_tensor(torch.zeros(1000))))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        unpack(big, Limits(max_frame=100))
    with pytest.raises(ProtocolError, match="elements exceeds"):
        decode_tensor(encode_tensor(torch.zeros(1000)), Limits(max_tensor_elements=10))
    w = encode_tensor(torch.zeros(4))
    with pytest.raises(ProtocolError, match="needs 16"):
        decode_tensor(w.model_copy(update={"shape": [4], "data": b"\x00" * 15}))
    with pytest.raises(ProtocolError):
        unpack("a text frame")


def test_overflowing_shapes_are_refused():
    w = encode_tensor(torch.zeros(4))
    with pytest.raises(ProtocolError, match="elements exceeds"):  # 2**62+1 x 4 wraps to 4 in int64
        decode_tensor(w.model_copy(update={"shape": [2 ** 62 + 1, 4]}))
    with pytest.raises(ProtocolError, match="elements exceeds"):
        decode_tensor(w.model_copy(update={"shape": [1] * 40}).model_copy(update={"shape": [2 ** 40] * 2}))
    with pytest.raises(ProtocolError, match="dimensions"):
        decode_tensor(w.model_copy(update={"shape": [1] * 40}))


@pytest.mark.parametrize("change", [{"model": "evil-org/evil-model"}, {"max_message_size": 1 << 30}, {"extra": "x"},
                                    {"registered": None}])
def test_every_field_of_the_welcome_is_under_the_coordinators_proof(change):
    """A relay that rewrites (or adds) any field of the Welcome's info keeps the coordinator's proof, which
    no longer matches: the peer refuses, whatever the field."""
    from slowllm.protocol import AuthError, CoordinatorHandshake, PeerHandshake, Welcome, pack, unpack

    secret = b"s" * 32
    info = {"model": "org/model", "max_message_size": 1 << 28, "fingerprint": "f"}
    peer, coordinator = PeerHandshake("node", secret), CoordinatorHandshake(lambda role: [("", secret)], "f", 2)
    auth = peer.on_challenge(coordinator.on_hello(peer.hello()))
    welcome = unpack(coordinator.on_auth(auth, info))
    honest = PeerHandshake("node", secret)
    honest.__dict__.update({k: v for k, v in peer.__dict__.items() if k != "channel"})
    assert honest.on_welcome(pack(welcome)) == info  # the untouched Welcome passes
    with pytest.raises(AuthError, match="altered"):
        peer.on_welcome(pack(Welcome(info={**welcome.info, **change}, proof=welcome.proof)))


def test_typed_jobs_round_trip_and_every_wrong_parameter_is_one_sentence():
    """Job parameters are pydantic models on both ends (protocol/_jobs.py): what a client builds survives
    the wire as the same model, and each wrong name, type or value names the parameter."""
    from slowllm.protocol import InputError, Job, job_params, job_spec

    soft = {"tensor": encode_tensor(torch.ones(2, 4)), "meta": {"source": "p.safetensors"}}
    for kind, params in [("generate", {"prompts": ["a", "b"], "temperature": 0.7, "top_k": 5, "seed": 1, "draft": False}),
                         ("score", {"requests": [{"context": "a", "continuation": "b"}], "soft_prompt": soft,
                                    "compression": "bf16"}),
                         ("tune", {"data": [{"context": "a", "continuation": "b"}], "lr": 1, "send_prompt": True}),
                         ("status", {})]:
        spec = job_spec(kind, params)
        wire = unpack(pack(Job(id=1, job=kind, params=job_params(spec))))
        assert job_spec(wire.job, wire.params) == spec
    for kind, params, words in [
            ("generate", {"prompts": ["a"], "max_new_tokens": 2.5}, "'max_new_tokens' must be a whole number"),
            ("generate", {"prompts": ["a"], "temperature": "hot"}, "'temperature' must be a number, not str"),
            ("generate", {"prompts": ["a"], "top_k": True}, "'top_k' must be a number, not bool"),
            ("generate", {"prompts": []}, "generate needs a non-empty list 'prompts'"),
            ("generate", {}, "generate needs the parameter 'prompts'"),
            ("generate", {"prompts": ["a"], "draft": "yes"}, "'draft' must be true, false or null"),
            ("generate", {"prompts": ["a"], "temprature": 1.0}, "generate has no parameter 'temprature'"),
            ("score", {"requests": [{}], "compression": "zip"}, "unknown compression 'zip'"),
            ("tune", {"data": [], "soft_prompt": soft}, "tune has no parameter 'soft_prompt'"),
            ("score", {"requests": [{}], "soft_prompt": {"tensor": "x"}}, "'soft_prompt.tensor'")]:
        with pytest.raises(InputError, match=re.escape(words)):
            job_spec(kind, params)
