"""Client-side use of remote blocks: inference sessions (server-side caches) and forward/backward.

``InferenceSession`` opens one streaming RPC per span of its route and pushes each step's hidden states
through the chain; servers keep the attention caches. Every span remembers the inputs it was sent, so when
a server dies, hangs or refuses, the session bans it, routes a replacement for that span only, replays the
span's history to rebuild the cache there, and carries on: callers see the same outputs.
``RemoteBlocks`` runs blocks without caches and is differentiable; its requests fail over the same way.
Deep prompts ([num_blocks, prefix, hidden], see ``SpanRunner.forward``) travel with every request whose
tokens reach into the prefix, each span getting its own blocks' rows; backward returns their gradients.
Knows nothing about tokens or heads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.client import SwarmClient
from petals_cli.errors import (
    CacheExhaustedError,
    InvalidRequestError,
    NoRouteError,
    PetalsError,
    ServerError,
    SessionExpiredError,
    SessionLengthError,
    VerificationError,
)
from petals_cli.lora import ClientLora, SpanLora
from petals_cli.routing import RouteSpan
from petals_cli.step import Step, extend_mask, positions_from_mask
from petals_cli.verify import Comparison, compare
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest, StepResponse

logger = logging.getLogger(__name__)
_NO_LIMIT = 1 << 62  # a check's verdict not cut by any rollback
_TRANSPORT_ERRORS = (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, asyncio.IncompleteReadError)


class _PushInterrupted(Exception):
    """A pushed step failed at stream ``index``, whose input was ``inputs``."""

    def __init__(self, index: int, inputs: torch.Tensor, failure: ServerFailure):
        super().__init__(str(failure))
        self.index, self.inputs, self.failure = index, inputs, failure


class ServerFailure(Exception):
    """A server did not answer properly: the caller routes around it (and bans it, unless it is healthy)."""

    def __init__(self, span: RouteSpan, reason: str, *, ban: bool = True):
        super().__init__(f"server {span.peer_id[-8:]} (blocks {span.start}:{span.end}): {reason}")
        self.span, self.ban = span, ban
        self.at_opening = False  # the server refused to open the session: no session of ours was lost there


async def _guard(client: SwarmClient, span: RouteSpan, awaitable):
    """Await a server's answer; every way it can fail becomes ServerFailure (typed refusals included).

    A killed server's stream may never break (its libp2p daemon outlives it), so while the answer is late the
    client checks that the server still answers an info RPC: a dead or hung server is noticed within about
    ``liveness_interval + liveness_timeout`` seconds, while a busy one may take up to ``request_timeout``.
    """
    config = client.config
    task = asyncio.ensure_future(awaitable)
    deadline = time.monotonic() + config.request_timeout
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=config.liveness_interval)
            if done:
                return task.result()
            if time.monotonic() > deadline:
                raise ServerFailure(span, f"no answer in {config.request_timeout:.0f}s")
            alive = asyncio.ensure_future(client.is_alive(span.peer_id))
            done, _ = await asyncio.wait({task, alive}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:  # the answer came during the check: take it now, not a round trip later
                alive.cancel()
                return task.result()
            if not alive.result():
                raise ServerFailure(span, "stopped answering (liveness check failed)")
    except StopAsyncIteration:
        raise ServerFailure(span, "closed the stream") from None
    except (*_TRANSPORT_ERRORS, ServerError, CacheExhaustedError) as exc:
        raise ServerFailure(span, f"{type(exc).__name__}: {exc}") from exc
    finally:
        task.cancel()


@dataclass
class _SpanStream:
    """One open inference stream to one server, and every input it has been sent."""

    span: RouteSpan
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    responses: AsyncIterator | None = None
    history: list[torch.Tensor] = field(default_factory=list)
    session_id: str = ""  # the server's session (chosen by this client), where the previous server pushes steps
    acknowledged: bool = True  # False until the server's answer to the opening message has been read
    # With verification on: what the server answered to each of ``history``, and the replica that checks it
    outputs: list[torch.Tensor] = field(default_factory=list)
    replica: list[_SpanStream] | None = None  # sessions on other servers holding the same blocks
    replica_tokens: int = 0  # tokens the replica's caches hold
    checked: int = 0  # tokens whose outputs a replica has confirmed (the last verified point)
    confirmed: bool = False  # a check has confirmed this server (its first one is waited for)
    unverifiable: bool = False  # no other server holds these blocks
    pending: asyncio.Task | None = None  # a check not waited for, settled at a later step
    pending_limit: int = _NO_LIMIT  # a check's verdict holds for tokens before this (rollbacks and redos cut it)

    async def requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            message = await self.outbox.get()
            if message is None:
                return
            yield message

    def close(self) -> None:
        self.outbox.put_nowait(None)
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        for replica in self.replica or ():
            replica.close()
        self.replica = None

    def record(self, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        """Keep a step's inputs (for failover) and, when verifying, its outputs (for the next check)."""
        self.history.append(inputs)
        if outputs is not None:
            self.outputs.append(outputs)


