"""OpenAI request bodies in, checked generation requests out; results in, OpenAI response objects out.

Pure: no network, no threads, no web framework. A field this increment does not implement, or a value generation
cannot use, is an ``ApiError`` naming the field, so a client learns at once instead of getting a silent default.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from petals_cli.chat import ASSISTANT_TAG, USER_TAG
from petals_cli.generation import GenerationOptions

# "user" is accepted and ignored
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI's completions default; chat has no fixed one
MAX_CHOICES = 16
ROLES = {"system": "", "developer": "", "user": USER_TAG, "assistant": ASSISTANT_TAG}


class ApiError(Exception):
    """An error as OpenAI clients expect it: an HTTP status and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def to_json(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    chat: bool
    prompt: str
    options: GenerationOptions
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage figures
    model: str = ""


@dataclass
class Choice:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of text, a stop string, the client left) or "length"
    prompt_tokens: int = 0


@dataclass(frozen=True)
class ResponseIds:
    chat: bool
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}")

    def head(self, streaming: bool) -> dict:
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def parse_request(body, *, chat: bool, tokenizer, model_names: tuple[str, ...]) -> GenerationRequest:
    """Check a /v1/completions (``chat=False``) or /v1/chat/completions body and render its prompt."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name not in known:
            accepted = ", ".join(sorted(known))
            raise ApiError(400, f"unsupported field {name!r} (this server accepts: {accepted})", param=name)
    model = _get(body, "model", str, "a string")
    if model is None:
        raise ApiError(400, "missing field 'model'", param="model")
    if model not in model_names:
        raise ApiError(
            404, f"model {model!r} is not served here; GET /v1/models lists it", param="model", code="model_not_found"
        )
    for name in ("logprobs", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise ApiError(400, f"{name} is not supported by this server yet", param=name)
    implied_stops: tuple[str, ...] = ()
    if chat:
        prompt, implied_stops = render_chat(tokenizer, _messages(body.get("messages")))
        max_tokens = _get(body, "max_completion_tokens", int, "an integer")
        max_tokens = _get(body, "max_tokens", int, "an integer") if max_tokens is None else max_tokens
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            raise ApiError(400, "prompt: a list of prompts is not supported yet; send one string", param="prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        max_tokens = _get(body, "max_tokens", int, "an integer")
    max_param = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = DEFAULT_MAX_TOKENS["chat" if chat else "completion"] if max_tokens is None else max_tokens
    temperature = _get(body, "temperature", float, "a number")
    top_p = _get(body, "top_p", float, "a number")
    n = _get(body, "n", int, "an integer")
    checks = [
        (max_tokens < 1, max_param, f"{max_param} {max_tokens}: generate at least 1 token"),
        (temperature is not None and temperature < 0, "temperature", f"temperature {temperature}: must be 0 or above"),
        (top_p is not None and not 0 < top_p <= 1, "top_p", f"top_p {top_p}: must be above 0 and at most 1"),
        (n is not None and not 1 <= n <= MAX_CHOICES, "n", f"n {n}: must be between 1 and {MAX_CHOICES}"),
    ]
    for wrong, param, message in checks:
        if wrong:
            raise ApiError(400, message, param=param)
    stream = bool(_get(body, "stream", bool, "true or false"))
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise ApiError(400, 'stream_options: only {"include_usage": true|false} is supported', param="stream_options")
    options = GenerationOptions(
        max_new_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,  # OpenAI's default temperature samples
        top_p=1.0 if top_p is None else top_p,
        stop=_stops(body.get("stop")) + implied_stops,
        seed=_get(body, "seed", int, "an integer"),
    )
    return GenerationRequest(
        chat, prompt, options, n or 1, stream, bool(stream_options.get("include_usage")), model=model
    )


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, tuple[str, ...]]:
    """The prompt of a conversation and the stops it implies: the tokenizer's chat template, or (without one)
    the plain transcript of `petals chat`, which ends when the model starts the user's next line."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        # the template writes the BOS token and generate() tokenizes with special tokens: keep just one
        if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
            text = text[len(bos) :]
        return text, ()
    lines = [f"{ROLES[message['role']]} {message['content']}".lstrip() for message in messages]
    return "\n".join([*lines, ASSISTANT_TAG]), (f"\n{USER_TAG}",)


def completion_json(ids: ResponseIds, choices: list[Choice]) -> dict:
    """A whole (not streamed) chat.completion or text_completion object, with usage."""
    rendered = []
    for index, choice in enumerate(choices):
        content = {"message": {"role": "assistant", "content": choice.text}} if ids.chat else {"text": choice.text}
        rendered.append({"index": index, **content, "logprobs": None, "finish_reason": choice.finish_reason})
    return {**ids.head(streaming=False), "choices": rendered, "usage": usage_json(choices)}


def chunk_json(ids: ResponseIds, index: int, *, text: str | None = None, role=False, finish_reason=None) -> dict:
    """One streamed chunk of one choice: text (or, for chat, the assistant role), or the finish reason."""
    if ids.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**ids.head(streaming=True), "choices": [choice]}


def usage_json(choices: list[Choice]) -> dict:
    prompt_tokens = choices[0].prompt_tokens if choices else 0  # one prompt, however many choices
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _get(body: dict, name: str, kind: type, described: str):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ApiError(400, f"{name} must be {described}, not {value!r}", param=name)
    return value


def _stops(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of them", param="stop")
    return tuple(stops)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{position}]: role must be one of {', '.join(ROLES)}", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise ApiError(400, f"messages[{position}]: only text content is supported", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{position}]: content must be a string", param="messages")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": content})
    return messages
