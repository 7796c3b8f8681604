"""Inference sessions: servers keep the attention caches, the client sends each step's hidden states.

``InferenceSession`` opens one stream per span of its route (``streams``) and sends each step through the chain,
pushed server to server when it can (``push``). Every span keeps the inputs it was sent, so when a server dies,
hangs or refuses, the session routes a replacement for that span only and replays the span's history there
(``replay``); callers see the same outputs. Every ``MOVE_CHECK_STEPS`` steps, under load-aware routing, a span whose
server is expected to be over ``moves.MOVE_FACTOR`` times slower than another route moves there at the token
boundary, its cache rebuilt the same way (``moves``). With ``--verify``, replicas check the servers (``checks``).

This is the one place that changes a session's route: the other modules return what happened (``Replayed``,
``Pushed``/``Interrupted``, a ``Verdict``) and the session applies it. It owns the public API, the padding mask,
the rollback point and the step loop. Knows nothing about tokens or heads.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from petals_cli.client import push
from petals_cli.client.checks import inference_checks
from petals_cli.client.replay import Replay, Replayed
from petals_cli.client.streams import Opener, Padding, ServerFailure, SpanStream, tokens_from
from petals_cli.client.swarm import SwarmClient
from petals_cli.client.verdicts import ServerCaught, Verdict
from petals_cli.errors import NoRouteError, ServerError, SessionLengthError
from petals_cli.lora import ClientLora
from petals_cli.routing import RouteSpan
from petals_cli.step import Step, extend_mask, positions_from_mask

logger = logging.getLogger(__name__)
MOVE_CHECK_STEPS = 8  # steps between two checks whether a span's server got slow enough to leave


@dataclasses.dataclass(frozen=True)
class _Resume:
    """Where a step goes on after a caught server was replaced: the stream to run next and its input (the
    replacement's outputs for the step's tokens), and the last redone stream's outputs from ``position`` on, the
    first wrong token (None when no stream after the replacement had got that far)."""

    index: int
    hidden: torch.Tensor
    position: int
    redone: torch.Tensor | None

    def route_output(self, pushed: torch.Tensor, step_position: int) -> torch.Tensor:
        """The route's output for a step (starting at ``step_position``) that every stream had already run, whose
        output was ``pushed``: it stands before the first wrong token, the redone outputs from there on."""
        if self.redone is None:  # the replacement is the route's last span
            return self.hidden
        tokens = pushed.shape[1]
        right = pushed[:, : max(0, self.position - step_position)]
        return torch.cat([right, self.redone], dim=1)[:, -tokens:]


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
        self.relayed_hops = 0  # outputs this client passed from one server to the next itself (push did not)
        # Once a step brings padding, every step sends its mask and positions; kept for replays.
        self._mask: torch.Tensor | None = None  # [batch, position]
        self._positions: torch.Tensor | None = None  # [batch, position]
        self._padding = Padding()  # mask and positions including the step being run
        self._streams: list[SpanStream] | None = None
        self._closed = False
        self._rewind = False  # the next step starts before where the servers' caches end (see ``rollback``)
        self._steps_to_move_check = MOVE_CHECK_STEPS
        self.opener = Opener(client, prefix, num_blocks, max_length, batch_size, self.prompts, lora, self.lora_weights)
        self._replay = Replay(self.opener)
        self._checks = inference_checks(self.opener)

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

    @property
    def failovers(self) -> int:
        """Open sessions on servers that failed and were rebuilt elsewhere."""
        return self._replay.failovers

    @property
    def moves(self) -> int:
        """Spans moved off a server that had got slow, at a token boundary (not failures)."""
        return self._replay.moves

    @property
    def verified_steps(self) -> int:
        """Checks a replica confirmed."""
        return self._checks.verified_steps

    @property
    def verified_tokens(self) -> int:
        """Tokens whose outputs those checks covered (summed over spans)."""
        return self._checks.verified_tokens

    @property
    def caught(self) -> int:
        """Servers caught returning wrong outputs and replaced."""
        return self._checks.caught

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
        self._padding = Padding(mask, positions)
        sent = hidden.detach().cpu()
        if self.client.config.wire_dtype != "auto":  # smaller on the wire; servers answer in the dtype they got
            sent = sent.to(getattr(torch, self.client.config.wire_dtype))
        output = self.client.run(self._step(self._padding.step(self.position, sent, rewind=self._rewind)))
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
            stream.cut(position)
            self._checks.cut(stream, position)

    def settle_checks(self) -> None:
        """Wait for the checks still running and settle them (a server caught is banned, reported and replaced)."""
        if self._checks.active and self._streams is not None and not self._closed:
            self.client.run(self._settle_finished(wait=True))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._streams is not None and not self.client.loop.is_closed():
            for stream in self._streams:
                self.client.loop.call_soon_threadsafe(stream.close)

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

    # --- the step loop: the only code that changes the route ------------------------------------------------

    async def _step(self, step: Step) -> torch.Tensor:
        if self._streams is None:
            opened = await self._replay.reopen(RouteSpan("", 0, self.num_blocks), [], self._padding)
            self._streams = self._adopt(opened)
        await self._settle_finished()
        await self._move_off_slow_servers()
        index, hidden, failures = 0, step.hidden, 0  # the stream the step is at, its input, the failures so far
        prefix_length = 0 if self.prompts is None else self.prompts.shape[1]
        if push.possible(self.client.config.push, self._streams, self.position, prefix_length):
            try:
                return await self._pushed_step(step)
            except push.Interrupted as stop:
                index, hidden, failures = stop.index, stop.inputs, 1
                rest = await self._replay.reopen_rest(self._streams[index:], stop.failure, self._padding)
                self._streams[index:] = self._adopt(rest)
        while index < len(self._streams):
            stream = self._streams[index]
            check = self._checks.start(stream, hidden, self._padding)
            try:
                output = await stream.exchange(dataclasses.replace(step, hidden=hidden))
            except ServerFailure as failure:
                await self._checks.abandon(check)
                failures += 1
                if failures > self.client.config.max_retries:
                    raise ServerError(f"step failed {failures} times; last: {failure}") from failure
                self._replay.leave(failure, [stream])
                replaced = await self._replay.reopen(stream.span, stream.history, self._padding)
                self._streams[index : index + 1] = self._adopt(replaced)
                continue
            self.client.succeed(stream.span.peer_id)
            stream.history.append(hidden)
            self._checks.record(stream, output)
            self.relayed_hops += index > 0
            if check is not None:
                resume = await self._settle(stream, check, step.tokens)
                if resume is not None:  # a replica's output stands in for this server's from now on
                    index, hidden = resume.index, resume.hidden  # the streams after it have not run this step yet
                    continue
            hidden = output
            index += 1
        return hidden

    async def _move_off_slow_servers(self) -> None:
        """At a token boundary, every ``MOVE_CHECK_STEPS`` steps: move each span whose server is now expected to be
        much slower than another route (``SwarmClient.faster_elsewhere``) there, its cache rebuilt from the inputs it
        was sent. Not under the idle rule, not while a rollback is pending, and not with verification on (its checks
        hold on to the streams they check)."""
        self._steps_to_move_check -= 1
        if self._steps_to_move_check > 0 or self.client.config.routing != "load":
            return
        self._steps_to_move_check = MOVE_CHECK_STEPS
        if self._rewind or self._checks.active or not self.position:
            return
        needed = self.batch_size * self.max_length  # cache tokens, as Opener.route asks
        for stream in list(self._streams):
            found = await self.client.faster_elsewhere(
                self.prefix, self.num_blocks, stream.span, cache_tokens_needed=needed
            )
            if found is None:
                continue
            logger.info(
                "blocks %d:%d: server %s got slow (next step expected in %.0f ms, %.0f ms elsewhere); moving at "
                "token %d",
                stream.span.start,
                stream.span.end,
                stream.span.peer_id[-8:],
                1000 * found[0],
                1000 * found[1],
                self.position,
            )
            try:
                moved = await self._replay.move(stream, self._padding)
            except (ServerError, NoRouteError, ServerFailure) as exc:
                logger.info("staying: could not move (%s)", exc)
                continue
            index = self._streams.index(stream)
            self._streams[index : index + 1] = self._adopt(moved)

    async def _pushed_step(self, step: Step) -> torch.Tensor:
        """``push.pushed_step``, with each span's check started as soon as its input is known and settled after."""
        streams, checks = list(self._streams), []
        try:
            pushed = await push.pushed_step(
                streams, step, lambda stream, inputs: checks.append(self._checks.start(stream, inputs, self._padding))
            )
        except push.Interrupted as stop:
            self._record(streams, stop.outputs, stop.relayed)
            for check in checks:
                await self._checks.abandon(check)
            raise
        self._record(streams, pushed.outputs, pushed.relayed)
        output, replaced = pushed.outputs[-1], False
        for stream, check in zip(streams, checks, strict=True):
            if check is None:
                continue
            if replaced:  # checked on inputs that were wrong: the replica is rewound at its next check
                await self._checks.abandon(check, stream)
                continue
            resume = await self._settle(stream, check, step.tokens)
            if resume is not None:
                replaced, output = True, resume.route_output(output, step.position)
        return output

    def _record(self, streams: list[SpanStream], outputs: list[torch.Tensor], relayed: int) -> None:
        for stream, output in zip(streams, outputs, strict=False):
            self._checks.record(stream, output)
        self.relayed_hops += relayed

    async def _settle_finished(self, wait: bool = False) -> None:
        """Settle the checks of earlier steps that have finished (all of them, with ``wait``); a server caught is
        replaced before the next step."""
        for stream in list(self._streams or ()):
            check = self._checks.take_finished(stream, wait) if stream in self._streams else None
            if check is not None:
                await self._settle(stream, check, 0)

    async def _settle(self, stream: SpanStream, check, tokens: int) -> _Resume | None:
        return await self._apply(stream, await self._checks.settle(stream, check, self._padding), tokens)

    async def _apply(self, stream: SpanStream, verdict: Verdict, tokens: int) -> _Resume | None:
        """Apply a check's verdict on ``stream``. Only a caught server changes anything: its replacement catches up
        on the inputs sent since the check, takes its place, and every later span is redone from the first wrong
        token. With the current step's ``tokens``: where the step goes on from."""
        if not isinstance(verdict, ServerCaught):
            return None
        index = self._streams.index(stream)
        stream.close()
        honest, later = verdict.honest, tokens_from(stream.history, verdict.end)
        if later:  # steps after the check: the replacement catches up before it takes over
            later = torch.cat(later, dim=1)
            caught_up = await self._replay.catch_up(verdict.replacement, later, verdict.end, self._padding)
            self._adopt(caught_up)
            honest = torch.cat([honest, caught_up[-1].outputs], dim=1)  # from ``verdict.start`` to the end
        self._streams[index : index + 1] = verdict.replacement
        after = index + len(verdict.replacement)
        wrong_from = honest[:, verdict.position - verdict.start :]
        redone = await self._replay.redo_after(self._streams[after:], wrong_from, verdict.position, self._padding)
        self._adopt(redone)
        if not tokens:
            return None
        # ``honest`` starts at or before the step: a check covers every token since the last one it confirmed
        return _Resume(after, honest[:, -tokens:], verdict.position, redone[-1].outputs if redone else None)

    def _adopt(self, replayed: list[Replayed]) -> list[SpanStream]:
        """Keep what replayed streams answered (for their checks); the streams."""
        for part in replayed:
            self._checks.replayed(part.stream, part.position, part.outputs)
        return [part.stream for part in replayed]
