"""The Python client: run jobs through a coordinator.

    from slowllm.coordinator import Client, Sampling
    with Client("ws://127.0.0.1:8765", secret_file="secret.txt") as c:
        print(c.generate(["Is the sky blue?"], Sampling(max_new_tokens=5)))
        c.score([{"context": "Is the sky blue?", "choices": [" Yes", " No"]}])
        c.tune([{"context": "Is fire cold?", "continuation": " No."}], TuneOptions(steps=10),
               out="prompt.safetensors")
        print(c.status())

Each call opens a connection, authenticates both ways (protocol.PeerHandshake), sends one job and reads its
streamed events until the result. Errors from the coordinator come back as `SlowllmError`s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from typing import TYPE_CHECKING, Callable

import websockets

from slowllm.coordinator.jobs._options import Sampling, TuneOptions
from slowllm.protocol import (HANDSHAKE_LIMITS, Error, Event, InputError, Job, JobResult, Limits, PeerHandshake,
                              SlowllmError, UnavailableError, error_from_reply, pack, printable, read_credentials)
from slowllm.protocol._jobs import (GenerateResult, ScoreResult, SoftPromptParam, StepEvent, TextEvent, TuneResult,
                                    job_params, job_spec)
from slowllm.utils._aio import why_connection_failed
from slowllm.utils._units import format_ranges, format_span, span_blocks

if TYPE_CHECKING:
    import torch

# torch (~1 s to import on 2 cores) is imported only where a tensor is involved (soft prompts, tuning):
# a script or `slowllm generate --coordinator ...` that sends text and reads results never needs it.


class _TooLarge(InputError):
    """A job message over the coordinator's --max-message-size (score jobs are split and resent)."""


