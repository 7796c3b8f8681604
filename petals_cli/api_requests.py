"""OpenAI request bodies in, checked generation requests out; results in, OpenAI response objects out.

Pure: no network, no threads, no web framework. A field this increment does not implement, or a value generation
cannot use, is an ``ApiError`` naming the field, so a client learns at once instead of getting a silent default.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace

from petals_cli.chat import ASSISTANT_TAG, USER_TAG
from petals_cli.generation import GenerationOptions, TokenLogprob

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
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request: prompts × n
MAX_TOP_LOGPROBS = {"completion": 5, "chat": 20}  # as OpenAI's API allows
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
    prompts: tuple[str, ...]  # chat: one; completions: one or several, each with its n choices
    options: GenerationOptions
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage figures
    model: str = ""
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest tokens

    def choices(self) -> list[tuple[int, int, str, GenerationOptions]]:
        """(choice index, prompt index, prompt, options) of every choice: prompt by prompt, n each, as OpenAI
        numbers them; a seed s gives choice i the seed s + i, so n seeded choices differ and each repeats."""
        plans = []
        for prompt_index, prompt in enumerate(self.prompts):
            for copy in range(self.n):
                index = prompt_index * self.n + copy
                seed = None if self.options.seed is None else self.options.seed + index
                plans.append((index, prompt_index, prompt, replace(self.options, seed=seed)))
        return plans


@dataclass
class Choice:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of text, a stop string, the client left) or "length"
    prompt_tokens: int = 0
    prompt_index: int = 0
    logprobs: list[TokenLogprob] | None = None


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
    implied_stops: tuple[str, ...] = ()
    if chat:
        prompt, implied_stops = render_chat(tokenizer, _messages(body.get("messages")))
        prompts = (prompt,)
        max_tokens = _get(body, "max_completion_tokens", int, "an integer")
        max_tokens = _get(body, "max_tokens", int, "an integer") if max_tokens is None else max_tokens
    else:
        prompts = _prompts(body.get("prompt"))
        max_tokens = _get(body, "max_tokens", int, "an integer")
    logprobs = _logprobs(body, chat)
    max_param = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = DEFAULT_MAX_TOKENS["chat" if chat else "completion"] if max_tokens is None else max_tokens
    temperature = _get(body, "temperature", float, "a number")
    top_p = _get(body, "top_p", float, "a number")
    n = _get(body, "n", int, "an integer")
    checks = [
        (max_tokens < 1, max_param, f"{max_param} {max_tokens}: generate at least 1 token"),
        (temperature is not None and temperature < 0, "temperature", f"temperature {temperature}: must be 0 or above"),
        (top_p is not None and not 0 < top_p <= 1, "top_p", f"top_p {top_p}: must be above 0 and at most 1"),
        (n is not None and not 1 <= n <= MAX_N, "n", f"n {n}: must be between 1 and {MAX_N}"),
        (
            len(prompts) * (n or 1) > MAX_CHOICES,
            "n" if len(prompts) == 1 else "prompt",
            f"{len(prompts)} prompts × n {n or 1}: at most {MAX_CHOICES} choices a request",
        ),
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
    include_usage = bool(stream_options.get("include_usage"))
    return GenerationRequest(chat, prompts, options, n or 1, stream, include_usage, model=model, logprobs=logprobs)


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


def completion_json(ids: ResponseIds, choices: list[Choice], token_text=None) -> dict:
    """A whole (not streamed) chat.completion or text_completion object, with usage; ``token_text``: a token
    id's text, for choices with log-probabilities."""
    rendered = []
    for index, choice in enumerate(choices):
        content = {"message": {"role": "assistant", "content": choice.text}} if ids.chat else {"text": choice.text}
        logprobs = logprobs_json(ids.chat, choice.logprobs, token_text)
        rendered.append({"index": index, **content, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return {**ids.head(streaming=False), "choices": rendered, "usage": usage_json(choices)}


def chunk_json(
    ids: ResponseIds,
    index: int,
    *,
    text: str | None = None,
    role=False,
    finish_reason=None,
    logprobs: list[TokenLogprob] | None = None,
    token_text=None,
    offset: int = 0,
) -> dict:
    """One streamed chunk of one choice: text (or, for chat, the assistant role) with the log-probabilities
    of the tokens it completes, or the finish reason."""
    rendered = logprobs_json(ids.chat, logprobs, token_text, offset)
    if ids.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "logprobs": rendered, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": rendered, "finish_reason": finish_reason}
    return {**ids.head(streaming=True), "choices": [choice]}


def logprobs_json(chat: bool, entries: list[TokenLogprob] | None, token_text, offset: int = 0) -> dict | None:
    """OpenAI's two log-probability shapes: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` and
    completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` (offsets count from ``offset``)."""
    if entries is None:
        return None
    if chat:

        def one(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [
            {**one(entry.token_id, entry.logprob), "top_logprobs": [one(*alternative) for alternative in entry.top]}
            for entry in entries
        ]
        return {"content": content}
    tokens = [token_text(entry.token_id) for entry in entries]
    offsets = [offset + sum(len(token) for token in tokens[:position]) for position in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{token_text(token): logprob for token, logprob in entry.top} for entry in entries],
        "text_offset": offsets,
    }


def usage_json(choices: list[Choice]) -> dict:
    prompts = {choice.prompt_index: choice.prompt_tokens for choice in choices}  # a prompt counts once
    prompt_tokens = sum(prompts.values())
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


def _prompts(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(prompt, str) for prompt in value):
        return tuple(value)
    if isinstance(value, list) and value and all(isinstance(item, int | list) for item in value):
        raise ApiError(400, "prompt: token-id prompts are not supported; send text", param="prompt")
    raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many likeliest tokens each token's log-probability comes with (None: no log-probabilities):
    completions' ``logprobs`` is that number; chat's ``logprobs`` is a switch and ``top_logprobs`` the number."""
    most = MAX_TOP_LOGPROBS["chat" if chat else "completion"]
    name = "top_logprobs" if chat else "logprobs"
    if chat:
        wanted = _get(body, "logprobs", bool, "true or false")
        top = _get(body, "top_logprobs", int, "an integer")
        if top is not None and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        top = (0 if top is None else top) if wanted else None
    else:
        top = _get(body, "logprobs", int, "an integer")
    if top is not None and not 0 <= top <= most:
        raise ApiError(400, f"{name} {top}: must be between 0 and {most}", param=name)
    return top


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
