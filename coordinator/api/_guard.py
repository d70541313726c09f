"""What the HTTP API checks before it does any work: the key before the body, the body's size while it is
read, a prompt's length in characters before it is tokenized.

Without these, one request without a key could make the server buffer and parse a 300 MB body, and one
authenticated 8 MB one-word prompt kept the event loop (and with it /status and the WebSocket side)
busy tokenizing for seconds. `RequestGuard` is ASGI middleware: it answers 401 from the headers alone,
413 from Content-Length, or 413 as soon as a streamed body passes the limit (nothing beyond it is read).
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from ._openai import ApiError


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest token in the vocabulary: a text of C characters needs at least C / this
    many tokens (byte-level BPE and sentencepiece tokens each cover at most their own length)."""
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def max_request_bytes(max_prompt_tokens: int, token_chars: int) -> int:
    """The default body limit: the longest prompt allowed, JSON-escaped at up to 6 bytes a character
    (`\\uXXXX`), plus room for the rest of the request; never below 1 MB."""
    return max(1 << 20, 6 * max_prompt_tokens * token_chars + (64 << 10))


def check_prompt_chars(texts: list[str], max_chars: int) -> None:
    """Refuse, before tokenizing, text too long to fit --max-prompt-tokens whatever its tokens."""
    longest = max((len(t) for t in texts), default=0)
    if longest > max_chars:
        raise ApiError(400, f"a prompt of {longest} characters cannot fit this server's limit of tokens "
                            "(--max-prompt-tokens): send a shorter prompt.", param="prompt",
                       code="context_length_exceeded")


class RequestGuard:
    """ASGI middleware for POST requests: a key that `user(token)` accepts, and at most `max_bytes` of body."""

    def __init__(self, app, user, max_bytes: int):
        self.app, self.user, self.max_bytes = app, user, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if self.user(token.strip() if scheme.lower() == "bearer" else None) is None:
            return await _answer(send, ApiError(401, "Incorrect API key provided: pass your slowllm key as "
                                                     "'Authorization: Bearer KEY'.", code="invalid_api_key"))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _answer(send, self._too_large())
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # (FastAPI answers an HTTPException raised while it reads the body)
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, bounded, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                             "(--max-request-bytes): send a shorter prompt.", code="request_too_large")


async def _answer(send, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
