"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), written once over any `ApiBackend`.

`slowllm serve --local` backs it with this process's chain (`LocalBackend`); `slowllm-coordinator
--http-port` with the swarm (`SwarmBackend`). Requests share passes: the `Batcher` steps every running
request in one pass over the weights, and a request that arrives meanwhile joins the next pass (what
makes local streaming usable by several users). Streams flush per token; a client that disconnects has
its rows stopped at their next token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import queue
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Protocol

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from slowllm.coordinator.jobs._detokenize import StopText
from slowllm.coordinator.jobs._ends import ModelEnds
from slowllm.coordinator.jobs._generate import Continuation, Generation
from slowllm.coordinator.jobs._options import Sampling
from slowllm.protocol import BusyError, SlowllmError, UnavailableError
from slowllm.utils._openmp import ComputeThread
from slowllm.utils._units import format_ranges

from ._guard import RequestGuard, check_prompt_chars, longest_token_chars
from ._guard import max_request_bytes as default_request_bytes
from ._openai import (DEFAULT_CHAT_TEMPLATE, ApiError, ChatRequest, CompletionRequest, chat_logprobs,
                      completion_logprobs, model_chat_template, prompt_rows, render_chat)

log = logging.getLogger("slowllm.http")
SOFT_PROMPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ApiBackend(Protocol):
    """What the API needs from a mode: the model's ends, a way to run a batch, and who may use it."""

    model_id: str
    ends: ModelEnds
    n_layer: int
    max_new_tokens: int

    def start(self, rows: list[Continuation], sampling: Sampling, soft_prompt: torch.Tensor | None) -> Generation:
        """A batch of rows, ready to step (its prompt pass is its first step)."""

    def step(self, jobs: list[Generation]) -> None:
        """One pass over the model for every job's next step."""

    def soft_prompt(self, path: Path) -> torch.Tensor: ...

    def missing(self) -> list[int]: ...

    def nodes(self) -> int: ...

    def admitted(self, user: str, kind: str):
        """A context holding an admission slot for one HTTP request (BusyError when none is free)."""
        ...

    def user(self, token: str | None) -> str | None:
        """The user a bearer token belongs to; "" when no key is needed; None when refused."""

    def warnings_since(self, started: float) -> list[str]:
        """What a response begun at `started` (time.time()) must warn of: nodes that served this API and
        were banned since (their answers may be wrong)."""
        return []


@dataclasses.dataclass
class _Pending:
    rows: list[Continuation]
    sampling: Sampling
    soft_name: str | None
    future: concurrent.futures.Future
    cancelled: threading.Event

    def key(self) -> tuple:
        s = self.sampling
        if s.temperature == 0:
            return (0, self.soft_name)
        # a seeded request must get the same samples whoever else is waiting: it runs alone
        return (s.temperature, s.top_k, s.top_p, id(self) if s.seed is not None else None, self.soft_name)


class Batcher:
    """One thread that drives every running request, one pass over the weights at a time.

    Between passes it takes what arrived: compatible requests become one `Generation` (one batch), and
    every running generation's next step goes into the same pass (`step_together`). So a request that
    arrives while others generate joins the next pass; only the first request of an idle server waits
    `window` seconds for company.
    """

    def __init__(self, start: Callable[[list[Continuation], Sampling, str | None], Generation],
                 step: Callable[[list[Generation]], None], window: float = 0.05, max_pending: int = 256,
                 compute: ComputeThread | None = None):
        self.start, self.step, self.window, self.max_pending = start, step, window, max_pending
        self.queue: queue.Queue[_Pending] = queue.Queue()
        self.batches = 0  # generations started (the bench and the tests read it)
        self.passes = 0
        # on the thread that loaded the model, where there is one (see utils/_openmp.py)
        (compute or ComputeThread("slowllm-http-batcher")).submit(self._loop)

    def submit(self, pending: _Pending) -> None:
        if self.queue.qsize() >= self.max_pending:
            raise ApiError(429, f"{self.max_pending} requests are already waiting: retry in a few seconds.",
                           type="rate_limit_error", headers={"Retry-After": "5"})
        self.queue.put(pending)

    def _arrivals(self, block: bool) -> list[_Pending]:
        waiting = []
        if block:
            waiting.append(self.queue.get())
            time.sleep(self.window)  # requests that arrive together are generated together
        with contextlib.suppress(queue.Empty):
            while True:
                waiting.append(self.queue.get_nowait())
        return [p for p in waiting if not p.cancelled.is_set()]

    def _loop(self) -> None:
        running: list[tuple[Generation, list[_Pending]]] = []
        while True:
            groups: dict[tuple, list[_Pending]] = {}
            for p in self._arrivals(block=not running):
                groups.setdefault(p.key(), []).append(p)
            for group in groups.values():
                try:
                    job = self.start([row for p in group for row in p.rows], group[0].sampling, group[0].soft_name)
                except BaseException as e:  # e.g. a bad soft prompt: those requests learn why
                    for p in group:
                        p.future.set_exception(e)
                    continue
                self.batches += 1
                running.append((job, group))
            if not running:
                continue
            try:
                self.step([job for job, _ in running])
                self.passes += 1
            except BaseException as e:  # every running request learns why
                for job, group in running:
                    job.close()
                    for p in group:
                        p.future.set_exception(e)
                running = []
                continue
            still = []
            for job, group in running:
                if not job.done:
                    still.append((job, group))
                    continue
                results, at = job.results(), 0
                for p in group:
                    p.future.set_result(results[at:at + len(p.rows)])
                    at += len(p.rows)
            running = still


class _Slot:
    """An admission slot held by an HTTP request: entered now, released once (by the handler's `with`, or
    by a stream's end or its background task, whichever comes first)."""

    def __init__(self, context):
        self._context = context
        context.__enter__()
        self._open = True

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._open:
            self._open = False
            self._context.__exit__(None, None, None)


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop"}.get(reason, "length")


MAX_ROWS = 256  # prompts x n in one request


def make_app(backend: ApiBackend, *, soft_prompts: str | None = None, chat_template: str | None = None,
             window: float = 0.05, max_pending: int = 256, max_prompt_tokens: int = 16384,
             max_request_bytes: int | None = None, compute: ComputeThread | None = None) -> FastAPI:
    app = FastAPI(title="slowllm", docs_url=None, redoc_url=None, openapi_url=None)
    ends = backend.ends
    # checked before any work (`_http_guard`): the key before the body, the body's size, a prompt's characters
    token_chars = longest_token_chars(ends.tokenizer)
    max_chars = max_prompt_tokens * token_chars
    app.add_middleware(RequestGuard, user=backend.user,
                       max_bytes=max_request_bytes or default_request_bytes(max_prompt_tokens, token_chars))
    # --chat-template, else the checkpoint's own (a Llama instruct model's tokenizer_config.json has one),
    # else the Bloomz-style default
    template = chat_template or model_chat_template(ends) or DEFAULT_CHAT_TEMPLATE
    created = int(time.time())
    soft_cache: dict[str, torch.Tensor] = {}

    def soft(name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        if soft_prompts is None:
            raise ApiError(400, "this server has no soft prompts: start it with --soft-prompts DIR.", param="soft_prompt")
        if not SOFT_PROMPT_NAME.match(name) or not (Path(soft_prompts) / f"{name}.safetensors").is_file():
            raise ApiError(404, f"no soft prompt named {name!r} here.", param="soft_prompt", code="soft_prompt_not_found")
        if name not in soft_cache:
            soft_cache[name] = backend.soft_prompt(Path(soft_prompts) / f"{name}.safetensors")
        return soft_cache[name]

    batcher = Batcher(lambda rows, s, name: backend.start(rows, s, soft(name)), backend.step, window, max_pending,
                      compute)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return await api_error(request, ApiError(400, f"{where or 'request'}: {first.get('msg', 'invalid')}.",
                                                 param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return await api_error(request, ApiError(e.status_code, str(e.detail), code=None))

    def check(request: Request, model: str | None = None) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        user = backend.user(token.strip() if scheme.lower() == "bearer" else None)
        if user is None:
            raise ApiError(401, "Incorrect API key provided: pass your slowllm key as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        if model is not None and model != backend.model_id:
            raise ApiError(404, f"The model {model!r} does not exist here: this server runs {backend.model_id!r}.",
                           param="model", code="model_not_found")
        return user

    @app.get("/v1/models")
    async def models(request: Request):
        check(request)
        return {"object": "list", "data": [{"id": backend.model_id, "object": "model", "created": created,
                                            "owned_by": "slowllm", "blocks": backend.n_layer,
                                            "nodes": backend.nodes(), "missing": backend.missing()}]}

    def sampling_of(req) -> Sampling:
        top_k = req.top_k if req.top_k not in (None, 0, -1) else None
        temperature = 1.0 if req.temperature is None else req.temperature
        s = Sampling(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=req.top_p, seed=req.seed)
        try:
            s.check()
        except SlowllmError as e:
            raise ApiError(400, str(e).replace("--", "").replace("-", "_", 1)) from None
        return s

    def admit(req, max_tokens: int, prompts: list[list[int]]) -> None:
        req.check_unsupported()
        longest = max(map(len, prompts))
        if longest > max_prompt_tokens:
            raise ApiError(400, f"a prompt of {longest} tokens exceeds this server's limit of {max_prompt_tokens} "
                                "(--max-prompt-tokens).", param="prompt", code="context_length_exceeded")
        if len(prompts) * req.n > MAX_ROWS:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_ROWS} completions in one "
                                "request: send fewer.", param="prompt")
        soft(req.soft_prompt)  # an unknown name is a 404 now, not an error event inside a stream
        if max_tokens > backend.max_new_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {backend.max_new_tokens}.",
                           param="max_tokens")
        missing = backend.missing()
        if missing:
            raise ApiError(503, f"blocks {format_ranges(missing)} are not served by any node: start nodes for them, then "
                                "retry.", type="server_error", code="blocks_missing", headers={"Retry-After": "10"})

    async def submit(request: Request, rows, sampling, soft_name, choices, on_event=None):
        """Queue the rows, wait for their results; a client that goes away stops them."""
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        for row, choice in zip(rows, choices):
            # on the stepping thread, token by token: the text, the stop strings, the delta to stream
            row.stop = (lambda ids, c=choice: cancelled.is_set() or c.hit)
            if on_event:
                row.on_token = (lambda t, e, c=choice: loop.call_soon_threadsafe(on_event, c, c.feed(t), t, e))
            else:
                row.on_token = (lambda t, e, c=choice: c.feed(t))
        pending = _Pending(rows, sampling, soft_name, concurrent.futures.Future(), cancelled)
        batcher.submit(pending)
        future = asyncio.wrap_future(pending.future)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.5)
                if done:
                    return future.result()
                if on_event is None and await request.is_disconnected():
                    cancelled.set()
        finally:
            if not future.done():
                cancelled.set()

    def translate(e: BaseException) -> ApiError:
        if isinstance(e, ApiError):
            return e
        if isinstance(e, BusyError):
            return ApiError(429, str(e), type="rate_limit_error", headers={"Retry-After": "5"})
        if isinstance(e, UnavailableError):
            return ApiError(503, str(e), type="server_error", headers={"Retry-After": "10"})
        if isinstance(e, SlowllmError):
            return ApiError(400, str(e))
        log.exception("request failed", exc_info=e)
        return ApiError(500, f"the server failed on this request ({type(e).__name__}).", type="server_error")

    def hold(request: Request, user: str, kind: str) -> _Slot:
        """An admission slot for this request, through the same admission as the coordinator's jobs."""
        who = user or (request.client.host if request.client else "http")
        try:
            return _Slot(backend.admitted(who, kind))
        except BaseException as e:  # BusyError: 429 with Retry-After, before any byte of a stream is sent
            raise translate(e) from None

    def held(gen, slot: _Slot) -> StreamingResponse:
        """A stream that gives its admission slot back when it ends, or when it never starts."""
        async def body():
            try:
                async for part in gen:
                    yield part
            finally:
                slot.release()
        return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(slot.release))

    def usage(prompts: list[list[int]], results: list[dict]) -> dict:
        prompt = sum(map(len, prompts))
        completion = sum(len(r["token_ids"]) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def warned(started: float) -> dict:
        warnings = backend.warnings_since(started)
        return {"warnings": warnings} if warnings else {}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(request, prompts, rows, sampling, soft_name, choices, chunk, tail, include_usage):
        """Server-sent events: a chunk per token, then each choice's end, usage if asked, `[DONE]`."""
        events: asyncio.Queue = asyncio.Queue()

        def on_event(choice, piece, token, entry):
            events.put_nowait((choice, piece, token, entry))

        started = time.time()
        task = asyncio.ensure_future(submit(request, rows, sampling, soft_name, choices, on_event))
        try:
            while not (task.done() and events.empty()):
                try:
                    choice, piece, token, entry = await asyncio.wait_for(events.get(), 0.25)
                except asyncio.TimeoutError:
                    continue
                if piece:
                    yield sse(chunk(choices.index(choice), piece, token, entry))
            try:
                results = task.result()
            except BaseException as e:
                yield sse(translate(e).body())
                return
            for i, (choice, r) in enumerate(zip(choices, results)):
                yield sse(tail(i, choice.finish(), _finish("stop" if choice.hit else r["finish_reason"])))
            if include_usage:
                yield sse({**chunk(0, "", None, None), "choices": [], "usage": usage(prompts, results)})
            warnings = backend.warnings_since(started)
            if warnings:
                yield sse({**chunk(0, "", None, None), "choices": [], "warnings": warnings})
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        user = check(request, req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
        check_prompt_chars(texts, max_chars)
        prompts = await asyncio.to_thread(prompt_rows, req.prompt, ends)  # (tokenizing: off the event loop)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens 0 needs echo: true (scoring the prompt).", param="max_tokens")
        if req.best_of not in (None, 1, req.n) or req.suffix:
            raise ApiError(400, "best_of and suffix are not supported.", param="best_of")
        admit(req, max_tokens, prompts)
        sampling, stops = sampling_of(req), req.stops()
        top = req.logprobs
        rows = [Continuation(list(ids), max_tokens, logprobs=top,
                             prompt_logprobs=top if req.echo and top is not None else None)
                for ids in prompts for _ in range(req.n)]
        choices = [StopText(ends, stops) for _ in rows]
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id}

        def chunk(i, text, token, entry):
            lp = None if top is None or token is None else completion_logprobs(ends, [token], [entry])
            return {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}]}

        def tail(i, text, reason):
            return {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

        if req.stream:
            if req.echo:  # the prompt text first, as OpenAI streams it
                for c, ids in zip(choices, [p for p in prompts for _ in range(req.n)]):
                    c.prefix = ends.decode(ids)
            gen = stream(request, prompts, rows, sampling, req.soft_prompt, choices, chunk, tail,
                         bool((req.stream_options or {}).get("include_usage")))
            if req.echo:
                gen = _prefixed(gen, [sse(tail(i, c.prefix, None)) for i, c in enumerate(choices)])
            return held(gen, hold(request, user, "completions"))
        started = time.time()
        try:
            with hold(request, user, "completions"):
                results = await submit(request, rows, sampling, req.soft_prompt, choices)
        except BaseException as e:
            raise translate(e) from None
        out = []
        for i, (row, r, c) in enumerate(zip(rows, results, choices)):
            c.finish()
            text = c.text
            kept = r["token_ids"]
            reason = _finish("stop" if c.hit else r["finish_reason"])
            prompt_text = ends.decode(row.ids) if req.echo else ""
            lp = None
            if top is not None:
                entries = r.get("logprobs", [])
                if req.echo:
                    lp = completion_logprobs(ends, row.ids + kept, r["prompt_logprobs"] + entries)
                else:
                    lp = completion_logprobs(ends, kept, entries, 0)
            out.append({"index": i, "text": prompt_text + text, "logprobs": lp, "finish_reason": reason})
        return {**head, "choices": out, "usage": usage(prompts, results), **warned(started)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        user = check(request, req.model)
        text = render_chat(req.messages, template, ends)
        check_prompt_chars([text], max_chars)
        ids = await asyncio.to_thread(ends.encode_prompt, text)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(512, backend.max_new_tokens)
        if max_tokens < 1:
            raise ApiError(400, "max_tokens must be at least 1.", param="max_tokens")
        admit(req, max_tokens, [ids])
        sampling, stops = sampling_of(req), req.stops()
        top = (req.top_logprobs or 0) if req.logprobs else None
        rows = [Continuation(list(ids), max_tokens, logprobs=top) for _ in range(req.n)]
        choices = [StopText(ends, stops) for _ in rows]
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": backend.model_id}

        def chunk(i, text, token, entry):
            lp = None if top is None or token is None else chat_logprobs(ends, [token], [entry])
            return {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": text}, "logprobs": lp,
                                         "finish_reason": None}]}

        def tail(i, text, reason):
            return {**head, "choices": [{"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                                         "finish_reason": reason}]}

        if req.stream:
            return held(stream(request, [ids], rows, sampling, req.soft_prompt, choices, chunk, tail,
                               bool((req.stream_options or {}).get("include_usage"))), hold(request, user, "chat"))
        started = time.time()
        try:
            with hold(request, user, "chat"):
                results = await submit(request, rows, sampling, req.soft_prompt, choices)
        except BaseException as e:
            raise translate(e) from None
        out = []
        for i, (r, c) in enumerate(zip(results, choices)):
            c.finish()
            text = c.text
            lp = chat_logprobs(ends, r["token_ids"], r["logprobs"]) if top is not None else None
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                        "finish_reason": _finish("stop" if c.hit else r["finish_reason"])})
        return {**head, "object": "chat.completion", "choices": out, "usage": usage([ids], results),
                **warned(started)}

    return app


async def _prefixed(gen, first: list[str]):
    for item in first:
        yield item
    async for item in gen:
        yield item


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside a process that handles its own signals (the coordinator): it must not take them."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def server(app: FastAPI, host: str, port: int, embedded: bool = False) -> uvicorn.Server:
    # a stop (SIGTERM, Ctrl-C) ends open requests after 5 s instead of waiting for a long generation
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    return (EmbeddedServer if embedded else uvicorn.Server)(config)
