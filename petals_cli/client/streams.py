"""One span's inference stream and its I/O, the one builder of span requests, and unary calls.

A ``SpanStream`` is one server's session: it sends ``Step`` values, reads the answers (the session's opening
acknowledgement first), and keeps every input it was sent (``history``), which is what failover replays. ``guard``
is the one place where transport errors, refusals and silence become a ``ServerFailure``. ``Opener`` routes and
opens the streams of a session with the same opening message every time (``span_request`` builds the first
message of inference sessions and of forward/backward calls alike); ``run_chain`` sends tokens through streams in
turn. ``call_unary`` is one forward or backward request.

This module knows the wire (``transport``, ``wire``, ``step``), client-sent LoRA, the typed errors and how another
peer's text is shown (``textsafe``), and nothing else: not the swarm connection (``Connection`` is what it needs of
one), not verification, replay or push, which are built on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, Protocol

import torch
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.errors import (
    CacheExhaustedError,
    InvalidRequestError,
    PetalsError,
    ServerError,
    SessionExpiredError,
)
from petals_cli.lora import ClientLora, SpanLora
from petals_cli.routing import RouteSpan
from petals_cli.step import Step
from petals_cli.textsafe import ERROR_CHARACTERS, shown
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest, StepResponse

TRANSPORT_ERRORS = (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, asyncio.IncompleteReadError)


class Connection(Protocol):
    """What streams need of the swarm connection (``SwarmClient`` is one; unit tests use a fake)."""

    config: Any  # a ClientConfig: timeouts, retries, the active adapter

    def stub(self, peer_id: str) -> Any: ...

    async def is_alive(self, peer_id: str) -> bool: ...

    def silent_since(self, peer_id: str) -> float | None:
        """When ``peer_id`` last failed a liveness check, if it has not answered since (``time.monotonic()``)."""
        ...

    async def route(
        self, prefix: str, num_blocks: int, start: int, end: int | None, **options: Any
    ) -> list[RouteSpan]: ...

    def ban(self, peer_id: str) -> None: ...

    def ban_forever(self, peer_id: str) -> None: ...

    def succeed(self, peer_id: str) -> None: ...


class ServerFailure(Exception):
    """A server did not answer properly: the caller routes around it (and bans it, unless it is healthy)."""

    def __init__(self, span: RouteSpan, reason: str, *, ban: bool = True):
        # ``reason`` may quote the server (a transport error carries its handler's text): one safe line of it
        reason = shown(reason, ERROR_CHARACTERS)
        super().__init__(f"server {span.peer_id[-8:]} (blocks {span.start}:{span.end}): {reason}")
        self.span, self.ban = span, ban
        self.at_opening = False  # the server refused to open the session: no session of ours was lost there


async def guard(
    conn: Connection, span: RouteSpan, awaitable: Awaitable, *, watch: Collection[str] = (), since: float | None = None
):
    """Await a server's answer; every way it can fail becomes ServerFailure (typed refusals included).

    A killed server's stream may never break (its libp2p daemon outlives it), and a frozen one's never does, so
    while the answer is late the client checks that the server still answers an info RPC: a dead or hung server is
    noticed within about ``liveness_interval + liveness_timeout`` seconds, while a busy one may take up to
    ``request_timeout``. The servers in ``watch`` (those a pushed step reaches next) are checked alongside: one
    found silent after ``since`` (the step's start; default now) fails at once when its own answer is late,
    instead of a check later.
    """
    config = conn.config
    task = asyncio.ensure_future(awaitable)
    started = time.monotonic() if since is None else since
    deadline = time.monotonic() + config.request_timeout
    checks: list[asyncio.Future] = []
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=config.liveness_interval)
            if done:
                return task.result()
            if time.monotonic() > deadline:
                raise ServerFailure(span, f"no answer in {config.request_timeout:.0f}s")
            if (conn.silent_since(span.peer_id) or float("-inf")) >= started:  # found while awaiting another
                raise ServerFailure(span, "stopped answering (liveness check failed)")
            alive = asyncio.ensure_future(conn.is_alive(span.peer_id))
            checks = [alive, *(asyncio.ensure_future(conn.is_alive(peer)) for peer in watch)]
            done, _ = await asyncio.wait({task, alive}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:  # the answer came during the check: take it now, not a round trip later
                return task.result()
            if not alive.result():
                raise ServerFailure(span, "stopped answering (liveness check failed)")
            watching = set(checks[1:])  # the connection keeps their verdicts
            while watching:
                await asyncio.wait({task, *watching}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                watching = {check for check in watching if not check.done()}
    except StopAsyncIteration:
        raise ServerFailure(span, "closed the stream") from None
    except (*TRANSPORT_ERRORS, ServerError, CacheExhaustedError) as exc:
        raise ServerFailure(span, f"{type(exc).__name__}: {exc}") from exc
    finally:
        task.cancel()
        for check in checks:
            check.cancel()


def span_request(prefix: str, span: RouteSpan, *, adapter: str, lora: SpanLora | None, **fields) -> SpanRequest:
    """The metadata of the first message of every RPC to ``span``'s server: an inference session's opening and a
    forward or backward request alike (``fields``: what only one of them carries)."""
    if lora is not None:
        fields.update(lora_targets=lora.targets, lora_rank=lora.rank, lora_scaling=lora.scaling)
    return SpanRequest(
        protocol=PROTOCOL_VERSION, prefix=prefix, start_block=span.start, end_block=span.end, adapter=adapter, **fields
    )


@dataclasses.dataclass(frozen=True)
class Padding:
    """A session's attention mask and positions [batch, tokens] up to the end of the step being run (both None
    while nothing was ever padded); ``step`` cuts out those of tokens sent (again) from ``position`` on."""

    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def step(self, position: int, hidden: torch.Tensor, *, rewind: bool = False) -> Step:
        if self.mask is None:
            return Step(position, hidden, rewind=rewind)
        end = position + hidden.shape[1]
        return Step(
            position,
            hidden,
            attention_mask=self.mask[:, position:end],
            position_ids=self.positions[:, position:end],
            rewind=rewind,
        )


class SpanStream:
    """One open inference session on one server, and every input it has been sent (``history``).

    ``prompts`` are the deep prompts of this span's blocks, sent with every step that reaches into the prefix.
    Whoever keeps state about a stream (verification) registers ``on_close`` to let go of it with the stream.
    """

    def __init__(
        self,
        conn: Connection,
        span: RouteSpan,
        *,
        session_id: str = "",
        prompts: torch.Tensor | None = None,
        lora: bool = False,
    ):
        self.conn, self.span, self.session_id, self.prompts = conn, span, session_id, prompts
        self.history: list[torch.Tensor] = []
        self.acknowledged = False  # the server's answer to the opening message has been read
        self.lora = lora  # the opening carried client-sent LoRA weights: the server must say it applies them
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._responses: AsyncIterator | None = None
        self._rewinding = False  # the step waiting for an answer starts before the server's cache ends
        self._answer_position = 0  # where the server's session must be once it has applied that step
        self._on_close: list[Callable[[], None]] = []

    @property
    def tokens(self) -> int:
        """Tokens this stream's server has been sent (and holds in its cache)."""
        return sum(inputs.shape[1] for inputs in self.history)

    async def connect(self, opening: runtime_pb2.ExpertRequest) -> None:
        """Send the opening message; steps may follow at once (its acknowledgement is read before the first answer)."""
        self._outbox.put_nowait(opening)
        call = self.conn.stub(self.span.peer_id).rpc_inference(self._requests())
        self._responses = await guard(self.conn, self.span, call)

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            yield message

    def send(self, step: Step) -> None:
        self.expect(step)
        if self.prompts is not None and step.position < self.prompts.shape[1]:  # only steps reaching into the prefix
            step = dataclasses.replace(step, prompts=self.prompts)
        self._outbox.put_nowait(step.to_message())

    def expect(self, step: Step) -> None:
        """``step`` is on its way to this server (sent from here, or pushed to it by the previous server)."""
        self._rewinding = step.rewind
        self._answer_position = step.position + step.tokens

    async def exchange(self, step: Step) -> torch.Tensor:
        """Send ``step`` and return the server's output for it."""
        self.send(step)
        return (await self.answer(step.hidden.shape))[1]

    async def answer(
        self, shape: torch.Size, *, watch: Collection[str] = (), since: float | None = None
    ) -> tuple[StepResponse, torch.Tensor]:
        """The server's answer to the next step it got, whose input had ``shape``: its metadata and its output.
        ``watch`` and ``since``: see ``guard``."""
        if not self.acknowledged:  # the session's opening: accepted, or refused (a ServerFailure like any other)
            try:
                _, acknowledgement = await self._receive()
                if self.lora and not acknowledgement.lora:  # an older server ignored the weights
                    raise ServerFailure(self.span, "does not apply client-sent LoRA weights (an older petals)")
            except ServerFailure as failure:
                failure.at_opening = True
                raise
            self.acknowledged = True
        response, meta = await self._receive(watch, since)
        if len(response.tensors) != 1:
            raise ServerFailure(self.span, f"sent {len(response.tensors)} tensors")
        if meta.position != self._answer_position:  # e.g. a step both pushed and relayed: an answer out of step
            raise ServerFailure(self.span, f"answered at position {meta.position}, not {self._answer_position}")
        try:
            output = transport.deserialize(response.tensors[0])
        except PetalsError as exc:
            raise ServerFailure(self.span, str(exc)) from None
        if output.shape != shape:
            raise ServerFailure(self.span, f"returned shape {list(output.shape)} for {list(shape)}")
        return meta, output

    async def _receive(
        self, watch: Collection[str] = (), since: float | None = None
    ) -> tuple[runtime_pb2.ExpertResponse, StepResponse]:
        response = await guard(self.conn, self.span, anext(self._responses), watch=watch, since=since)
        try:
            meta = transport.check_response(response)
        except SessionExpiredError as exc:  # the server reaped an idle session: rebuild it there or elsewhere
            raise ServerFailure(self.span, str(exc), ban=False) from exc
        except InvalidRequestError as exc:
            if not self._rewinding:
                raise
            # a cache that cannot go back (a sliding window that dropped positions): rebuild it from the inputs
            raise ServerFailure(self.span, f"could not roll back ({exc})", ban=False) from exc
        except (ServerError, CacheExhaustedError) as exc:
            raise ServerFailure(self.span, f"{type(exc).__name__}: {exc}") from exc
        return response, meta

    def keep(self, position: int, inputs: torch.Tensor) -> None:
        """Keep ``inputs`` as the tokens from ``position`` on (in place of anything kept from there)."""
        self.history = [*first_tokens(self.history, position), inputs]

    def cut(self, position: int) -> None:
        """Forget the inputs of every token from ``position`` on."""
        self.history = first_tokens(self.history, position)

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def close(self) -> None:
        self._outbox.put_nowait(None)
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()


