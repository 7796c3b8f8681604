"""The server's RPC handlers: inference streams with per-session caches, forward, backward and info.

Every request is validated (protocol, model prefix, block range, tensor shapes and dtypes, lengths) before
any compute; a bad request gets a typed error response and the server carries on. Torch work runs on the step
engine's one thread (``engine.py``), which runs the one-token steps of sessions waiting together as one batch;
the event loop keeps answering (info RPCs, DHT) while a step computes.

Memory is bounded before it is spent: a session's ``batch_size * max_length`` is checked against hard limits
and reserved in the ``CacheBudget`` before its cache exists, and no step may take it past ``max_length``.
The checks and the other limits (request bytes, sessions per peer, step deadline) live in ``validation.py``.
A session's cache and tokens are returned when its stream ends (closed, disconnected or failed) or when it
sends no step for ``session_idle_timeout`` seconds. A step that fails (out of memory included) or passes its
deadline ends only its own session, with a ``ServerError`` its client fails over on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgpack
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.errors import (
    InvalidRequestError,
    PetalsError,
    ServerError,
    SessionExpiredError,
    SessionLengthError,
)
from petals_cli.families.base import SpanRunner
from petals_cli.server import validation
from petals_cli.server.adapters import NO_ADAPTERS, SpanAdapters
from petals_cli.server.cache import CacheBudget
from petals_cli.server.engine import StepEngine, StepJob
from petals_cli.server.graphs import KeptGraphs, SavedBytes
from petals_cli.server.validation import Limits, PeerSessions
from petals_cli.wire import SpanRequest, StepRequest, StepResponse

logger = logging.getLogger(__name__)


@dataclass
class Session:
    id: str
    request: SpanRequest
    cache: object
    peer: str = ""
    position: int = 0
    attention_mask: torch.Tensor | None = None  # [batch, position], once a step has sent padding
    broken: bool = False  # a step failed half-way; the session ends after reporting it
    moved: bool = False  # the server now holds other blocks: the session ends at its next step


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
        adapters: SpanAdapters = NO_ADAPTERS,
    ):
        self.span, self.prefix, self.budget = span, prefix, budget
        self.limits = limits
        self.peer_sessions = PeerSessions(limits.max_sessions_per_peer)
        self.adapters = adapters
        self.alloc_timeout = alloc_timeout
        self.session_idle_timeout = session_idle_timeout
        self.hidden_size = span.config.hidden_size
        self.info = info
        self.sessions: dict[str, Session] = {}
        self.graphs = KeptGraphs(max_bytes=limits.max_kept_graph_bytes)
        self.engine = StepEngine(self._run_group)  # owns the compute thread

    def shutdown(self) -> None:
        self.engine.shutdown()

    async def _run(self, function, *args):
        return await self.engine.run(function, *args)

    # --- validation -------------------------------------------------------------------------------------

    def _check_span_request(self, metadata: bytes) -> SpanRequest:
        request = validation.check_span_request(
            transport.unpack(metadata), self.prefix, (self.span.start, self.span.end)
        )
        if request.adapter and request.adapter not in self.adapters.names:
            raise InvalidRequestError(f"this server has no adapter {request.adapter[:64]!r}")
        if len(request.graph_id) > 64:
            raise InvalidRequestError("graph_id may be at most 64 characters")
        return request

    def _check_prompts(self, tensor: torch.Tensor, request: SpanRequest) -> torch.Tensor:
        blocks = request.end_block - request.start_block
        if tensor.ndim != 3 or tensor.shape[0] != blocks or tensor.shape[2] != self.hidden_size or 0 in tensor.shape:
            raise InvalidRequestError(
                f"prompts must be [{blocks}, prefix, {self.hidden_size}], got {list(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise InvalidRequestError(f"prompts must be floating point, got {tensor.dtype}")
        if tensor.shape[1] > self.limits.max_session_length:
            raise InvalidRequestError(f"prompts may be at most {self.limits.max_session_length} positions long")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidRequestError("prompts contain NaN or infinite values")
        return tensor

    def _check_hidden(self, tensor: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        return validation.check_hidden(tensor, self.hidden_size, batch_size)

    # --- inference ----------------------------------------------------------------------------------------

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session, ending = None, "disconnected"  # unless the stream ends or expires
        try:
            try:
                opening = await self._next_request(requests)
                if opening is None:
                    return
                request = self._check_span_request(opening.metadata)
                session = await self._open_session(request, peer=context.remote_id.to_base58())
            except PetalsError as error:
                logger.info("session refused: %s: %s", error.code, error)
                yield transport.error_response(error)
                return
            except Exception as exc:  # e.g. out of memory making the cache: refuse this session only
                logger.warning("session refused: %s: %s", exc.__class__.__name__, exc)
                yield transport.error_response(ServerError(f"cannot open a session: {exc.__class__.__name__}"))
                return
            yield runtime_pb2.ExpertResponse(metadata=transport.pack(StepResponse(position=0)))
            while True:
                try:
                    message = await self._next_request(requests)
                except SessionExpiredError as error:
                    ending = "expired"
                    yield transport.error_response(error)
                    return
                if message is None:
                    ending = "ended"
                    return
                yield await self._inference_step(session, message)
                if session.broken:
                    ending = "failed"
                    return
        finally:
            # Also reached when hivemind cancels this handler because the client disconnected.
            if session is not None:
                self._close_session(session, ending)

    async def _next_request(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        """The next message of an inference stream, None at its end; a silent client expires the session."""
        try:
            async with asyncio.timeout(self.session_idle_timeout):
                return await anext(requests, None)
        except TimeoutError:
            raise SessionExpiredError(
                f"the session sent nothing for {self.session_idle_timeout:g}s; the server closed it, freeing its cache"
            ) from None

    async def _open_session(self, request: SpanRequest, *, peer: str) -> Session:
        # Hard limits first, so an absurd request never reaches the budget or allocates anything.
        tokens = validation.check_session_size(request, self.limits)
        session_id = uuid.uuid4().hex
        self.peer_sessions.acquire(peer)
        try:
            await self.budget.allocate(session_id, tokens, timeout=self.alloc_timeout)
            cache = self.span.make_cache(request.start_block, request.end_block, capacity=request.max_length)
        except BaseException:
            self.budget.release(session_id)
            self.peer_sessions.release(peer)
            raise
        session = Session(id=session_id, request=request, cache=cache, peer=peer)
        self.sessions[session_id] = session
        logger.info(
            "session %s opened: blocks %d:%d, %d tokens reserved, %d left (peer %s)",
            session_id[:8],
            request.start_block,
            request.end_block,
            tokens,
            self.budget.tokens_left,
            peer[-8:],
        )
        return session

    def _close_session(self, session: Session, ending: str) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.peer_sessions.release(session.peer)
        self.budget.release(session.id)
        logger.info(
            "session %s %s at %d tokens, %d left (peer %s)",
            session.id[:8],
            ending,
            session.position,
            self.budget.tokens_left,
            session.peer[-8:],
        )

    def replace_span(self, span: SpanRunner, adapters: SpanAdapters = NO_ADAPTERS) -> None:
        """Serve other blocks from now on (rebalancing). Open sessions end at their next step, with a
        ServerError their clients fail over on; their caches belong to the old blocks."""
        self.span, self.adapters = span, adapters
        for session in self.sessions.values():
            session.moved = True

    async def _inference_step(self, session: Session, message) -> runtime_pb2.ExpertResponse:
        if session.moved:
            session.broken = True
            return transport.error_response(ServerError("this server moved to other blocks; open a new session"))
        try:
            validation.check_message_size(message, self.limits)
            step = StepRequest.from_wire(transport.unpack(message.metadata))
            extra_count = len(step.extra_tensors)
            expected = 1 + extra_count + step.prompts
            if len(message.tensors) != expected:
                raise InvalidRequestError(f"this step carries {expected} tensors, got {len(message.tensors)}")
            hidden = self._check_hidden(transport.deserialize(message.tensors[0]), session.request.batch_size)
            prompts = None
            if step.prompts:  # only the part of the prefix this step covers
                proto = message.tensors[1 + extra_count]
                prompts = self._check_prompts(transport.deserialize(proto), session.request)
                prompts = prompts[:, step.position :] if step.position < prompts.shape[1] else None
            if step.position != session.position:
                raise InvalidRequestError(f"step at position {step.position}, session is at {session.position}")
            if session.position + hidden.shape[1] > session.request.max_length:
                raise SessionLengthError(
                    f"step would reach {session.position + hidden.shape[1]} tokens, max_length is "
                    f"{session.request.max_length}"
                )
            extras = validation.check_step_extras(
                step.extra_tensors,
                [transport.deserialize(proto) for proto in message.tensors[1 : 1 + extra_count]],
                tuple(hidden.shape[:2]),
                session.request.max_length,
            )
            request = session.request
            mask = extras.get("attention_mask")
            if mask is not None:
                earlier = session.attention_mask
                if earlier is None:
                    earlier = torch.ones(hidden.shape[0], session.position, dtype=mask.dtype)
                mask = torch.cat([earlier, mask], dim=1)
            elif session.attention_mask is not None:
                mask = torch.nn.functional.pad(session.attention_mask, (0, hidden.shape[1]), value=1)
            positions = extras.get("position_ids")
            if mask is not None and positions is None:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, session.position :]
            job = StepJob(
                session.id,
                session.peer,
                (request.start_block, request.end_block),
                request.adapter,
                hidden,
                session.cache,
                attention_mask=mask,
                position_ids=positions,
                prompts=prompts,
            )
            if prompts is None and self.span.can_batch(session.cache):  # standard blocks, full-attention cache
                job.batchable = hidden.shape[1] == 1
                # a prompt is cut into chunks only while other sessions are open here: alone, it runs whole
                job.chunkable = hidden.shape[1] > 1 and len(self.sessions) > 1
            output = await self._deadline(self.engine.submit(job))
            session.position += hidden.shape[1]
            session.attention_mask = mask
            return transport.step_response(output, StepResponse(position=session.position))
        except PetalsError as error:
            if isinstance(error, ServerError):  # the deadline passed mid-step: the cache state is unknown
                session.broken = True
            return transport.error_response(error)
        except Exception as exc:
            # Some blocks may have extended the cache before the failure: the session cannot go on correctly.
            session.broken = True
            return transport.error_response(self._compute_failure("inference step", exc))

    async def _deadline(self, awaitable):
        """Await compute for at most ``step_timeout`` seconds; the compute thread finishes the step regardless."""
        try:
            async with asyncio.timeout(self.limits.step_timeout):
                return await awaitable
        except TimeoutError:
            raise ServerError(
                f"the step took longer than this server's {self.limits.step_timeout:g}s deadline"
            ) from None

    def _compute_failure(self, what: str, exc: Exception) -> ServerError:
        """Log a compute failure and describe it; out of memory frees what torch holds for later requests."""
        cpu_allocation = isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # torch on a CPU
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or cpu_allocation:
            logger.warning("%s ran out of memory: %s", what, exc)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return ServerError(f"{what} ran out of memory on this server; try a smaller request or another server")
        logger.exception("%s failed", what)
        return ServerError(f"{what} failed: {exc.__class__.__name__}: {exc}")

    @torch.inference_mode()
    def _run_group(self, group: list[StepJob]) -> list[torch.Tensor]:
        """The engine's compute: one step alone, or one-token steps of several sessions as one batch."""
        first = group[0]
        if len(group) == 1:
            return [
                self._forward(
                    first.hidden, *first.blocks, first.cache, first.attention_mask, first.position_ids,
                    first.prompts, first.adapter,
                )
            ]  # fmt: skip
        with self.adapters.active(first.adapter):
            return self.span.forward_batched(
                [job.hidden for job in group],
                *first.blocks,
                [job.cache for job in group],
                [job.attention_mask for job in group],
                [job.position_ids for job in group],
            )

    @torch.inference_mode()
    def _forward(
        self, hidden, start, end, cache=None, attention_mask=None, position_ids=None, prompts=None, adapter=""
    ):
        with self.adapters.active(adapter):
            return self.span(
                hidden, start, end, cache, attention_mask=attention_mask, position_ids=position_ids, prompts=prompts
            )

    # --- forward / backward (no cache) --------------------------------------------------------------------

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        for message in await self._unary(requests, 1, self._forward_unary):
            yield message

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        for message in await self._unary(requests, 2, self._backward):
            yield message

    async def _unary(self, requests, num_tensors: int, function) -> list[runtime_pb2.ExpertResponse]:
        try:
            async with asyncio.timeout(self.limits.step_timeout):
                tensors, metadata = await transport.collect_tensors(requests, self.limits.max_request_bytes)
            request = self._check_span_request(metadata)
            if len(tensors) != num_tensors + request.prompts:
                raise InvalidRequestError(f"expected {num_tensors + request.prompts} tensors, got {len(tensors)}")
            first = self._check_hidden(tensors[0])
            for other in tensors[1:num_tensors]:
                if other.shape != first.shape:
                    raise InvalidRequestError(f"gradient shape {list(other.shape)} != input {list(first.shape)}")
                validation.check_hidden(other, self.hidden_size, name="gradients")
            prompts = self._check_prompts(tensors[num_tensors], request) if request.prompts else None
            outputs = await self._deadline(self._run(function, *tensors[:num_tensors], request, prompts))
            return transport.response_messages(outputs, StepResponse())
        except TimeoutError:
            return [transport.error_response(InvalidRequestError("the request was not sent in time"))]
        except PetalsError as error:
            refusal = transport.error_response(error)
        except Exception as exc:
            refusal = transport.error_response(self._compute_failure("forward/backward", exc))
        # refused before its end (too large, a malformed first tensor): the client may still be sending
        await transport.drain(requests, self.limits.step_timeout)
        return [refusal]

    def _forward_unary(self, hidden, request: SpanRequest, prompts) -> list[torch.Tensor]:
        start, end, adapter = request.start_block, request.end_block, request.adapter
        if not request.graph_id:
            return [self._forward(hidden, start, end, prompts=prompts, adapter=adapter)]
        with SavedBytes(exclude=list(self.span.parameters())) as saved:
            inputs, outputs = self._differentiable_forward(hidden, request, prompts)
        self.graphs.keep(request.graph_id, (start, end, adapter), inputs, outputs, saved.nbytes)
        return [outputs.detach()]

    def _differentiable_forward(self, hidden, request: SpanRequest, prompts):
        with torch.enable_grad(), self.adapters.active(request.adapter):
            inputs = [hidden.detach().requires_grad_(True)]
            if prompts is not None:
                inputs.append(prompts.detach().requires_grad_(True))
            deep = inputs[1] if prompts is not None else None
            return inputs, self.span(inputs[0], request.start_block, request.end_block, prompts=deep)

    def _backward(self, hidden, grad_output, request: SpanRequest, prompts) -> list[torch.Tensor]:
        """Gradients for the span's input hidden states and, when sent, for its deep prompts; from the graph the
        forward kept when there is one, else by recomputing the forward."""
        sent = [hidden] if prompts is None else [hidden, prompts]
        key = (request.start_block, request.end_block, request.adapter)
        kept = self.graphs.take(request.graph_id, key, sent)
        if kept is not None:
            inputs, outputs = kept.inputs, kept.outputs
        else:
            inputs, outputs = self._differentiable_forward(hidden, request, prompts)
        with torch.enable_grad(), self.adapters.active(request.adapter):
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=grad_output.to(outputs.dtype))
        return list(grads)

    # --- info -------------------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=msgpack.packb(self.info().to_wire(), use_bin_type=True))
