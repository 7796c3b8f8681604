"""An OpenAI-compatible HTTP API in front of one distributed model: a swarm client that speaks HTTP.

``make_app`` takes an already opened model and tokenizer and serves ``GET /v1/models``, ``GET /health``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (FastAPI on uvicorn), and the browser pages of
``petals_cli.web``: a chat page at ``/`` that talks to those routes, and the swarm's health page at ``/swarm``
(read through this model's own swarm client, only while someone visits it). Each request generates in a worker
thread of its own (``generate()`` is synchronous; the swarm client has its own event-loop thread) and is its own
inference session, so concurrent requests batch on the servers. Streamed text travels from the worker through a
queue to server-sent events; a client that leaves stops its generation at the next token, which closes the session
and frees the servers' caches. Request checking and response shapes live in ``api_requests``; this module knows
nothing about the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from petals_cli import routing
from petals_cli.api_requests import (
    ApiError,
    Choice,
    GenerationRequest,
    ResponseIds,
    chunk_json,
    completion_json,
    parse_request,
    usage_json,
)
from petals_cli.chat import StopFlag
from petals_cli.errors import ConfigError, PetalsError, SessionLengthError
from petals_cli.generation import GenerationOptions, LogprobRecorder, generate

logger = logging.getLogger(__name__)
DISCONNECT_POLL = 0.25  # seconds between checks that a client waiting for a whole response is still there
CHOICE_THREADS = 16  # a request's choices generating at once (each its own session)
SWARM_PAGE_PERIOD = 5.0  # seconds between readings of the swarm for /swarm
SWARM_PAGE_IDLE = 300.0  # ... which stop this long after its last visit


def make_app(
    model,
    tokenizer,
    *,
    model_name: str,
    api_key: str | None = None,
    max_concurrent: int = 8,
) -> FastAPI:
    """The ASGI app serving ``model`` (a distributed model) as ``model_name``; ``api_key``: required as a bearer
    token on /v1 routes when set; beyond ``max_concurrent`` generations at once, requests get 429."""
    from petals_cli.swarm import StatusFeed
    from petals_cli.web.app import add_chat_page, add_health_routes, add_static
    from petals_cli.web.monitor import SwarmMonitor

    api = _Api(model, tokenizer, model_name, api_key, max_concurrent)
    client = model.petals_client
    feed = StatusFeed(client.config, client=client)
    monitor = SwarmMonitor(feed.read, period=SWARM_PAGE_PERIOD, idle_after=SWARM_PAGE_IDLE)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await monitor.stop()

    app = FastAPI(title="petals", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    add_static(app)
    keyed = api_key is not None
    add_chat_page(app, model_name=model_name, tokenizer=tokenizer, key_required=keyed, swarm_url="/swarm")
    add_health_routes(app, monitor, base="/swarm", chat_url="/")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(error.to_json(), status_code=error.status)

    app.get("/health")(api.health)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    return app


class _Stoppable:
    """The model as ``generation.generate`` sees it, with one more stopping criterion: the request's cancel flag."""

    def __init__(self, model, cancelled: threading.Event):
        self.model, self.cancelled = model, cancelled

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, stopping_criteria=[StopFlag(self.cancelled)], **kwargs)