class Client:
    def __init__(self, url: str, *, secret_file: str | os.PathLike | None = None, secret: bytes | None = None,
                 cafile: str | None = None, limits: Limits = Limits(), compression: str = "raw",
                 on_notice: Callable[[str], None] | None = None):
        if not url.startswith(("ws://", "wss://")):
            raise SlowllmError(f"coordinator URL {url!r} must start with ws:// or wss://.", code="bad_input")
        self.url = url
        self.user, self.secret = ("", secret) if secret is not None else read_credentials(secret_file)
        self.cafile, self.limits, self.compression = cafile, limits, compression
        self.fingerprint: str | None = None
        self.on_notice = on_notice  # e.g. "waiting up to 60 s for nodes serving blocks 3-5"

    async def _job(self, spec, on_event: Callable[[dict], None] | None = None) -> dict:
        ssl_ctx = ssl.create_default_context(cafile=self.cafile) if self.url.startswith("wss://") else None
        try:
            # no permessage-deflate: activations do not compress, and zlib on megabytes costs more than the wire
            ws = await websockets.connect(self.url, max_size=HANDSHAKE_LIMITS.max_frame, compression=None, ssl=ssl_ctx,
                                          open_timeout=20)
        except ssl.SSLCertVerificationError as e:
            raise UnavailableError(f"the coordinator's TLS certificate is not trusted ({e.verify_message}): "
                                   "pass --cafile with the CA that signed it.") from None
        except (OSError, websockets.InvalidHandshake, asyncio.TimeoutError) as e:
            raise UnavailableError(f"cannot reach the coordinator at {self.url}: {why_connection_failed(e, self.url)}; "
                                   "check the URL and that it is running.") from None
        async with ws:
            try:
                hs = PeerHandshake("client", self.secret, self.user)
                await ws.send(hs.hello())
                await ws.send(hs.on_challenge(await asyncio.wait_for(ws.recv(), 60)))
                info = hs.on_welcome(await asyncio.wait_for(ws.recv(), 60))
                channel = hs.channel
                ws.protocol.max_message_size = self.limits.max_frame  # authenticated: results may be large
                self.fingerprint = hs.challenge.fingerprint
                limit = info.get("max_message_size", self.limits.max_frame)
                limit = limit if isinstance(limit, int) else self.limits.max_frame
                frame = pack(Job(id=1, job=spec.job, params=job_params(spec)))
                if len(frame) > limit:
                    raise _TooLarge(f"this {spec.job} job is {len(frame)} bytes, more than the coordinator's "
                                    f"--max-message-size of {limit}: send less at once.")
                await ws.send(channel.seal(frame))
                while True:
                    msg = channel.unpack(await ws.recv(), self.limits)
                    if isinstance(msg, Event) and "notice" in msg.data:
                        if self.on_notice:
                            self.on_notice(str(msg.data["notice"]))
                    elif isinstance(msg, Event) and on_event:
                        on_event(msg.data)
                    elif isinstance(msg, JobResult):
                        return msg.data
                    elif isinstance(msg, Error):
                        raise error_from_reply(msg.code, msg.message)
            except websockets.ConnectionClosed as e:
                reason = printable(e.rcvd.reason, 120) if e.rcvd and e.rcvd.reason else "no reason"
                raise UnavailableError(f"the coordinator closed the connection ({reason}); retry the job.") from None
            except asyncio.TimeoutError:
                raise UnavailableError(f"the coordinator at {self.url} did not answer the handshake within 60 s: "
                                       "is it a slowllm coordinator?") from None

    def _run(self, spec, on_event=None) -> dict:
        return asyncio.run(self._job(spec, on_event))

    def _soft(self, path) -> SoftPromptParam | None:
        if path is None:
            return None
        from slowllm.coordinator.jobs._softprompt import check_finite_prompt, read_soft_prompt
        from slowllm.protocol._tensors import encode_tensor

        tensor, meta = read_soft_prompt(path)
        check_finite_prompt(tensor, str(path))
        return SoftPromptParam(tensor=encode_tensor(tensor), meta={**meta, "source": str(path)})

    def generate(self, prompts: list[str], sampling: Sampling = Sampling(), soft_prompt=None,
                 on_text: Callable[[int, str], None] | None = None, draft: bool | None = None,
                 draft_tokens: int | None = None) -> list[dict]:
        """`draft`: use the coordinator's draft model (None: whenever it has one); `draft_tokens`: most per pass."""
        # typed as the coordinator reads it: a wrong parameter is one sentence here, before anything is sent
        spec = job_spec("generate", {"prompts": list(prompts), **dataclasses.asdict(sampling), "draft": draft,
                                     "soft_prompt": self._soft(soft_prompt), "compression": self.compression,
                                     "draft_tokens": draft_tokens})

        def on_event(d: dict) -> None:
            event = TextEvent.model_validate(d)
            on_text(event.prompt, event.text)
        try:
            result = GenerateResult.model_validate(self._run(spec, on_event if on_text else None))
            return [row.model_dump() for row in result.results]
        except _TooLarge:
            if len(prompts) == 1:
                raise
            half = len(prompts) // 2  # many prompts: in as many jobs as it takes (a different seed stream each)
            shifted = (lambda i, text: on_text(i + half, text)) if on_text else None
            return (self.generate(prompts[:half], sampling, soft_prompt, on_text, draft, draft_tokens)
                    + self.generate(prompts[half:], sampling, soft_prompt, shifted, draft, draft_tokens))

    def score(self, requests: list[dict], soft_prompt=None) -> list[dict]:
        spec = job_spec("score", {"requests": list(requests), "soft_prompt": self._soft(soft_prompt),
                                  "compression": self.compression})
        try:
            return [line.model_dump() for line in ScoreResult.model_validate(self._run(spec)).results]
        except _TooLarge:
            if len(requests) == 1:
                raise
            half = len(requests) // 2  # a scoring file of any length: in as many jobs as it takes
            return self.score(requests[:half], soft_prompt) + self.score(requests[half:], soft_prompt)

    def tune(self, data: list[dict], options: TuneOptions = TuneOptions(), out=None,
             on_step: Callable[[int, float], None] | None = None,
             on_prompt: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        import torch

        from slowllm.protocol._tensors import decode_tensor

        spec = job_spec("tune", {"data": list(data), **dataclasses.asdict(options), "send_prompt": on_prompt is not None,
                                 "compression": self.compression})

        def on_event(d: dict) -> None:
            event = StepEvent.model_validate(d)
            if on_prompt and event.prompt is not None:
                self.fingerprint = (event.fingerprint or self.fingerprint or "")[:64]
                on_prompt(event.step, decode_tensor(event.prompt, self.limits))
            if on_step:
                on_step(event.step, event.loss)

        result = TuneResult.model_validate(self._run(spec, on_event))
        prompt = decode_tensor(result.prompt, self.limits)
        if not torch.isfinite(prompt).all():
            raise SlowllmError("the coordinator returned a non-finite soft prompt; nothing was saved.")
        self.fingerprint = result.fingerprint[:64]
        if out is not None:
            self.save_prompt(out, prompt)
        return prompt

    def save_prompt(self, out, prompt: torch.Tensor) -> None:
        from slowllm.coordinator.jobs._softprompt import save_soft_prompt

        save_soft_prompt(out, prompt, self.fingerprint, self.url)

    def set_progress(self, on: bool) -> None:
        pass  # the work runs at the coordinator and its nodes: no progress bar here

    def status(self) -> dict:
        return self._run(job_spec("status", {}))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_status(status: dict) -> str:
    nodes = [n for n in status["nodes"] if not n.get("banned")]
    family = f" ({status['family']})" if status.get("family") else ""
    lines = [f"model {status['model']}{family}: {_plural(status['n_layer'], 'block')}, {_plural(len(nodes), 'node')}, "
             f"{_plural(status.get('active_jobs', 0), 'active job')}, {_plural(status.get('failovers', 0), 'failover')}"]
    if status.get("draft_model"):
        lines[0] += f", draft {status['draft_model']}"
    for node in status["nodes"]:
        a, b = node["layers"]
        line = (f"  {node['name']:<20} blocks {format_span(a, b):<7} {node['device']}/{_precision(node):<14} "
                f"speed {node['speed']:>8.1f} token-blocks/s  load {node['load']}  "
                f"{_plural(node['sessions'], 'session')}")
        lines.append(f"  {node['name']:<20} blocks {format_span(a, b):<7} BANNED: {node.get('reason', '')}"
                     if node.get("banned") else line)
    lines.append("missing blocks: " + (format_ranges(status["missing"]) or "none"))
    if "unverified_spans" in status:
        spans = format_ranges(span_blocks(status["unverified_spans"])) or "none"
        lines.append(f"verify {status.get('verify', 0)}: {status.get('verified_hops', 0)} hops checked, "
                     f"{status.get('disagreements', 0)} disagreements; blocks only one node covers: {spans}")
    return "\n".join(lines)


def _precision(node: dict) -> str:
    """dtype, and int8 when the node's weights are an int8 copy (older coordinators do not say)."""
    return node["dtype"] + ("+int8" if node.get("quantization") == "int8" else "")
