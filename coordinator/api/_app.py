"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), written once over any `ApiBackend`.

`slowllm serve --local` backs it with this process's chain (`LocalBackend`); `slowllm-coordinator
--http-port` with the swarm (`SwarmBackend`). `OpenAIServer` holds the API's state and has one method per
endpoint; both completion endpoints make their rows, then hand them to one response builder (`_respond`),
which streams them as server-sent events or waits for them, and a `_Shape` says what differs: ids, object
names and how a chunk and a choice look. Requests share passes through the `Batcher` (`_batcher.py`).
Streams flush per token; a client that disconnects has its rows stopped at their next token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from slowllm.coordinator.jobs._detokenize import StopText
from slowllm.coordinator.jobs._generate import Continuation
from slowllm.coordinator.jobs._options import Sampling
from slowllm.protocol import BusyError, SlowllmError, UnavailableError
from slowllm.utils._openmp import ComputeThread
from slowllm.utils._units import format_ranges

from ._backends import ApiBackend
from ._batcher import Batcher, _Pending
from ._guard import RequestGuard, check_prompt_chars, longest_token_chars
from ._guard import max_request_bytes as default_request_bytes
from ._openai import (DEFAULT_CHAT_TEMPLATE, ApiError, ChatRequest, CompletionRequest, chat_logprobs,
                      completion_logprobs, model_chat_template, prompt_rows, render_chat)

log = logging.getLogger("slowllm.http")
SOFT_PROMPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_ROWS = 256  # prompts x n in one request


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


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclasses.dataclass
class _Shape:
    """What differs between /v1/completions and /v1/chat/completions once the rows are made."""

    kind: str  # the admission's name for it: "completions" or "chat"
    head: dict  # id, object, created, model: every chunk and the response carry them
    chunk: Callable  # (index, text, token, logprob entry) -> a streamed chunk
    tail: Callable  # (index, text, finish reason) -> a choice's last chunk
    choice: Callable  # (index, row, result, StopText) -> a whole choice of the response
    response_object: str


class OpenAIServer:
    """The API: its state (backend, batcher, limits, soft prompts, template) and one method per endpoint."""

    def __init__(self, backend: ApiBackend, *, soft_prompts: str | None = None, chat_template: str | None = None,
                 window: float = 0.05, max_pending: int = 256, max_prompt_tokens: int = 16384,
                 max_request_bytes: int | None = None, compute: ComputeThread | None = None):
        self.backend, self.ends, self.soft_prompts = backend, backend.ends, soft_prompts
        self.max_prompt_tokens = max_prompt_tokens
        # checked before any work (`_guard`): the key before the body, the body's size, a prompt's characters
        self.token_chars = longest_token_chars(self.ends.tokenizer)
        self.max_chars = max_prompt_tokens * self.token_chars
        self.max_request_bytes = max_request_bytes or default_request_bytes(max_prompt_tokens, self.token_chars)
        # --chat-template, else the checkpoint's own (a Llama instruct model's tokenizer_config.json has one),
        # else the Bloomz-style default
        self.template = chat_template or model_chat_template(self.ends) or DEFAULT_CHAT_TEMPLATE
        self.created = int(time.time())
        self._soft_cache: dict[str, torch.Tensor] = {}
        self.batcher = Batcher(lambda rows, s, name: backend.start(rows, s, self.soft(name)), backend.step, window,
                               max_pending, compute)
        self.app = self._routes()

    def _routes(self) -> FastAPI:
        app = FastAPI(title="slowllm", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(RequestGuard, user=self.backend.user, max_bytes=self.max_request_bytes)
        app.state.batcher = self.batcher  # the bench and the tests count its batches
        app.exception_handler(ApiError)(self._api_error)
        app.exception_handler(RequestValidationError)(self._invalid)
        app.exception_handler(HTTPException)(self._http_error)
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        return app

    # ---- errors: every one is an OpenAI error object ----------------------------------------------------
    @staticmethod
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def _invalid(self, request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return await self._api_error(request, ApiError(400, f"{where or 'request'}: {first.get('msg', 'invalid')}.",
                                                       param=where or None))

    async def _http_error(self, request, e: HTTPException):
        return await self._api_error(request, ApiError(e.status_code, str(e.detail), code=None))

    @staticmethod
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

    # ---- what every request is checked for ----------------------------------------------------------------
    def soft(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        if self.soft_prompts is None:
            raise ApiError(400, "this server has no soft prompts: start it with --soft-prompts DIR.", param="soft_prompt")
        path = Path(self.soft_prompts) / f"{name}.safetensors"
        if not SOFT_PROMPT_NAME.match(name) or not path.is_file():
            raise ApiError(404, f"no soft prompt named {name!r} here.", param="soft_prompt", code="soft_prompt_not_found")
        if name not in self._soft_cache:
            self._soft_cache[name] = self.backend.soft_prompt(path)
        return self._soft_cache[name]

    def check(self, request: Request, model: str | None = None) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        user = self.backend.user(token.strip() if scheme.lower() == "bearer" else None)
        if user is None:
            raise ApiError(401, "Incorrect API key provided: pass your slowllm key as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        if model is not None and model != self.backend.model_id:
            raise ApiError(404, f"The model {model!r} does not exist here: this server runs {self.backend.model_id!r}.",
                           param="model", code="model_not_found")
        return user

    @staticmethod
    def sampling_of(req) -> Sampling:
        top_k = req.top_k if req.top_k not in (None, 0, -1) else None
        temperature = 1.0 if req.temperature is None else req.temperature
        s = Sampling(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=req.top_p, seed=req.seed)
        try:
            s.check()
        except SlowllmError as e:
            raise ApiError(400, str(e).replace("--", "").replace("-", "_", 1)) from None
        return s

    def admit(self, req, max_tokens: int, prompts: list[list[int]]) -> None:
        req.check_unsupported()
        longest = max(map(len, prompts))
        if longest > self.max_prompt_tokens:
            raise ApiError(400, f"a prompt of {longest} tokens exceeds this server's limit of {self.max_prompt_tokens} "
                                "(--max-prompt-tokens).", param="prompt", code="context_length_exceeded")
        if len(prompts) * req.n > MAX_ROWS:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_ROWS} completions in one "
                                "request: send fewer.", param="prompt")
        self.soft(req.soft_prompt)  # an unknown name is a 404 now, not an error event inside a stream
        if max_tokens > self.backend.max_new_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {self.backend.max_new_tokens}.",
                           param="max_tokens")
        missing = self.backend.missing()
        if missing:
            raise ApiError(503, f"blocks {format_ranges(missing)} are not served by any node: start nodes for them, then "
                                "retry.", type="server_error", code="blocks_missing", headers={"Retry-After": "10"})

    def hold(self, request: Request, user: str, kind: str) -> _Slot:
        """An admission slot for this request, through the same admission as the coordinator's jobs."""
        who = user or (request.client.host if request.client else "http")
        try:
            return _Slot(self.backend.admitted(who, kind))
        except BaseException as e:  # BusyError: 429 with Retry-After, before any byte of a stream is sent
            raise self.translate(e) from None

    # ---- the endpoints --------------------------------------------------------------------------------------
    async def models(self, request: Request):
        self.check(request)
        b = self.backend
        return {"object": "list", "data": [{"id": b.model_id, "object": "model", "created": self.created,
                                            "owned_by": "slowllm", "blocks": b.n_layer, "nodes": b.nodes(),
                                            "missing": b.missing()}]}

    async def completions(self, req: CompletionRequest, request: Request):
        user, ends = self.check(request, req.model), self.ends
        texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
        check_prompt_chars(texts, self.max_chars)
        prompts = await asyncio.to_thread(prompt_rows, req.prompt, ends)  # (tokenizing: off the event loop)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens 0 needs echo: true (scoring the prompt).", param="max_tokens")
        if req.best_of not in (None, 1, req.n) or req.suffix:
            raise ApiError(400, "best_of and suffix are not supported.", param="best_of")
        self.admit(req, max_tokens, prompts)
        top = req.logprobs
        rows = [Continuation(list(ids), max_tokens, logprobs=top, key=key,  # (key: a seeded row's draws)
                             prompt_logprobs=top if req.echo and top is not None else None)
                for key, ids in enumerate(ids for ids in prompts for _ in range(req.n))]
        head = self._head("cmpl", "text_completion")

        def chunk(i, text, token, entry):
            lp = None if top is None or token is None else completion_logprobs(ends, [token], [entry])
            return {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}]}

        def tail(i, text, reason):
            return {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

        def choice(i, row, r, c):
            kept, lp = r["token_ids"], None
            if top is not None:
                entries = r.get("logprobs", [])
                if req.echo:
                    lp = completion_logprobs(ends, row.ids + kept, r["prompt_logprobs"] + entries)
                else:
                    lp = completion_logprobs(ends, kept, entries, 0)
            prompt_text = ends.decode(row.ids) if req.echo else ""
            return {"index": i, "text": prompt_text + c.text, "logprobs": lp,
                    "finish_reason": _finish("stop" if c.hit else r["finish_reason"])}

        shape = _Shape("completions", head, chunk, tail, choice, "text_completion")
        # echo while streaming: the prompt text first, as OpenAI streams it
        echo = [ends.decode(row.ids) for row in rows] if req.stream and req.echo else None
        return await self._respond(request, user, req, shape, prompts, rows, echo)

    async def chat(self, req: ChatRequest, request: Request):
        user, ends = self.check(request, req.model), self.ends
        text = render_chat(req.messages, self.template, ends)
        check_prompt_chars([text], self.max_chars)
        ids = await asyncio.to_thread(ends.encode_prompt, text)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(512, self.backend.max_new_tokens)
        if max_tokens < 1:
            raise ApiError(400, "max_tokens must be at least 1.", param="max_tokens")
        self.admit(req, max_tokens, [ids])
        top = (req.top_logprobs or 0) if req.logprobs else None
        rows = [Continuation(list(ids), max_tokens, logprobs=top, key=key) for key in range(req.n)]
        head = self._head("chatcmpl", "chat.completion.chunk")

        def chunk(i, text, token, entry):
            lp = None if top is None or token is None else chat_logprobs(ends, [token], [entry])
            return {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": text}, "logprobs": lp,
                                         "finish_reason": None}]}

        def tail(i, text, reason):
            return {**head, "choices": [{"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                                         "finish_reason": reason}]}

        def choice(i, row, r, c):
            lp = chat_logprobs(ends, r["token_ids"], r["logprobs"]) if top is not None else None
            return {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                    "finish_reason": _finish("stop" if c.hit else r["finish_reason"])}

        shape = _Shape("chat", head, chunk, tail, choice, "chat.completion")
        return await self._respond(request, user, req, shape, [ids], rows)

    def _head(self, prefix: str, obj: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": self.backend.model_id}

    # ---- the one response builder ---------------------------------------------------------------------------
    async def _respond(self, request: Request, user: str, req, shape: _Shape, prompts: list[list[int]],
                       rows: list[Continuation], echo: list[str] | None = None):
        """Run the rows: a stream of server-sent events (holding the admission slot until it ends), or one
        response once every row is done."""
        sampling, stops = self.sampling_of(req), req.stops()
        choices = [StopText(self.ends, stops) for _ in rows]
        if req.stream:
            if echo:
                for c, text in zip(choices, echo):
                    c.prefix = text
            gen = self._stream(request, prompts, rows, sampling, req.soft_prompt, choices, shape,
                               bool((req.stream_options or {}).get("include_usage")))
            if echo:
                gen = _prefixed(gen, [_sse(shape.tail(i, c.prefix, None)) for i, c in enumerate(choices)])
            return self._held(gen, self.hold(request, user, shape.kind))
        started = time.time()
        try:
            with self.hold(request, user, shape.kind):
                results = await self._submit(request, rows, sampling, req.soft_prompt, choices)
        except BaseException as e:
            raise self.translate(e) from None
        out = []
        for i, (row, r, c) in enumerate(zip(rows, results, choices)):
            c.finish()
            out.append(shape.choice(i, row, r, c))
        warnings = self.backend.warnings_since(started)
        return {**shape.head, "object": shape.response_object, "choices": out, "usage": _usage(prompts, results),
                **({"warnings": warnings} if warnings else {})}

    async def _submit(self, request: Request, rows, sampling, soft_name, choices, on_event=None):
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
        self.batcher.submit(pending)
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

    async def _stream(self, request, prompts, rows, sampling, soft_name, choices, shape: _Shape, include_usage):
        """Server-sent events: a chunk per token, then each choice's end, usage if asked, `[DONE]`."""
        events: asyncio.Queue = asyncio.Queue()

        def on_event(choice, piece, token, entry):
            events.put_nowait((choice, piece, token, entry))

        started = time.time()
        task = asyncio.ensure_future(self._submit(request, rows, sampling, soft_name, choices, on_event))
        try:
            while not (task.done() and events.empty()):
                try:
                    choice, piece, token, entry = await asyncio.wait_for(events.get(), 0.25)
                except asyncio.TimeoutError:
                    continue
                if piece:
                    yield _sse(shape.chunk(choices.index(choice), piece, token, entry))
            try:
                results = task.result()
            except BaseException as e:
                yield _sse(self.translate(e).body())
                return
            for i, (choice, r) in enumerate(zip(choices, results)):
                yield _sse(shape.tail(i, choice.finish(), _finish("stop" if choice.hit else r["finish_reason"])))
            empty = {**shape.chunk(0, "", None, None), "choices": []}
            if include_usage:
                yield _sse({**empty, "usage": _usage(prompts, results)})
            warnings = self.backend.warnings_since(started)
            if warnings:
                yield _sse({**empty, "warnings": warnings})
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()

    @staticmethod
    def _held(gen, slot: _Slot) -> StreamingResponse:
        """A stream that gives its admission slot back when it ends, or when it never starts."""
        async def body():
            try:
                async for part in gen:
                    yield part
            finally:
                slot.release()
        return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(slot.release))


def make_app(backend: ApiBackend, **options) -> FastAPI:
    """The API as an ASGI app (options: those of `OpenAIServer`)."""
    return OpenAIServer(backend, **options).app


def _usage(prompts: list[list[int]], results: list[dict]) -> dict:
    prompt = sum(map(len, prompts))
    completion = sum(len(r["token_ids"]) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
