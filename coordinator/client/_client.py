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

`Client([url1, url2, ...])` knows several coordinators of one swarm: a job whose coordinator goes away
(killed, rebooted, unreachable) goes on on the next one from where it was (`_resume.py`), and the client
gives up with one sentence when none has finished it within `resume_within` seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
import time
from typing import TYPE_CHECKING, Callable, Sequence

import websockets

from slowllm.coordinator.jobs._options import Sampling, TuneOptions
from slowllm.protocol import (HANDSHAKE_LIMITS, Error, Event, InputError, Job, JobResult, Limits, PeerHandshake,
                              SlowllmError, UnavailableError, error_from_reply, pack, printable, read_credentials)
from slowllm.protocol._jobs import GenerateJob, SoftPromptParam, job_params, job_spec
from slowllm.utils._aio import why_connection_failed
from slowllm.utils._units import format_ranges, format_span, span_blocks

from ._resume import GenerateState, ScoreState, TuneState

if TYPE_CHECKING:
    import torch

# torch (~1 s to import on 2 cores) is imported only where a tensor is involved (soft prompts, tuning):
# a script or `slowllm generate --coordinator ...` that sends text and reads results never needs it.


class _TooLarge(InputError):
    """A job message over the coordinator's --max-message-size (score jobs are split and resent)."""


class _Gone(UnavailableError):
    """The coordinator could not be reached, or went away during the job: another may run (the rest of) it."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why  # what happened, in a few words (for the notice when another goes on)


class Client:
    def __init__(self, url: str | Sequence[str], *, secret_file: str | os.PathLike | None = None,
                 secret: bytes | None = None, cafile: str | None = None, limits: Limits = Limits(),
                 compression: str = "raw", on_notice: Callable[[str], None] | None = None,
                 resume_within: float = 60.0):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise SlowllmError("give at least one coordinator URL.", code="bad_input")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("ws://", "wss://")):
                raise SlowllmError(f"coordinator URL {u!r} must start with ws:// or wss://.", code="bad_input")
        self.urls, self._at = urls, 0
        self.user, self.secret = ("", secret) if secret is not None else read_credentials(secret_file)
        self.cafile, self.limits, self.compression = cafile, limits, compression
        self.fingerprint: str | None = None
        self.on_notice = on_notice  # e.g. "waiting up to 60 s for nodes serving blocks 3-5"
        self.resume_within = resume_within  # seconds a job may go without any coordinator before it fails

    @property
    def url(self) -> str:
        """The coordinator this client uses now."""
        return self.urls[self._at]

    async def _job(self, spec, on_event: Callable[[dict], None] | None = None) -> dict:
        url = self.url
        ssl_ctx = ssl.create_default_context(cafile=self.cafile) if url.startswith("wss://") else None
        try:
            # no permessage-deflate: activations do not compress, and zlib on megabytes costs more than the wire
            ws = await websockets.connect(url, max_size=HANDSHAKE_LIMITS.max_frame, compression=None, ssl=ssl_ctx,
                                          open_timeout=20)
        except ssl.SSLCertVerificationError as e:
            raise UnavailableError(f"the coordinator's TLS certificate is not trusted ({e.verify_message}): "
                                   "pass --cafile with the CA that signed it.") from None
        except (OSError, websockets.InvalidHandshake, asyncio.TimeoutError) as e:
            why = why_connection_failed(e, url)
            raise _Gone(f"cannot reach the coordinator at {url}: {why}; check the URL and that it is running.",
                        f"cannot be reached ({why})") from None
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
                gone = UnavailableError if e.rcvd is not None and e.rcvd.code == 1008 else _Gone  # 1008: refused
                message = f"the coordinator closed the connection ({reason}); retry the job."
                raise (gone(message, f"closed the connection ({reason})") if gone is _Gone else gone(message)) from None
            except asyncio.TimeoutError:
                raise _Gone(f"the coordinator at {url} did not answer the handshake within 60 s: "
                            "is it a slowllm coordinator?", "did not answer the handshake within 60 s") from None

    def _run(self, spec, on_event=None, state=None):
        """The job on this client's coordinator. When it goes away and the client knows others, the job's
        rest (`state.rest()`) goes to the next, until one finishes it or none did within `resume_within`
        seconds. Returns the last coordinator's result (None: nothing was left to run)."""
        deadline, failures = None, 0
        while True:
            url = self.url
            try:
                return asyncio.run(self._job(spec, state.on_event if state is not None else on_event))
            except _Gone as e:
                if len(self.urls) == 1:
                    raise UnavailableError(str(e)) from None
                failures += 1
                deadline = deadline or time.monotonic() + self.resume_within
                if time.monotonic() > deadline:
                    raise UnavailableError(f"no coordinator of {', '.join(self.urls)} could finish the job within "
                                           f"{self.resume_within:.0f} s (the last: {e}); retry later.") from None
                self._at = (self._at + 1) % len(self.urls)
                if state is not None:
                    spec = state.rest()
                    if spec is None:
                        return None
                if self.on_notice:
                    where = f" {state.resumed_at()}" if state is not None else ""
                    self.on_notice(f"coordinator {url} {e.why}: the job goes on at {self.url}{where}")
                if failures % len(self.urls) == 0:  # each one failed in turn: give them a moment
                    time.sleep(min(2.0, 0.25 * failures))

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
        return self._generate(spec, on_text)

    def _generate(self, spec: GenerateJob, on_text) -> list[dict]:
        state = GenerateState(spec, on_text)
        try:
            return state.done(self._run(spec, state=state))
        except _TooLarge:
            n = len(spec.prompts)
            if n == 1:
                raise
            # many prompts: in as many jobs as it takes (each prompt keeps its row: seeded draws are the same)
            rows, half = spec.rows or list(range(n)), n // 2
            shifted = (lambda i, text: on_text(i + half, text)) if on_text else None
            first = spec.model_copy(update={"prompts": spec.prompts[:half], "rows": rows[:half]})
            second = spec.model_copy(update={"prompts": spec.prompts[half:], "rows": rows[half:]})
            return self._generate(first, on_text) + self._generate(second, shifted)

    def score(self, requests: list[dict], soft_prompt=None) -> list[dict]:
        spec = job_spec("score", {"requests": list(requests), "soft_prompt": self._soft(soft_prompt),
                                  "compression": self.compression})
        try:
            state = ScoreState(spec)
            return state.done(self._run(spec, state=state))
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

        # with several coordinators the prompt comes after every step: another goes on from the latest
        spec = job_spec("tune", {"data": list(data), **dataclasses.asdict(options), "compression": self.compression,
                                 "send_prompt": on_prompt is not None or len(self.urls) > 1})

        def prompt_event(event) -> None:
            self.fingerprint = event.fingerprint[:64] if event.fingerprint else self.fingerprint
            if on_prompt:
                on_prompt(event.step, decode_tensor(event.prompt, self.limits))

        state = TuneState(spec, on_step, prompt_event)
        result = state.done(self._run(spec, state=state))
        prompt = decode_tensor(result.prompt, self.limits)
        if not torch.isfinite(prompt).all():
            raise SlowllmError("the coordinator returned a non-finite soft prompt; nothing was saved.")
        self.fingerprint = result.fingerprint[:64] or self.fingerprint
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
