"""The server's RPC handlers: they decode, validate, submit and reply; nothing else.

Every request is validated (protocol, model prefix, block range, tensor shapes and dtypes, lengths, the LoRA
weights a client sends) before any compute; a bad request gets a typed error response and the server carries on.
An inference stream opens a ``ServerSession`` (``sessions.py``: cache, position, mask, within the cache budget and
per-peer limits; the LoRA weights of its opening message, for all its steps) and each of its messages is decoded
as a ``Step`` (``step.py``) and applied to that session; the step engine (``engine.py``) owns the compute thread
and batches the one-token steps of sessions waiting together; what runs on that thread is ``compute.py``. The
event loop keeps answering (info RPCs, DHT) while a step computes.

A session's cache and tokens are returned when its stream ends (closed, disconnected or failed) or when it
sends no step for ``session_idle_timeout`` seconds. A step that fails (out of memory included) or passes its
deadline ends only its own session, with a ``ServerError`` its client fails over on.

Every wait for a peer is bounded by what the protocol needs: a session's opening comes with its stream
(``OPENING_TIMEOUT``), a pushed stream's step and end within ``push_timeout`` (the pusher's own limit), a
forward/backward within ``step_timeout``; between steps a session may idle for ``session_idle_timeout``. A handler
may answer before reading a whole stream: the stream loop (``transport.serve_stream``) reads the rest, then closes
it. Large messages are decoded and checked on a thread (``transport.off_loop``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import msgpack
from hivemind.p2p import P2PContext
from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.errors import InvalidRequestError, PetalsError, ServerError, SessionExpiredError
from petals_cli.families.base import SpanRunner
from petals_cli.server import validation
from petals_cli.server.adapters import RequestLora, SpanAdapters, request_lora
from petals_cli.server.cache import CacheBudget
from petals_cli.server.compute import SpanCompute, describe_failure
from petals_cli.server.engine import StepEngine, StepJob
from petals_cli.server.graphs import KeptGraphs
from petals_cli.server.sessions import ServerSession, ServerSessions
from petals_cli.server.validation import Limits
from petals_cli.step import Step
from petals_cli.wire import SpanRequest, StepResponse

logger = logging.getLogger(__name__)
# Seconds for the next server to accept a pushed step (it only queues it), plus its bytes at PUSH_BYTES_PER_SECOND
# (``push_timeout``). The client waits for this server's answer, which follows the push: a frozen next server costs
# it this much before it relays the step. A push that was late but did arrive is dropped there as a repeat.
PUSH_TIMEOUT = 1.0
PUSH_BYTES_PER_SECOND = 1 << 20
PUSH_BACKOFF = 30.0  # seconds without pushing to a server after a push to it timed out or broke
# seconds from a session's stream opening to its opening message: the client sends it at once, but LoRA weights may
# ride on it, which a slow link takes a few seconds to carry
OPENING_TIMEOUT = 10.0
# a pushed step larger than this goes on a stream: the daemons refuse unary messages over 4 MiB (hivemind's own
# client stops at half of that)
PUSH_UNARY_BYTES = MAX_UNARY_PAYLOAD_SIZE


def push_timeout(size: int) -> float:
    """Seconds a pushed step of ``size`` bytes may take to be accepted: by the pusher, and by a pushed stream's
    receiver for the largest step it accepts."""
    return PUSH_TIMEOUT + size / PUSH_BYTES_PER_SECOND


async def _one(message):
    yield message


def _sent_lora(span: SpanRunner, request: SpanRequest, opening: runtime_pb2.ExpertRequest) -> RequestLora | None:
    """The LoRA weights a session's opening message carries, decoded and checked."""
    return request_lora(span, request, [transport.deserialize(part) for part in opening.tensors])


async def _read_into(requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue) -> None:
    """Queue a client's stream messages for its session (None at the stream's end)."""
    try:
        async for message in requests:
            await inbox.put(message)  # waits while the session is behind: the stream then stops being read
    except Exception:  # noqa: BLE001 (a broken stream ends the session like a closed one)
        pass
    await inbox.put(None)