class InferenceSession:
    """A stateful generation session over a route; ``step`` is the sync entry point."""

    def __init__(
        self,
        client: SwarmClient,
        prefix: str,
        num_blocks: int,
        *,
        max_length: int,
        batch_size: int = 1,
        prompts: torch.Tensor | None = None,
        lora: ClientLora | None = None,
    ):
        self.client, self.prefix, self.num_blocks = client, prefix, num_blocks
        # client-owned LoRA: its weights as they are now travel with each span's opening message
        self.lora = lora
        self.lora_weights = None if lora is None else [weight.detach().cpu() for weight in lora.weights]
        self.max_length, self.batch_size = max_length, batch_size
        self.prompts = None if prompts is None else prompts.detach().cpu()
        self.position = 0
        self.failovers = 0
        self.relayed_hops = 0  # outputs this client passed from one server to the next itself (push did not)
        # Once a step brings padding, every step sends its mask and positions; kept for replays.
        self._mask: torch.Tensor | None = None  # [batch, position]
        self._positions: torch.Tensor | None = None  # [batch, position]
        self._streams: list[_SpanStream] | None = None
        self._closed = False
        self._rewind = False  # the next step starts before where the servers' caches end (see ``rollback``)
        self._verifying = client.config.verify_rate > 0
        self._full_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # mask, positions including this step
        self.verified_steps = 0  # checks a replica confirmed
        self.verified_tokens = 0  # tokens whose outputs those checks covered (summed over spans)
        self.caught = 0  # servers caught returning wrong outputs and replaced

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def route(self) -> list[RouteSpan]:
        return [stream.span for stream in self._streams or []]

    @property
    def padded(self) -> bool:
        return self._mask is not None

    def step(
        self,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Send new tokens' hidden states [batch, tokens, hidden] through every block; returns the outputs.

        Padded batches pass ``attention_mask`` [batch, tokens] (0 = padding) for the new tokens, and optionally
        their ``position_ids`` (by default each sequence counts only its own tokens).
        """
        if self._closed:
            raise SessionLengthError("this inference session is closed")
        tokens = hidden.shape[1]
        if self.position + tokens > self.max_length:
            raise SessionLengthError(
                f"session max_length is {self.max_length}; this step would reach {self.position + tokens}"
            )
        mask, positions = self._extend_mask(hidden.shape[0], tokens, attention_mask, position_ids)
        extras = {} if mask is None else {"attention_mask": mask[:, -tokens:], "position_ids": positions[:, -tokens:]}
        if self._rewind:
            extras["rewind"] = True
        self._full_mask = None if mask is None else (mask, positions)
        sent = hidden.detach().cpu()
        if self.client.config.wire_dtype != "auto":  # smaller on the wire; servers answer in the dtype they got
            sent = sent.to(getattr(torch, self.client.config.wire_dtype))
        output = self.client.run(self._step(sent, extras))
        self.position += tokens
        self._rewind = False
        self._mask, self._positions = mask, positions
        return output.to(device=hidden.device, dtype=hidden.dtype)  # a client's local modules may live on a GPU

    def rollback(self, position: int) -> None:
        """Forget every token from ``position`` on (drafts that were not accepted): the next step starts there.

        Nothing is sent now: the next step tells each server to drop its cached positions from ``position`` on
        before it appends, and the inputs kept for failover are cut to match.
        """
        if not 0 <= position <= self.position:
            raise SessionLengthError(f"cannot roll back to position {position}: the session holds {self.position}")
        if position == self.position:
            return
        self.position, self._rewind = position, True
        if self._mask is not None:
            self._mask, self._positions = self._mask[:, :position], self._positions[:, :position]
        for stream in self._streams or []:
            stream.history = _first_tokens(stream.history, position)
            stream.outputs = _first_tokens(stream.outputs, position)
            stream.checked = min(stream.checked, position)  # a replica holding more is rewound at the next check
            stream.pending_limit = min(stream.pending_limit, position)

    def _extend_mask(self, batch: int, tokens: int, attention_mask, position_ids):
        """The session's mask and positions after this step; (None, None) while nothing was ever padded."""
        if self._mask is None and (attention_mask is None or bool(attention_mask.all())):
            return None, None
        new = None if attention_mask is None else attention_mask.detach().cpu().long()
        mask = extend_mask(self._mask, self.position, new, batch, tokens)
        if position_ids is None:
            position_ids = positions_from_mask(mask, tokens)
        earlier = self._positions if self._positions is not None else torch.arange(self.position).expand(batch, -1)
        positions = torch.cat([earlier, position_ids[..., -tokens:].detach().cpu().long().expand(batch, -1)], dim=1)
        return mask, positions

    async def _step(self, hidden: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._streams is None:
            self._streams = await self._reopen(RouteSpan("", 0, self.num_blocks), [])
        if self._verifying:
            await self._settle_pending()
        index, failures = 0, 0  # the stream the step is at, and the failures of this step so far
        if self._can_push():
            try:
                return await self._pushed_step(hidden, extras)
            except _PushInterrupted as stop:
                index, hidden, failures = stop.index, stop.inputs, 1
                self._streams[index:] = await self._reopen_rest(index, stop.failure)
        while index < len(self._streams):
            stream = self._streams[index]
            check = self._start_check(stream, hidden, extras)
            try:
                output = await self._exchange(stream, hidden, self.position, extras)
            except ServerFailure as failure:
                await _abandon(check)
                failures += 1
                if failures > self.client.config.max_retries:
                    raise ServerError(f"step failed {failures} times; last: {failure}") from failure
                self._leave(failure, [stream])
                self._streams[index : index + 1] = await self._reopen(stream.span, stream.history)
                continue
            self.client.succeed(stream.span.peer_id)
            stream.record(hidden, output if self._verifying else None)
            self.relayed_hops += index > 0
            if check is not None:
                replaced = await self._settle(stream, check, hidden.shape[1])
                if replaced is not None:  # a replica's output stands in for this server's from now on
                    index, hidden, _ = replaced  # the streams after it have not run this step yet
                    continue
            hidden = output
            index += 1
        return hidden

    def _can_push(self) -> bool:
        """Servers pass the step on themselves when there is a next server to pass it to and the step carries no
        deep prompts (each span has its own)."""
        streams = self._streams
        in_prefix = self.prompts is not None and self.position < self.prompts.shape[1]
        return self.client.config.push and len(streams) > 1 and not in_prefix

    async def _pushed_step(self, hidden: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """Send the step to the first server only, with the sessions that follow: each server computes and
        pushes its output on to the next. Every server still answers its own stream with its output, which
        keeps each span's inputs here for failover; a server that could not push says so, and this hop is
        relayed from here. Raises ``_PushInterrupted`` at the first stream that failed."""
        streams = list(self._streams)
        hops = tuple((stream.span.peer_id, stream.session_id) for stream in streams[1:])
        streams[0].outbox.put_nowait(Step(self.position, hidden, **extras, next_hops=hops).to_message())
        inputs, checks = hidden, []
        for index, stream in enumerate(streams):
            checks.append(self._start_check(stream, inputs, extras))  # as soon as this span's input is known
            try:
                response, output = await self._answer(stream, inputs)
            except ServerFailure as failure:
                for check in checks:
                    await _abandon(check)
                raise _PushInterrupted(index, inputs, failure) from failure
            self.client.succeed(stream.span.peer_id)
            stream.record(inputs, output if self._verifying else None)
            inputs = output
            if index + 1 < len(streams) and not response.pushed:
                self.relayed_hops += 1
                step = Step(self.position, inputs, **extras, next_hops=hops[index + 1 :])
                streams[index + 1].outbox.put_nowait(step.to_message())
        replaced = False
        for stream, check in zip(streams, checks, strict=True):
            if check is None:
                continue
            if replaced:  # checked on inputs that were wrong: the replica is rewound at its next check
                await _abandon(check, stream)
                continue
            outcome = await self._settle(stream, check, hidden.shape[1])
            if outcome is not None:
                _, span_output, final = outcome
                replaced, inputs = True, span_output if final is None else final
        return inputs

    async def _reopen_rest(self, index: int, failure: ServerFailure) -> list[_SpanStream]:
        """After a pushed step failed at stream ``index``: the servers after it may or may not have received
        the step, so every span from there on gets a new session (on any server but the failed one), each
        rebuilt from the inputs this client kept for that span: all at once, since those inputs are known."""
        rest = self._streams[index:]
        self._leave(failure, rest)
        rebuilt = await asyncio.gather(
            *(self._reopen(stream.span, stream.history) for stream in rest), return_exceptions=True
        )
        for outcome in rebuilt:
            if isinstance(outcome, BaseException):
                for streams in rebuilt:
                    for stream in streams if isinstance(streams, list) else ():
                        stream.close()
                raise outcome
        return [stream for streams in rebuilt for stream in streams]

    def _leave(self, failure: ServerFailure, streams: list[_SpanStream]) -> None:
        """Say why, avoid the failed server (unless it is healthy), close ``streams`` and count the failover."""
        logger.warning("%s; %s", failure, "trying another server" if failure.at_opening else "failing over")
        if failure.ban:
            self.client.ban(failure.span.peer_id)
        for stream in streams:
            stream.close()
        self.failovers += not failure.at_opening

    async def _reopen(self, span: RouteSpan, history: list[torch.Tensor]) -> list[_SpanStream]:
        """Streams for blocks [span.start, span.end), their caches rebuilt from ``history``.

        Retries with other servers; gives up with NoRouteError once ``route_wait`` has passed in all.
        """
        deadline = time.monotonic() + self.client.config.route_wait
        for _ in range(self.client.config.max_retries):
            try:
                return await self._open_route(span, history, wait=max(0.0, deadline - time.monotonic()))
            except ServerFailure as failure:
                logger.warning("%s; trying another server", failure)
                self.client.ban(failure.span.peer_id)
        raise ServerError(
            f"no server for blocks {span.start}:{span.end} answered after {self.client.config.max_retries} tries"
        )

    async def _route(self, start: int, end: int, wait: float | None = None, exclude=()) -> list[RouteSpan]:
        needed = self.batch_size * self.max_length
        return await self.client.route(
            self.prefix, self.num_blocks, start, end, cache_tokens_needed=needed, wait=wait, exclude=exclude
        )

    async def _open(self, span: RouteSpan) -> _SpanStream:
        """Open a session on ``span``'s server under an id chosen here, so that steps (and the previous server's
        pushes) can follow at once: the server's acknowledgement, or its refusal, is read before the first answer."""
        stream = _SpanStream(span, session_id=uuid.uuid4().hex, acknowledged=False)
        lora = None if self.lora is None else self.lora.for_span(self.lora_weights, span.start, span.end)
        request = SpanRequest(
            protocol=PROTOCOL_VERSION,
            prefix=self.prefix,
            start_block=span.start,
            end_block=span.end,
            max_length=self.max_length,
            batch_size=self.batch_size,
            adapter=self.client.config.active_adapter,
            session_id=stream.session_id,
            **(
                {}
                if lora is None
                else {"lora_targets": lora.targets, "lora_rank": lora.rank, "lora_scaling": lora.scaling}
            ),
        )
        tensors = [] if lora is None else [transport.serialize(weight) for weight in lora.weights]
        stream.outbox.put_nowait(runtime_pb2.ExpertRequest(metadata=transport.pack(request), tensors=tensors))
        try:
            stream.responses = await _guard(
                self.client, span, self.client.stub(span.peer_id).rpc_inference(stream.requests())
            )
        except BaseException:
            stream.close()
            raise
        return stream

    async def _exchange(
        self, stream: _SpanStream, hidden: torch.Tensor, position: int, extras: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        prompts = None
        if self.prompts is not None and position < self.prompts.shape[1]:  # only steps reaching into the prefix
            prompts = self.prompts[stream.span.start : stream.span.end]
        stream.outbox.put_nowait(Step(position, hidden, **extras, prompts=prompts).to_message())
        return (await self._answer(stream, hidden))[1]

    async def _answer(self, stream: _SpanStream, hidden: torch.Tensor) -> tuple[StepResponse, torch.Tensor]:
        """A server's answer to a step whose input was ``hidden``: its metadata and its output."""
        if not stream.acknowledged:  # the session's opening: accepted, or refused (a ServerFailure like any other)
            try:
                _, acknowledgement = await self._receive(stream)
                if self.lora is not None and not acknowledgement.lora:  # an older server ignored the weights
                    raise ServerFailure(stream.span, "does not apply client-sent LoRA weights (an older petals)")
            except ServerFailure as failure:
                failure.at_opening = True
                raise
            stream.acknowledged = True
        response, meta = await self._receive(stream)
        if len(response.tensors) != 1:
            raise ServerFailure(stream.span, f"sent {len(response.tensors)} tensors")
        try:
            output = transport.deserialize(response.tensors[0])
        except PetalsError as exc:
            raise ServerFailure(stream.span, str(exc)) from None
        if output.shape != hidden.shape:
            raise ServerFailure(stream.span, f"returned shape {list(output.shape)} for {list(hidden.shape)}")
        return meta, output

    async def _receive(self, stream: _SpanStream) -> tuple[runtime_pb2.ExpertResponse, StepResponse]:
        response = await _guard(self.client, stream.span, anext(stream.responses))
        try:
            meta = transport.check_response(response)
        except SessionExpiredError as exc:  # the server reaped an idle session: rebuild it there or elsewhere
            raise ServerFailure(stream.span, str(exc), ban=False) from exc
        except InvalidRequestError as exc:
            if not self._rewind:
                raise
            # a cache that cannot go back (a sliding window that dropped positions): rebuild it from the inputs
            raise ServerFailure(stream.span, f"could not roll back ({exc})", ban=False) from exc
        except (ServerError, CacheExhaustedError) as exc:
            raise ServerFailure(stream.span, f"{type(exc).__name__}: {exc}") from exc
        return response, meta

    async def _open_route(self, failed: RouteSpan, history: list[torch.Tensor], wait: float) -> list[_SpanStream]:
        started = time.perf_counter()
        route = await self._route(failed.start, failed.end, wait=wait)
        inputs = torch.cat(history, dim=1) if history else None
        opened = await asyncio.gather(*(self._open(span) for span in route), return_exceptions=True)  # at once
        streams = [stream for stream in opened if isinstance(stream, _SpanStream)]
        try:
            for outcome in opened:
                if isinstance(outcome, BaseException):
                    raise outcome
            for stream in streams if inputs is not None else ():
                outputs = await self._exchange(stream, inputs, 0, self._range_extras(0, inputs.shape[1]))
                stream.record(inputs, outputs if self._verifying else None)
                inputs = outputs
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        if failed.peer_id:  # the failure's own warning is the user's one line per failover
            logger.debug(
                "replaced blocks %d:%d with %s in %.2fs",
                failed.start,
                failed.end,
                ", ".join(f"{span.peer_id[-8:]}[{span.start}:{span.end}]" for span in route),
                time.perf_counter() - started,
            )
        return streams

    # Verification (``--verify RATE``): a replica re-runs a span's steps and the outputs are compared. A check
    # sends the replica every input the span got since the last check (its cache catches up), so it compares all of
    # those tokens, not just the sampled step; the replica runs beside the server. A server's first step is checked
    # before its output is used. Later ones, sampled with probability RATE (one check at a time per span), are
    # settled at a later step, so the session does not wait for them: a server caught then is replaced from the
    # first token it got wrong, and the steps after that are true again.

    def _start_check(self, stream: _SpanStream, hidden: torch.Tensor, extras: dict) -> asyncio.Task | None:
        """Start a check of this step on ``stream``'s replica; returns it when the step must wait for it (the
        server's first check), else keeps it as ``stream.pending``."""
        if not self._verifying or stream.unverifiable or stream.pending is not None:
            return None
        if stream.confirmed and self.client.verify_rng.random() >= self.client.config.verify_rate:
            return None
        earlier = list(stream.history)  # the step's own input is appended while the check runs
        check = asyncio.ensure_future(self._run_replica(stream, earlier, hidden, extras))
        stream.pending_limit = _NO_LIMIT
        if not stream.confirmed:
            return check
        stream.pending = check
        return None

    def settle_checks(self) -> None:
        """Wait for the checks still running and settle them (a server caught is banned, reported and replaced)."""
        if self._verifying and self._streams is not None and not self._closed:
            self.client.run(self._settle_pending(wait=True))

    async def _settle_pending(self, wait: bool = False) -> None:
        """Settle the checks of earlier steps that have finished (all of them, with ``wait``); a server caught is
        replaced before the next step."""
        for stream in list(self._streams or ()):
            check = stream.pending
            if check is None or not (wait or check.done()) or stream not in self._streams:
                continue
            stream.pending = None
            await self._settle(stream, check)

    async def _run_replica(self, stream: _SpanStream, earlier: list[torch.Tensor], hidden, extras) -> tuple:
        """The replica's outputs for every token from the last verified point to the end of this step:
        (first position, outputs). Opens the replica first when there is none (it then catches up from 0)."""
        if stream.replica is None:
            route = await self._route(stream.span.start, stream.span.end, wait=0.0, exclude={stream.span.peer_id})
            opened = await asyncio.gather(*(self._open(span) for span in route), return_exceptions=True)
            failed = [outcome for outcome in opened if isinstance(outcome, BaseException)]
            if failed:
                for outcome in opened:
                    if isinstance(outcome, _SpanStream):
                        outcome.close()
                raise failed[0]
            stream.replica, stream.replica_tokens, stream.checked = list(opened), 0, 0
        start = stream.checked
        inputs = torch.cat([*_tokens_from(earlier, start), hidden], dim=1)
        end = start + inputs.shape[1]
        # a rollback or a replaced server upstream: the replica drops what it holds beyond ``start``
        outputs = await self._run_chain(stream.replica, inputs, start, rewind=stream.replica_tokens > start)
        stream.replica_tokens = end
        return start, outputs

    async def _settle(self, stream: _SpanStream, check: asyncio.Task, tokens: int = 0) -> tuple | None:
        """Wait for a check of ``stream``. None when the server's outputs stand (confirmed, or no replica could
        check them); when the server was caught and replaced: (index of the stream after the replacement, the
        replacement's output for the current step's ``tokens``, the last stream's output for them when the streams
        after it had already run this step, else None)."""
        if check.cancelled():
            return None
        try:
            start, expected = await check
        except NoRouteError:
            stream.unverifiable = True
            logger.warning(
                "blocks %d:%d: no other server holds them, so their outputs are not verified",
                stream.span.start,
                stream.span.end,
            )
            return None
        except (ServerFailure, PetalsError) as failure:  # the replica failed, not the server it checks
            logger.warning("%s (a replica checking another server); checking with another one later", failure)
            if isinstance(failure, ServerFailure):
                self.client.ban(failure.span.peer_id)
            for replica in stream.replica or ():
                replica.close()
            stream.replica = None
            return None
        end = start + expected.shape[1]
        if stream.pending_limit < end:  # rolled back or redone meanwhile: its inputs are not this span's now
            return None
        answered = torch.cat(_tokens_from(stream.outputs, start), dim=1)[:, : end - start]
        comparison = compare(answered, expected)
        if comparison.agree:
            self.verified_tokens += end - stream.checked
            self.client.verification.checks += 1
            self.client.verification.outputs += end - stream.checked
            stream.checked, stream.confirmed = end, True
            self.verified_steps += 1
            return None
        return await self._arbitrate(stream, start, answered, expected, comparison, tokens)

    async def _arbitrate(self, stream: _SpanStream, start: int, answered, expected, comparison: Comparison, tokens):
        """A server and its replica disagree from ``start + comparison.first_bad`` on: a third replica, run over the
        span's history, decides; whoever it outvotes is banned for the rest of the run and reported."""
        span, replica = stream.span, stream.replica or []
        suspects = {span.peer_id, *(member.span.peer_id for member in replica)}
        end = start + answered.shape[1]
        first_bad = start + comparison.first_bad
        names = f"{span.peer_id} and {', '.join(member.span.peer_id for member in replica)}"
        try:
            route = await self._route(span.start, span.end, wait=0.0, exclude=suspects)
        except NoRouteError:
            raise VerificationError(
                f"blocks {span.start}:{span.end}: servers {names} disagree from position {first_bad} "
                f"(relative error {comparison.max_error:.3g} > {comparison.tolerance:g}) and no third server holds "
                "these blocks to decide which is wrong"
            ) from None
        judge = await asyncio.gather(*(self._open(member) for member in route))
        history = torch.cat(stream.history, dim=1)
        try:
            verdict = await self._run_chain(judge, history[:, :end], 0)
        except ServerFailure as failure:
            for member in judge:
                member.close()
            raise VerificationError(
                f"blocks {span.start}:{span.end}: servers {names} disagree and the third server failed ({failure})"
            ) from failure
        verdict = verdict[:, start:]
        server_right, replica_right = compare(answered, verdict).agree, compare(expected, verdict).agree
        if server_right == replica_right:
            for member in judge:
                member.close()
            raise VerificationError(
                f"blocks {span.start}:{span.end}: servers {names} and {', '.join(m.span.peer_id for m in judge)} "
                "compute three different outputs"
            )
        witnesses = [member.span.peer_id for member in judge]
        if server_right:  # the replica lied: it goes, the server stays, checked by the judge from now on
            for member in replica:
                self._caught(member.span, "inference", first_bad, history[:, :end], expected, answered, witnesses)
                member.close()
            stream.replica, stream.replica_tokens = judge, end
            stream.checked, stream.confirmed = end, True
            return None
        self._caught(span, "inference", first_bad, history[:, :end], answered, expected, witnesses)
        for member in judge:
            member.close()
        index = self._streams.index(stream)
        stream.replica = None
        stream.close()
        honest = expected[:, first_bad - start :]
        if history.shape[1] > end:  # steps after the check: the replica catches up before it takes over
            later = await self._run_chain(replica, history[:, end:], end)
            honest = torch.cat([honest, later], dim=1)
        for member in replica:
            member.checked, member.confirmed = end, True  # confirmed by the judge
        self._streams[index : index + 1] = replica
        redone = await self._redo_after(index + len(replica), honest, first_bad)
        if not tokens:
            return None
        final = None if redone is None or redone.shape[1] < tokens else redone[:, -tokens:]
        return index + len(replica), honest[:, -tokens:], final

    async def _run_chain(
        self, streams: list[_SpanStream], inputs: torch.Tensor, position: int, *, rewind: bool = False
    ) -> torch.Tensor:
        """Send tokens from ``position`` on through ``streams`` in turn (each keeps them in place of anything it
        held from there; ``rewind``: its server drops those too); the last one's outputs."""
        extras = self._range_extras(position, position + inputs.shape[1])
        if rewind:
            extras["rewind"] = True
        for stream in streams:
            outputs = await self._exchange(stream, inputs, position, extras)
            stream.history = _first_tokens(stream.history, position)
            stream.outputs = _first_tokens(stream.outputs, position)
            stream.record(inputs, outputs)
            inputs = outputs
        return inputs

    async def _redo_after(self, index: int, honest: torch.Tensor, position: int) -> torch.Tensor | None:
        """The streams from ``index`` on were sent wrong inputs from ``position`` on: each drops its cache from
        there and gets the right ones (``honest``: the previous span's true outputs from ``position`` on). Returns
        the last redone stream's outputs from ``position`` on, None when no stream had got that far."""
        inputs, redone = honest, None
        for stream in self._streams[index:]:
            held = sum(step.shape[1] for step in stream.history)
            if held <= position:
                break
            sent = inputs[:, : held - position]
            extras = {**self._range_extras(position, held), "rewind": True}
            outputs = await self._exchange(stream, sent, position, extras)
            stream.history = [*_first_tokens(stream.history, position), sent]
            if self._verifying:
                stream.outputs = [*_first_tokens(stream.outputs, position), outputs]
            stream.checked = min(stream.checked, position)
            stream.pending_limit = min(stream.pending_limit, position)
            inputs = redone = outputs
        return redone

    def _caught(self, span: RouteSpan, kind: str, position: int, inputs, wrong, right, witnesses) -> None:
        """Ban a server caught computing wrongly for the rest of the run, say so, and keep signed evidence."""
        self.client.ban_forever(span.peer_id)
        self.caught += 1
        logger.warning(
            "server %s (blocks %d:%d) returned wrong outputs from position %d (outvoted by %s); banned for this run",
            span.peer_id[-8:],
            span.start,
            span.end,
            position,
            ", ".join(peer[-8:] for peer in witnesses),
        )
        self.client.report(self.prefix, kind, span, position, inputs, wrong, right, witnesses)

    def _range_extras(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """Mask and positions of tokens [start, end) (this step's included), for sending them again."""
        if self._full_mask is None:
            return {}
        mask, positions = self._full_mask
        return {"attention_mask": mask[:, start:end], "position_ids": positions[:, start:end]}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._streams is not None and not self.client.loop.is_closed():
            for stream in self._streams:
                self.client.loop.call_soon_threadsafe(stream.close)


async def _abandon(check: asyncio.Task | None, stream: _SpanStream | None = None) -> None:
    """Stop waiting for a check whose verdict no longer matters. With ``stream`` (whose replica it feeds), let it
    finish so the replica's caches stay in step (rewound at the next check), or drop that replica if it failed."""
    if check is None:
        return
    if stream is None:
        check.cancel()
    (outcome,) = await asyncio.gather(check, return_exceptions=True)
    if stream is not None and isinstance(outcome, BaseException):
        for replica in stream.replica or ():
            replica.close()
        stream.replica = None


def _tokens_from(history: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The steps of ``history`` from token ``tokens`` on (the first one cut to start there)."""
    kept, total = [], 0
    for inputs in history:
        if total + inputs.shape[1] > tokens:
            kept.append(inputs[:, max(0, tokens - total) :])
        total += inputs.shape[1]
    return kept


def _first_tokens(history: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
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


async def _call_unary(
    client: SwarmClient,
    prefix: str,
    span: RouteSpan,
    method: str,
    tensors,
    prompts: torch.Tensor | None = None,
    graph_id: str = "",
    lora: SpanLora | None = None,
) -> list[torch.Tensor]:
    """One forward or backward request; the answer's tensors have the shapes of ``tensors[0]`` (and, for a
    backward, of ``prompts`` and of the ``lora`` weights, whose gradients follow)."""
    request = SpanRequest(
        protocol=PROTOCOL_VERSION,
        prefix=prefix,
        start_block=span.start,
        end_block=span.end,
        prompts=prompts is not None,
        adapter=client.config.active_adapter,
        graph_id=graph_id,
        **(
            {}
            if lora is None
            else {"lora_targets": lora.targets, "lora_rank": lora.rank, "lora_scaling": lora.scaling}
        ),
    )
    if prompts is not None:
        prompts = prompts[span.start : span.end]
        tensors = [*tensors, prompts]
    if lora is not None:
        tensors = [*tensors, *lora.weights]
    messages = transport.request_messages(tensors, transport.pack(request))

    async def requests():
        for message in messages:
            yield message

    async def call():
        responses = await getattr(client.stub(span.peer_id), method)(requests())
        try:
            return await transport.collect_tensors(responses)
        except InvalidRequestError as exc:  # a cut or garbled answer: this server's fault, not our request's
            raise ServerFailure(span, f"sent a malformed answer ({exc})") from exc

    outputs, metadata = await _guard(client, span, call())
    try:
        transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
    except (ServerError, CacheExhaustedError) as exc:
        raise ServerFailure(span, f"{type(exc).__name__}: {exc}") from exc
    expected = [tensors[0].shape]
    if method == "rpc_backward":
        expected += [prompts.shape] if prompts is not None else []
        expected += [weight.shape for weight in lora.weights] if lora is not None else []
    if [output.shape for output in outputs] != expected:
        raise ServerFailure(span, "sent a malformed answer")
    return outputs


@dataclass(frozen=True)
class _Hop:
    """One span of a differentiable forward: who ran it, on what, and the graph it may have kept for backward."""

    span: RouteSpan
    hidden: torch.Tensor
    graph_id: str = ""


class _RemoteChain:
    """Forward and backward through a route, replacing failed spans as it goes.

    With ``keep_graphs``, each forward asks its server to keep the autograd graph for the backward that
    follows (saving a recomputation there); a backward that fails over to another server recomputes."""

    def __init__(
        self,
        client: SwarmClient,
        prefix: str,
        num_blocks: int,
        *,
        keep_graphs: bool = False,
        lora: ClientLora | None = None,
        lora_weights: list[torch.Tensor] | None = None,
    ):
        self.client, self.prefix, self.num_blocks = client, prefix, num_blocks
        self.keep_graphs = keep_graphs
        # client-owned LoRA: its structure, the weights sent (in wire order) and their gradients, summed here
        self.lora, self.lora_weights = lora, lora_weights
        self.grad_lora = None if lora_weights is None else [torch.zeros_like(weight) for weight in lora_weights]

    def _lora(self, start: int, end: int) -> SpanLora | None:
        return None if self.lora is None else self.lora.for_span(self.lora_weights, start, end)

    def _add_lora_grads(self, start: int, end: int, grads: list[torch.Tensor]) -> None:
        if self.grad_lora is not None:
            indices = range(len(self.grad_lora))[self.lora.span_slice(start, end)]
            for index, grad in zip(indices, grads, strict=True):
                self.grad_lora[index] += grad

    async def route(self, start: int, end: int) -> list[RouteSpan]:
        return await self.client.route(self.prefix, self.num_blocks, start, end, inference=False)

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int, prompts: torch.Tensor | None = None
    ) -> tuple[list[_Hop], torch.Tensor]:
        """Outputs of blocks [start, end), and the hops that computed them (for backward).

        ``prompts`` holds the deep prompts of all blocks (indexed by absolute block) or is None."""
        hops = []
        for _ in range(self.client.config.max_retries + 1):
            route = await self.route(start, end)
            try:
                for span in route:
                    graph_id = uuid.uuid4().hex if self.keep_graphs else ""
                    (output,) = await self._call(span, "rpc_forward", [hidden], prompts, graph_id)
                    self.client.succeed(span.peer_id)
                    hops.append(_Hop(span, hidden, graph_id))
                    hidden, start = output, span.end
                return hops, hidden
            except ServerFailure as failure:
                logger.warning("%s; failing over", failure)
                self.client.ban(failure.span.peer_id)
        raise ServerError(f"forward of blocks {start}:{end} failed {self.client.config.max_retries + 1} times")

    async def backward(
        self,
        hops: list[_Hop],
        grad: torch.Tensor,
        prompts: torch.Tensor | None = None,
        grad_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The gradient for the first hop's input; with ``prompts``, accumulates theirs into ``grad_prompts``."""
        for hop in reversed(hops):
            grad = await self._backward_span(hop, grad, prompts, grad_prompts)
        return grad

    async def _backward_span(self, hop: _Hop, grad, prompts, grad_prompts) -> torch.Tensor:
        span, hidden, graph_id = hop.span, hop.hidden, hop.graph_id
        for _ in range(self.client.config.max_retries + 1):
            try:
                grads = await self._call(span, "rpc_backward", [hidden, grad], prompts, graph_id)
                self.client.succeed(span.peer_id)
                if prompts is not None:
                    grad_prompts[span.start : span.end] += grads[1]
                self._add_lora_grads(span.start, span.end, grads[1 + (prompts is not None) :])
                return grads[0]
            except ServerFailure as failure:
                logger.warning("%s; failing over", failure)
                self.client.ban(failure.span.peer_id)
            route = await self.route(span.start, span.end)
            if len(route) > 1:  # the replacement splits the span: recompute its inner inputs first
                hops, _ = await self.forward(hidden, span.start, span.end, prompts)
                return await self.backward(hops, grad, prompts, grad_prompts)
            span, graph_id = route[0], ""  # a graph kept by the failed server is of no use elsewhere
        raise ServerError(
            f"backward of blocks {span.start}:{span.end} failed {self.client.config.max_retries + 1} times"
        )

    # Verification of forward and backward requests: a server's first request and then a share ``verify_rate`` of
    # them are also sent to a replica of the same blocks, at once; a disagreement is settled by a third replica.

    async def _call(self, span: RouteSpan, method: str, tensors, prompts, graph_id: str = "") -> list[torch.Tensor]:
        """``_call_unary``, checked against a replica when chosen for a check. A server caught computing wrongly is
        banned for the run and reported, and the request fails over like any failure (ServerFailure)."""
        config = self.client.config
        chosen = config.verify_rate > 0 and (
            span.peer_id not in self.client.verified_peers or self.client.verify_rng.random() < config.verify_rate
        )
        check = None
        if chosen:  # the replica runs beside the server
            check = asyncio.ensure_future(self._replica_call(span, method, tensors, prompts, {span.peer_id}))
        try:
            lora = self._lora(span.start, span.end)
            outputs = await _call_unary(self.client, self.prefix, span, method, tensors, prompts, graph_id, lora)
        except BaseException:
            await _abandon(check)
            raise
        if check is None:
            return outputs
        try:
            route, expected = await check
        except NoRouteError:
            logger.warning("blocks %d:%d: no other server holds them, so they are not verified", span.start, span.end)
            return outputs
        except ServerFailure as failure:
            logger.warning("%s (a replica checking another server)", failure)
            self.client.ban(failure.span.peer_id)
            return outputs
        if all(compare(got, want).agree for got, want in zip(outputs, expected, strict=True)):
            self.client.verified_peers.add(span.peer_id)
            self.client.verification.checks += 1
            self.client.verification.outputs += tensors[0].shape[:-1].numel()
            return outputs
        return await self._arbitrate(span, method, tensors, prompts, outputs, route, expected)

    async def _arbitrate(self, span: RouteSpan, method: str, tensors, prompts, outputs, route, expected):
        suspects = {span.peer_id, *(member.peer_id for member in route)}
        names = f"{span.peer_id} and {', '.join(member.peer_id for member in route)}"
        try:
            judges, verdict = await self._replica_call(span, method, tensors, prompts, suspects)
        except NoRouteError:
            raise VerificationError(
                f"blocks {span.start}:{span.end}: servers {names} disagree on a {method[4:]} request and no third "
                "server holds these blocks to decide which is wrong"
            ) from None
        except ServerFailure as failure:
            raise VerificationError(
                f"blocks {span.start}:{span.end}: servers {names} disagree and the third server failed ({failure})"
            ) from failure
        server_right = all(compare(got, want).agree for got, want in zip(outputs, verdict, strict=True))
        replica_right = all(compare(got, want).agree for got, want in zip(expected, verdict, strict=True))
        if server_right == replica_right:
            raise VerificationError(
                f"blocks {span.start}:{span.end}: servers {names} and {', '.join(m.peer_id for m in judges)} "
                f"compute three different {method[4:]} outputs"
            )
        witnesses = [member.peer_id for member in judges]
        wrong, right = (expected, outputs) if server_right else (outputs, expected)
        for caught in route if server_right else [span]:
            self.client.ban_forever(caught.peer_id)
            logger.warning(
                "server %s (blocks %d:%d) returned a wrong %s answer (outvoted by %s); banned for this run",
                caught.peer_id[-8:],
                caught.start,
                caught.end,
                method[4:],
                ", ".join(peer[-8:] for peer in witnesses),
            )
            self.client.report(self.prefix, method[4:], caught, 0, tensors[0], wrong[0], right[0], witnesses)
        if server_right:
            self.client.verified_peers.add(span.peer_id)
            return outputs
        raise ServerFailure(span, "outvoted by other servers holding its blocks", ban=False)

    async def _replica_call(self, span: RouteSpan, method: str, tensors, prompts, exclude) -> tuple:
        """The same request run by other servers holding blocks [span.start, span.end): (their route, outputs)."""
        route = await self.client.route(
            self.prefix, self.num_blocks, span.start, span.end, inference=False, wait=0.0, exclude=exclude
        )
        hidden, inputs = tensors[0], []
        for member in route if method == "rpc_forward" else route[:-1]:  # a backward needs each hop's input
            inputs.append(hidden)
            lora = self._lora(member.start, member.end)
            (hidden,) = await _call_unary(
                self.client, self.prefix, member, "rpc_forward", [hidden], prompts, lora=lora
            )
        if method == "rpc_forward":
            return route, [hidden]
        inputs.append(hidden)
        grad = tensors[1]
        grad_prompts = None if prompts is None else torch.zeros_like(prompts[span.start : span.end])
        grad_lora: dict[int, list[torch.Tensor]] = {}
        for member, member_input in zip(reversed(route), reversed(inputs), strict=True):
            lora = self._lora(member.start, member.end)
            grads = await _call_unary(
                self.client, self.prefix, member, "rpc_backward", [member_input, grad], prompts, lora=lora
            )
            grad = grads[0]
            if grad_prompts is not None:
                grad_prompts[member.start - span.start : member.end - span.start] += grads[1]
            grad_lora[member.start] = grads[1 + (prompts is not None) :]
        lora_grads = [tensor for start in sorted(grad_lora) for tensor in grad_lora[start]]
        return route, [grad, *([] if grad_prompts is None else [grad_prompts]), *lora_grads]


class RemoteBlocks(torch.autograd.Function):
    """Differentiable run of all remote blocks: forward RPCs, then backward RPCs in reverse.

    ``prompts`` ([num_blocks, prefix, hidden] deep prompts, or None) get gradients too, and so do the weights of a
    client-owned ``lora`` (``ClientLora``; its parameters follow as the last arguments, in wire order)."""

    @staticmethod
    def forward(ctx, hidden, prompts, client: SwarmClient, prefix: str, num_blocks: int, lora=None, *weights):
        # Servers keep their graphs only when a backward will follow (inside apply, grad mode is always off).
        will_differentiate = any(ctx.needs_input_grad[:2]) or any(ctx.needs_input_grad[6:])
        sent_weights = [weight.detach().cpu() for weight in weights] if lora is not None else None
        chain = _RemoteChain(
            client, prefix, num_blocks, keep_graphs=will_differentiate, lora=lora, lora_weights=sent_weights
        )
        sent_prompts = None if prompts is None else prompts.detach().cpu()
        hops, output = client.run(chain.forward(hidden.detach().cpu(), 0, num_blocks, sent_prompts))
        ctx.chain, ctx.hops, ctx.prompts = chain, hops, sent_prompts
        ctx.prompts_to = None if prompts is None else {"dtype": prompts.dtype, "device": prompts.device}
        ctx.weights_to = [{"dtype": weight.dtype, "device": weight.device} for weight in weights]
        return output.to(hidden)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_prompts = None if ctx.prompts is None else torch.zeros_like(ctx.prompts)
        grad = ctx.chain.client.run(
            ctx.chain.backward(ctx.hops, grad_output.detach().cpu(), ctx.prompts, grad_prompts)
        )
        if grad_prompts is not None:
            grad_prompts = grad_prompts.to(**ctx.prompts_to)
        grad_weights = [
            lora_grad.to(**where) for lora_grad, where in zip(ctx.chain.grad_lora or [], ctx.weights_to, strict=True)
        ]
        return grad.to(grad_output), grad_prompts, None, None, None, None, *grad_weights