class _Api:
    def __init__(self, model, tokenizer, model_name: str, api_key: str | None, max_concurrent: int):
        if max_concurrent < 1:
            raise ConfigError(f"max concurrent {max_concurrent}: allow at least 1 request")
        self.model, self.tokenizer, self.api_key, self.max_concurrent = model, tokenizer, api_key, max_concurrent
        self.model_name = model_name
        self.model_names = tuple(dict.fromkeys([model_name, getattr(model, "petals_prefix", model_name)]))
        self.active = 0  # generations running; changed only on the event loop
        self.workers = ThreadPoolExecutor(max_concurrent, thread_name_prefix="petals-api")
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = list(eos) if isinstance(eos, list | tuple) else [eos]
        self.eos_ids = {token for token in [*eos, tokenizer.eos_token_id] if token is not None}

    async def health(self):
        client, prefix, num_blocks = self.model.petals_client, self.model.petals_prefix, self.model.petals_num_blocks
        try:
            snapshot = await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(client.snapshot(prefix, num_blocks), client.loop)
            )
        except PetalsError as error:
            return JSONResponse({"status": "unavailable", "model": self.model_name, "error": error.message}, 503)
        if client.config.active_adapter:
            snapshot = routing.with_adapter(snapshot, client.config.active_adapter)
        banned = client.bans.banned(time.monotonic()) | routing.untrusted(
            snapshot, client.config.allowed_servers, client.config.blocked_servers
        )
        missing = routing.missing_blocks(snapshot, 0, num_blocks, banned)
        body = {
            "status": "unavailable" if missing else "ok",
            "model": self.model_name,
            "num_blocks": num_blocks,
            "missing_blocks": missing,
            "servers": len([peer for peer in snapshot.online() if peer not in banned]),
            "active_requests": self.active,
        }
        return JSONResponse(body, status_code=503 if missing else 200)

    async def models(self, request: Request):
        self._authorize(request)
        entry = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "petals"}
        return {"object": "list", "data": [entry]}

    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def _complete(self, request: Request, *, chat: bool):
        self._authorize(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        parsed = parse_request(body, chat=chat, tokenizer=self.tokenizer, model_names=self.model_names)
        if self.active >= self.max_concurrent:
            raise ApiError(
                429,
                f"this server runs at most {self.max_concurrent} requests at once; retry shortly",
                kind="rate_limit_error",
                code="too_many_requests",
            )
        self.active += 1
        loop, cancelled, events = asyncio.get_running_loop(), threading.Event(), asyncio.Queue()
        ids = ResponseIds(chat, parsed.model)

        def post(kind: str, value=None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def release(_future) -> None:
            loop.call_soon_threadsafe(self._release)

        work = self.workers.submit(self._generate, parsed, cancelled, post if parsed.stream else None)
        work.add_done_callback(release)  # the slot is the generation's, however the response ends
        if not parsed.stream:
            choices = await self._wait(request, work, cancelled)
            return JSONResponse(completion_json(ids, choices, self._token_text))
        first = await self._first_event(request, events, cancelled)
        if first[0] == "error":
            raise _as_api_error(first[1])
        return StreamingResponse(
            self._sse(ids, parsed, first, events, cancelled),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _release(self) -> None:
        self.active -= 1

    def _generate(self, parsed: GenerationRequest, cancelled: threading.Event, post) -> list[Choice]:
        """Runs in a worker thread: the request's choices at once, each its own inference session (so the servers
        batch them); the first failure stops the others."""
        plans = parsed.choices()
        try:
            with ThreadPoolExecutor(min(len(plans), CHOICE_THREADS), thread_name_prefix="petals-choice") as pool:
                futures = [pool.submit(self._choice, parsed, plan, cancelled, post) for plan in plans]
                wait(futures, return_when=FIRST_EXCEPTION)
                if any(future.done() and future.exception() for future in futures):
                    cancelled.set()
                choices = [future.result() for future in futures]
        except Exception as error:
            if post is None:
                raise
            post("error", error)
            return []
        if post:
            post("done", choices)
        return choices

    def _choice(self, parsed: GenerationRequest, plan, cancelled: threading.Event, post) -> Choice:
        index, prompt_index, prompt, options = plan
        recorder = LogprobRecorder(parsed.logprobs) if parsed.logprobs is not None else None
        on_text = None
        if post:
            sent = 0

            def on_text(piece: str) -> None:
                nonlocal sent
                settled = recorder.settled[sent:] if recorder is not None else None
                sent += len(settled or ())
                post("text", (index, piece, settled))

        if cancelled.is_set():  # the client left, or another choice failed: nobody will read this one
            return Choice("", 0, "stop", prompt_index=prompt_index)
        result = generate(
            _Stoppable(self.model, cancelled), self.tokenizer, prompt, options, on_text=on_text, recorder=recorder
        )
        finish_reason = self._finish_reason(result, options)
        choice = Choice(
            result.text, result.new_tokens, finish_reason, result.prompt_tokens, prompt_index, result.logprobs
        )
        if post:
            post("choice", (index, choice))
        return choice

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _finish_reason(self, result, options: GenerationOptions) -> str:
        if result.token_ids and result.token_ids[-1] in self.eos_ids:
            return "stop"
        if result.text != self.tokenizer.decode(result.token_ids, skip_special_tokens=True):
            return "stop"  # cut at a stop string
        return "length" if result.new_tokens >= options.max_new_tokens else "stop"

    async def _wait(self, request: Request, work, cancelled: threading.Event) -> list[Choice]:
        """The worker's choices; stops it when the client goes away first."""
        future = asyncio.wrap_future(work)
        while not future.done():
            await asyncio.wait([future], timeout=DISCONNECT_POLL)
            if not future.done() and await request.is_disconnected():
                cancelled.set()
        try:
            return future.result()
        except Exception as error:
            raise _as_api_error(error) from error

    async def _first_event(self, request: Request, events: asyncio.Queue, cancelled: threading.Event):
        """The stream's first event, before the response starts: a failure to open the session is still an
        HTTP error status, not an error inside a 200 stream."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL)
            except TimeoutError:
                if await request.is_disconnected():
                    cancelled.set()

    async def _sse(self, ids: ResponseIds, parsed: GenerationRequest, first, events, cancelled: threading.Event):
        streamed: dict[int, str] = {}  # text sent, by choice
        scored: dict[int, int] = {}  # tokens whose log-probabilities were sent, by choice
        event = first

        def chunk(index: int, text: str, logprobs) -> str:
            offset = len(streamed.get(index, ""))
            if logprobs is not None:
                scored[index] = scored.get(index, 0) + len(logprobs)
            rendered = chunk_json(ids, index, text=text, logprobs=logprobs, token_text=self._token_text, offset=offset)
            streamed[index] = streamed.get(index, "") + text
            return _sse_line(rendered)

        try:
            while True:
                kind, value = event
                if kind in ("text", "choice") and value[0] not in streamed:
                    streamed[value[0]] = ""
                    if ids.chat:
                        yield _sse_line(chunk_json(ids, value[0], role=True))
                if kind == "text":
                    index, piece, logprobs = value
                    yield chunk(index, piece, logprobs)
                elif kind == "choice":
                    index, choice = value
                    sent = streamed[index]
                    tail = choice.text[len(sent) :] if choice.text.startswith(sent) else ""  # a held-back tail
                    rest = choice.logprobs[scored.get(index, 0) :] if choice.logprobs is not None else None
                    if tail or rest:
                        yield chunk(index, tail, rest)
                    yield _sse_line(chunk_json(ids, index, finish_reason=choice.finish_reason))
                elif kind == "done":
                    if parsed.include_usage:
                        yield _sse_line({**ids.head(streaming=True), "choices": [], "usage": usage_json(value)})
                    yield "data: [DONE]\n\n"
                    return
                else:  # the response has started: the error goes in the stream, as OpenAI's servers do
                    yield _sse_line(_as_api_error(value).to_json())
                    return
                event = await events.get()
        finally:
            cancelled.set()  # a client that left (or a stream that ended) stops the generation at the next token


def _sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _as_api_error(error: BaseException) -> ApiError:
    """A generation failure as OpenAI's error shape: bad requests 400, swarm failures 503, anything else 500."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ConfigError | SessionLengthError):
        return ApiError(400, error.message, code=error.code)
    if isinstance(error, PetalsError):
        message = f"{error.message} (hint: {error.hint})" if error.hint else error.message
        return ApiError(503, message, kind="service_unavailable", code=error.code)
    logger.exception("request failed", exc_info=error)
    return ApiError(500, f"unexpected {type(error).__name__}: {error}", kind="server_error")
