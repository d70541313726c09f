"""The OpenAI API's shapes: request models, error objects, prompts, logprobs and the chat template.

Only what the HTTP layer (`_http`) needs to turn an OpenAI request into `Continuation`s and their results
back into OpenAI's JSON. Field names, defaults and error objects follow OpenAI's API reference (the
`openai` client and lm-evaluation-harness parse them); slowllm's extensions are `top_k` and
`soft_prompt`.
"""

from __future__ import annotations

import math
from typing import Literal

import jinja2.sandbox
from pydantic import BaseModel, ConfigDict, Field

from slowllm.coordinator.jobs._ends import ModelEnds

# Bloomz was tuned on plain prompts; this template says who speaks in words it has seen a lot of.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' or m.role == 'developer' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
MAX_N = 16
MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error answered as OpenAI's error object, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata...)

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = None  # extension (vLLM's): None, 0 or -1 = all tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict | None = None
    soft_prompt: str | None = Field(None, max_length=200)  # extension: a name from --soft-prompts DIR
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    def check_unsupported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported: leave them at 0.",
                           param="presence_penalty")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported: leave it out.", param="logit_bias")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings.", param="stop")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones are understood
            if any(part.get("type") != "text" for part in self.content):
                raise ApiError(400, "only text content parts are supported.", param="messages")
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def prompt_rows(prompt, ends: ModelEnds) -> list[list[int]]:
    """The request's prompts as token id lists (text as the CLI tokenizes it: `ModelEnds.encode_prompt`; ids as given)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty.", param="prompt")
    rows = []
    for p in prompt:
        ids = ends.encode_prompt(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < ends.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0-{ends.vocab_size - 1}).",
                           param="prompt")
        rows.append(ids or [ends.bos_token_id])
    return rows


def model_chat_template(ends: ModelEnds) -> str | None:
    """The chat template the checkpoint ships in tokenizer_config.json (`chat_template`: a string, or a list
    of named ones of which "default" is used), or None."""
    import json

    try:
        config = json.loads(ends.checkpoint.file("tokenizer_config.json").read_text(encoding="utf-8"))
    except Exception:  # absent or unreadable: the default template serves
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def render_chat(messages: list[ChatMessage], template: str, ends: ModelEnds | None = None) -> str:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()  # a template file is config, but never code
    special = {}
    if ends is not None:  # the names transformers' templates use
        tokens = {"bos_token": ends.bos_token_id, "eos_token": ends.eos_token_id}
        special = {k: ends.tokenizer.id_to_token(v) or "" for k, v in tokens.items() if v is not None}
    try:
        return env.from_string(template).render(
            messages=[{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt=True,
            **special)
    except jinja2.TemplateError as e:
        raise ApiError(500, f"the chat template failed: {e}", type="server_error") from None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Bloom's tokenizer uses it): printable character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


def token_bytes(ends: ModelEnds, token: int) -> bytes:
    """A token's bytes: a byte-level piece may be part of a UTF-8 character, which text cannot show."""
    piece = ends.tokenizer.id_to_token(token) or ""
    if piece and all(ch in BYTE_DECODER for ch in piece):
        return bytes(BYTE_DECODER[ch] for ch in piece)
    return ends.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


def token_text(ends: ModelEnds, token: int) -> str:
    """The token as text, or, for part of a UTF-8 character, "bytes:\\xNN..." (as vLLM writes it)."""
    text = ends.tokenizer.decode([token], skip_special_tokens=False)
    if "\ufffd" in text:
        raw = token_bytes(ends, token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI clients expect a number


def completion_logprobs(ends: ModelEnds, ids: list[int], entries: list, start_offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` object for tokens `ids` and their (logprob, top) entries (None: unknown)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for token, entry in zip(ids, entries):
        text = token_text(ends, token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            lp, top = entry
            token_logprobs.append(_finite(lp))
            top_logprobs.append({token_text(ends, t): _finite(v) for t, v in top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(ends: ModelEnds, ids: list[int], entries: list) -> dict:
    def item(token: int, lp: float) -> dict:
        return {"token": token_text(ends, token), "logprob": _finite(lp), "bytes": list(token_bytes(ends, token))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                        for t, (lp, top) in zip(ids, entries)]}