async def run_chain(streams: list[SpanStream], step: Step) -> list[torch.Tensor]:
    """Send ``step``'s tokens through ``streams`` in turn, each keeping them in place of anything it held from
    ``step.position`` on (with ``step.rewind``, its server drops those too); every stream's outputs."""
    outputs = []
    for stream in streams:
        output = await stream.exchange(step)
        stream.keep(step.position, step.hidden)
        outputs.append(output)
        step = dataclasses.replace(step, hidden=output)
    return outputs


def close_all(streams: Collection[SpanStream]) -> None:
    for stream in streams:
        stream.close()


@dataclasses.dataclass
class Opener:
    """How one session routes and opens its streams: the model, the cache its servers must hold, and what every
    opening message carries (the deep prompts are sent later, with the steps that need them)."""

    conn: Connection
    prefix: str
    num_blocks: int
    max_length: int
    batch_size: int = 1
    prompts: torch.Tensor | None = None  # deep prompts of all blocks [num_blocks, prefix, hidden]
    lora: ClientLora | None = None
    lora_weights: list[torch.Tensor] | None = None  # the weights as they were when the session began, in wire order

    async def route(
        self, start: int, end: int, *, wait: float | None = None, exclude: Collection[str] = ()
    ) -> list[RouteSpan]:
        return await self.conn.route(
            self.prefix,
            self.num_blocks,
            start,
            end,
            cache_tokens_needed=self.batch_size * self.max_length,
            wait=wait,
            exclude=exclude,
        )

    async def open(self, span: RouteSpan) -> SpanStream:
        """Open a session on ``span``'s server under an id chosen here, so that steps (and the previous server's
        pushes) can follow at once: the server's acknowledgement, or its refusal, is read before the first answer."""
        lora = None if self.lora is None else self.lora.for_span(self.lora_weights, span.start, span.end)
        prompts = None if self.prompts is None else self.prompts[span.start : span.end]
        stream = SpanStream(self.conn, span, session_id=uuid.uuid4().hex, prompts=prompts, lora=lora is not None)
        request = span_request(
            self.prefix,
            span,
            adapter=self.conn.config.active_adapter,
            lora=lora,
            max_length=self.max_length,
            batch_size=self.batch_size,
            session_id=stream.session_id,
        )
        tensors = [] if lora is None else [transport.serialize(weight) for weight in lora.weights]
        try:
            await stream.connect(runtime_pb2.ExpertRequest(metadata=transport.pack(request), tensors=tensors))
        except BaseException:
            stream.close()
            raise
        return stream

    async def open_route(
        self, start: int, end: int, *, wait: float | None = None, exclude: Collection[str] = ()
    ) -> list[SpanStream]:
        """Streams over a route of blocks [start, end), all opened at once; none stays open if one fails."""
        route = await self.route(start, end, wait=wait, exclude=exclude)
        opened = await asyncio.gather(*(self.open(span) for span in route), return_exceptions=True)
        failed = [outcome for outcome in opened if isinstance(outcome, BaseException)]
        if failed:
            close_all([outcome for outcome in opened if isinstance(outcome, SpanStream)])
            raise failed[0]
        return list(opened)