class BlockHandler:
    """Answers RPCs for the blocks of one ``SpanRunner``; ``info()`` supplies the rpc_info payload."""

    def __init__(
        self,
        span: SpanRunner,
        prefix: str,
        budget: CacheBudget,
        *,
        limits: Limits,
        alloc_timeout: float,
        session_idle_timeout: float,
        info,
        adapters: SpanAdapters | None = None,
        connect=None,
    ):
        self.span, self.prefix = span, prefix
        self.adapters = SpanAdapters() if adapters is None else adapters  # one per span: it hooks the span's layers
        self.limits = limits
        self.session_idle_timeout = session_idle_timeout
        self.info = info
        self.connect = connect  # peer id -> a stub of that server's BlocksService (to push steps), or None
        self._unpushable: dict[str, float] = {}  # peer -> until when (loop time) steps are not pushed to it
        self.sessions = ServerSessions(budget, limits, alloc_timeout=alloc_timeout)
        self.compute = SpanCompute(span, KeptGraphs(max_bytes=limits.max_kept_graph_bytes), self.adapters)
        self.engine = StepEngine(self.compute.run_group)  # owns the compute thread

    def shutdown(self) -> None:
        self.engine.shutdown()

    def replace_span(self, span: SpanRunner, adapters: SpanAdapters | None = None) -> None:
        """Serve other blocks from now on (rebalancing). Open sessions end at their next step, with a
        ServerError their clients fail over on: their caches belong to the old blocks (``session.span``)."""
        self.span = span
        self.adapters = SpanAdapters() if adapters is None else adapters
        self.compute.replace(span, self.adapters)

    def _check_span_request(self, metadata: bytes) -> SpanRequest:
        request = validation.check_span_request(
            transport.unpack(metadata), self.prefix, (self.span.start, self.span.end)
        )
        if request.adapter and request.adapter not in self.adapters.names:
            raise InvalidRequestError(f"this server has no adapter {request.adapter[:64]!r}")
        if len(request.graph_id) > 64:
            raise InvalidRequestError("graph_id may be at most 64 characters")
        return request

    @property
    def hidden_size(self) -> int:
        return self.span.config.hidden_size

    # --- inference ----------------------------------------------------------------------------------------

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session, reader, ending = None, None, "disconnected"  # unless the stream ends or expires
        try:
            try:
                opening = await self._opening(requests)
                if opening is None:
                    return
                size = validation.check_message_size(opening, self.limits)
                request = self._check_span_request(opening.metadata)
                lora = await transport.off_loop(size, _sent_lora, self.span, request, opening)
                session = await self._open_session(request, peer=context.remote_id.to_base58(), lora=lora)
            except PetalsError as error:
                logger.info("session refused: %s: %s", error.code, error)
                yield transport.error_response(error)
                return
            except Exception as exc:  # e.g. out of memory making the cache: refuse this session only
                logger.warning("session refused: %s: %s", exc.__class__.__name__, exc)
                yield transport.error_response(ServerError(f"cannot open a session: {exc.__class__.__name__}"))
                return
            acknowledgement = StepResponse(position=0, session_id=session.id, lora=lora is not None)
            yield runtime_pb2.ExpertResponse(metadata=transport.pack(acknowledgement))
            reader = asyncio.create_task(_read_into(requests, session.inbox))
            while True:
                try:
                    item = await self._next(session.inbox.get())
                except SessionExpiredError as error:
                    ending = "expired"
                    yield transport.error_response(error)
                    return
                if item is None:
                    ending = "ended"
                    return
                answer = await self._inference_step(session, item)
                if answer is not None:
                    yield answer
                if session.broken:
                    ending = "failed"
                    return
        finally:
            # Also reached when hivemind cancels this handler because the client disconnected.
            if reader is not None:
                reader.cancel()
            if session is not None:
                self.sessions.close(session, ending)

    async def _opening(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> runtime_pb2.ExpertRequest | None:
        """A session's first message (None when its stream ends first), which must follow the stream's opening."""
        try:
            async with asyncio.timeout(OPENING_TIMEOUT):
                return await anext(requests, None)
        except TimeoutError:
            raise InvalidRequestError(f"no opening message in the first {OPENING_TIMEOUT:g}s of the stream") from None

    async def _next(self, awaitable):
        """The next item of a session's inbox; a silent client expires the session."""
        try:
            async with asyncio.timeout(self.session_idle_timeout):
                return await awaitable
        except TimeoutError:
            raise SessionExpiredError(
                f"the session sent nothing for {self.session_idle_timeout:g}s; the server closed it, freeing its cache"
            ) from None

    async def _open_session(self, request: SpanRequest, *, peer: str, lora: RequestLora | None) -> ServerSession:
        """A session with its cache; with the LoRA weights its opening message carried, applied to all its steps."""
        span = self.span
        session = await self.sessions.open(
            request,
            peer,
            lambda: span.make_cache(request.start_block, request.end_block, capacity=request.max_length),
            lora,
        )
        session.span = span  # a move while it was being opened leaves it on blocks no longer computed with
        session.batchable = span.can_batch(session.cache)  # standard blocks, full-attention cache
        return session

    async def _inference_step(self, session: ServerSession, item) -> runtime_pb2.ExpertResponse | None:
        """Apply a step from the client's stream (a message) or pushed by the previous server (a checked Step);
        the answer always goes to the client, and the output on to the next server when the step says so. A
        second copy of the step applied last (both pushed and relayed) is dropped: None, no answer."""
        if session.span is not self.span:  # opened on blocks this server has moved from
            session.broken = True
            return transport.error_response(ServerError("this server moved to other blocks; open a new session"))
        try:
            step = item if isinstance(item, Step) else await self._received(item, session)
            if session.repeats(step):
                logger.debug("session %s: step at %d came twice (pushed and relayed)", session.id[:8], step.position)
                return None
            output = await session.apply(step, self._submit, others_open=len(self.sessions) > 1)
            pushed = bool(step.next_hops) and await self._push(step.pushed_on(output), step.next_hops[0][0])
            return transport.step_response(output, StepResponse(position=session.position, pushed=pushed))
        except PetalsError as error:
            return transport.error_response(error)
        except Exception as exc:
            return transport.error_response(describe_failure("inference step", exc))

    async def _received(self, message: runtime_pb2.ExpertRequest, session: ServerSession) -> Step:
        """A client's step message, decoded and checked against its session."""
        size = validation.check_message_size(message, self.limits)
        return await self._checked(session, await transport.off_loop(size, Step.from_message, message), size)

    async def _checked(self, session: ServerSession, step: Step, size: int) -> Step:
        """``step`` checked against ``session`` (on a thread when its message had ``size`` bytes or more)."""
        limits = self.limits
        return await transport.off_loop(size, validation.check_step, step, session.request, self.hidden_size, limits)

    async def _push(self, step: Step, peer: str) -> bool:
        """Send ``step`` to the next server's session; False (the client relays it) when that fails."""
        now = asyncio.get_running_loop().time()
        if self.connect is None or self._unpushable.get(peer, now) > now:
            return False
        try:
            message, stub = step.to_message(), self.connect(peer)
            async with asyncio.timeout(push_timeout(message.ByteSize())):
                if message.ByteSize() <= PUSH_UNARY_BYTES:  # one call on the peers' open connection
                    response = await stub.rpc_push(message)
                else:  # a long prompt's hidden states: a stream of its own (no size cap; one more round trip)
                    _, metadata = await transport.read_answer(await stub.rpc_push_stream(_one(message)))
                    if not metadata:
                        raise ConnectionError("the pushed stream closed with no answer")
                    response = runtime_pb2.ExpertResponse(metadata=metadata)
                transport.check_response(response)
            self._unpushable.pop(peer, None)
            return True
        except PetalsError as exc:  # refused at once (no such session yet, a full inbox): the client sends it itself
            logger.info("push to %s refused (%s); the client relays", peer[-8:], exc)
            return False
        except Exception as exc:  # unreachable or late (a cut link, a frozen server), or a private swarm's gate
            self._unpushable[peer] = now + PUSH_BACKOFF  # each step would wait for it again: relayed meanwhile
            logger.info(
                "push to %s failed (%s: %s); the client relays its steps for %gs",
                peer[-8:], exc.__class__.__name__, exc, PUSH_BACKOFF,
            )  # fmt: skip
            return False

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """``rpc_push`` of a step too large for a unary call: a stream of one message, read to its end (within the
        pusher's own ``push_timeout``) before the one answer, which would otherwise race the pusher's end of stream."""
        yield await self._push_streamed(requests, context)

    async def _push_streamed(self, requests, context: P2PContext) -> runtime_pb2.ExpertResponse:
        seconds = push_timeout(self.limits.max_request_bytes)
        try:
            async with asyncio.timeout(seconds):
                message = await anext(requests, None)
                more = message is not None and await anext(requests, None) is not None
        except TimeoutError:
            refusal = InvalidRequestError(f"a pushed stream did not bring its step and end within {seconds:g}s")
            return transport.error_response(refusal)
        if message is None or more:
            return transport.error_response(InvalidRequestError("a pushed stream carries exactly one step"))
        return await self.rpc_push(message, context)

    async def rpc_push(self, message: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A step another server pushes to one of this server's sessions: checked, queued, acknowledged."""
        try:
            size = validation.check_message_size(message, self.limits)
            step = await transport.off_loop(size, Step.from_message, message)
            session = await self.sessions.find(step.session_id, wait=1.0)
            if session is None:
                raise InvalidRequestError("no such session on this server")
            step = await self._checked(session, step, size)
        except PetalsError as error:
            return transport.error_response(error)
        try:
            session.inbox.put_nowait(step)
        except asyncio.QueueFull:  # the pusher reports it, and the client sends the step itself
            return transport.error_response(InvalidRequestError("the session has too many steps waiting"))
        return runtime_pb2.ExpertResponse(metadata=transport.pack(StepResponse(position=step.position)))

    async def _submit(self, job: StepJob):
        return await self._deadline(self.engine.submit(job))

    async def _deadline(self, awaitable):
        """Await compute for at most ``step_timeout`` seconds; the compute thread finishes the step regardless."""
        try:
            async with asyncio.timeout(self.limits.step_timeout):
                return await awaitable
        except TimeoutError:
            raise ServerError(
                f"the step took longer than this server's {self.limits.step_timeout:g}s deadline"
            ) from None

    # --- forward / backward (no cache) --------------------------------------------------------------------

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        for message in await self._unary(requests, 1, self.compute.forward):
            yield message

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        for message in await self._unary(requests, 2, self.compute.backward):
            yield message

    async def _unary(self, requests, num_tensors: int, function) -> list[runtime_pb2.ExpertResponse]:
        """A forward or backward. Refused before its end (too large, a malformed first tensor), the stream loop
        reads what the client still sends after the answer."""
        try:
            async with asyncio.timeout(self.limits.step_timeout):
                tensors, metadata = await transport.collect_tensors(requests, self.limits.max_request_bytes)
            request = self._check_span_request(metadata)
            size = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
            prompts, lora = await transport.off_loop(size, self._unary_inputs, request, tensors, num_tensors)
            outputs = await self._deadline(self.engine.run(function, *tensors[:num_tensors], request, prompts, lora))
            return transport.response_messages(outputs, StepResponse())
        except TimeoutError:
            return [transport.error_response(InvalidRequestError("the request was not sent in time"))]
        except PetalsError as error:
            return [transport.error_response(error)]
        except Exception as exc:
            return [transport.error_response(describe_failure("forward/backward", exc))]

    def _unary_inputs(self, request: SpanRequest, tensors: list, num_tensors: int) -> tuple:
        """A forward/backward's tensors checked: inputs (and gradients), then prompts and LoRA weights if sent."""
        given = num_tensors + request.prompts  # the client's LoRA weights follow
        if len(tensors) != (expected := given + validation.lora_tensor_count(request)):
            raise InvalidRequestError(f"expected {expected} tensors, got {len(tensors)}")
        first = validation.check_hidden(tensors[0], self.hidden_size)
        for other in tensors[1:num_tensors]:
            if other.shape != first.shape:
                raise InvalidRequestError(f"gradient shape {list(other.shape)} != input {list(first.shape)}")
            validation.check_hidden(other, self.hidden_size, name="gradients")
        prompts = tensors[num_tensors] if request.prompts else None
        if prompts is not None:
            prompts = validation.check_prompts(prompts, request, self.hidden_size, self.limits)
        return prompts, request_lora(self.span, request, tensors[given:])

    # --- info -------------------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        """The server's record, fresh, with the sessions the asking peer holds here (so that a client with many
        sessions routes its next one elsewhere before this server refuses it with PeerLimitError)."""
        held = self.sessions.peers.open.get(context.remote_id.to_base58(), 0)
        info = dataclasses.replace(self.info(), your_sessions=held)
        return runtime_pb2.ExpertInfo(serialized_info=msgpack.packb(info.to_wire(), use_bin_type=True))