async def call_unary(
    conn: Connection,
    prefix: str,
    span: RouteSpan,
    method: str,
    tensors: list[torch.Tensor],
    prompts: torch.Tensor | None = None,
    graph_id: str = "",
    lora: SpanLora | None = None,
) -> list[torch.Tensor]:
    """One forward or backward request; the answer's tensors have the shapes of ``tensors[0]`` (and, for a
    backward, of ``prompts`` and of the ``lora`` weights, whose gradients follow)."""
    adapter = conn.config.active_adapter
    request = span_request(prefix, span, adapter=adapter, lora=lora, prompts=prompts is not None, graph_id=graph_id)
    if prompts is not None:
        prompts = prompts[span.start : span.end]
        tensors = [*tensors, prompts]
    if lora is not None:
        tensors = [*tensors, *lora.weights]
    messages = transport.request_messages(tensors, transport.pack(request))
    expected = [tensors[0].shape]
    if method == "rpc_backward":
        expected += [prompts.shape] if prompts is not None else []
        expected += [weight.shape for weight in lora.weights] if lora is not None else []

    async def requests():
        for message in messages:
            yield message

    async def call():
        responses = await getattr(conn.stub(span.peer_id), method)(requests())
        try:
            return await transport.read_answer(responses, len(expected))
        except InvalidRequestError as exc:  # a cut or garbled answer: this server's fault, not our request's
            raise ServerFailure(span, f"sent a malformed answer ({exc})") from exc

    outputs, metadata = await guard(conn, span, call())
    try:
        transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
    except (ServerError, CacheExhaustedError) as exc:
        raise ServerFailure(span, f"{type(exc).__name__}: {exc}") from exc
    if [output.shape for output in outputs] != expected:
        raise ServerFailure(span, "sent a malformed answer")
    return outputs


def tokens_from(history: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The steps of ``history`` from token ``tokens`` on (the first one cut to start there)."""
    kept, total = [], 0
    for inputs in history:
        if total + inputs.shape[1] > tokens:
            kept.append(inputs[:, max(0, tokens - total) :])
        total += inputs.shape[1]
    return kept


def first_tokens(history: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The inputs ``history`` (steps of [batch, tokens, hidden]) cut to their first ``tokens`` tokens."""
    kept, total = [], 0
    for inputs in history:
        if total + inputs.shape[1] > tokens:
            if tokens > total:
                kept.append(inputs[:, : tokens - total])
            break
        kept.append(inputs)
        total += inputs.shape[1]
    return kept
