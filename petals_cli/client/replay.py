"""Every way a session rebuilds servers' caches from the inputs it kept for them, and the count of failovers.

A failed server is left (``leave``: say why, ban it unless it is healthy, close its streams); a span is reopened
on other servers and its kept inputs replayed there (``reopen``; after a pushed step failed, every span from the
failure on at once: ``reopen_rest``); a server that takes over a span mid-session catches up on the inputs it has
not seen (``catch_up``); and the spans after a span whose outputs were wrong from some position on drop their
caches from there and get the true inputs (``redo_after``); a session leaving a slow server at a token boundary
rebuilds its span elsewhere the same way (``move``). Each returns what was replayed (``Replayed``: the stream, from
which position, and what it answered) for the session to apply; nothing here changes a route.

Built on ``streams`` only: routing and opening go through the session's ``Opener``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from petals_cli.client.streams import Opener, Padding, ServerFailure, SpanStream, close_all, run_chain
from petals_cli.errors import ServerError
from petals_cli.routing import RouteSpan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replayed:
    """``stream`` was sent inputs again from ``position`` on and answered ``outputs`` for them."""

    stream: SpanStream
    position: int
    outputs: torch.Tensor | None  # None when there was nothing to replay (a span opened before its first step)


class Replay:
    """Rebuilds the caches of one session's servers; ``failovers`` counts the open sessions it had to move off
    failed servers, ``moves`` those it moved off slow ones."""

    def __init__(self, opener: Opener):
        self.opener = opener
        self.failovers = 0
        self.moves = 0

    def leave(self, failure: ServerFailure, streams: list[SpanStream]) -> None:
        """Say why, avoid the failed server (unless it is healthy), close ``streams`` and count the failover."""
        logger.warning("%s; %s", failure, "trying another server" if failure.at_opening else "failing over")
        if failure.ban:
            self.opener.conn.ban(failure.span.peer_id)
        close_all(streams)
        self.failovers += not failure.at_opening

    async def reopen(
        self,
        span: RouteSpan,
        history: list[torch.Tensor],
        padding: Padding,
        *,
        exclude: tuple[str, ...] = (),
        wait: float | None = None,
    ) -> list[Replayed]:
        """Streams for blocks [span.start, span.end) on servers other than ``exclude``, their caches rebuilt from
        ``history``.

        Retries with other servers; gives up with NoRouteError once ``wait`` (default ``route_wait``) has passed.
        """
        config = self.opener.conn.config
        deadline = time.monotonic() + (config.route_wait if wait is None else wait)
        for _ in range(config.max_retries):
            try:
                left = max(0.0, deadline - time.monotonic())
                return await self._open_route(span, history, padding, wait=left, exclude=exclude)
            except ServerFailure as failure:
                logger.warning("%s; trying another server", failure)
                self.opener.conn.ban(failure.span.peer_id)
        raise ServerError(f"no server for blocks {span.start}:{span.end} answered after {config.max_retries} tries")

    async def reopen_rest(self, rest: list[SpanStream], failure: ServerFailure, padding: Padding) -> list[Replayed]:
        """After a pushed step failed at the first of ``rest``: the servers after it may or may not have received
        the step, so every span from there on gets a new session (on any server but the failed one), each
        rebuilt from the inputs kept for that span: all at once, since those inputs are known."""
        self.leave(failure, rest)
        rebuilt = await asyncio.gather(
            *(self.reopen(stream.span, stream.history, padding) for stream in rest), return_exceptions=True
        )
        for outcome in rebuilt:
            if isinstance(outcome, BaseException):
                for replayed in rebuilt:
                    close_all([part.stream for part in replayed] if isinstance(replayed, list) else [])
                raise outcome
        return [part for replayed in rebuilt for part in replayed]

    async def move(self, stream: SpanStream, padding: Padding) -> list[Replayed]:
        """``stream``'s span on other servers, their caches rebuilt from its history (at a token boundary: nothing of
        it is in flight); then ``stream`` is closed. Raises as ``reopen`` does without waiting for servers to appear,
        leaving ``stream`` open: the session stays where it is."""
        replayed = await self.reopen(stream.span, stream.history, padding, exclude=(stream.span.peer_id,), wait=0.0)
        stream.close()
        self.moves += 1
        return replayed

    async def _open_route(
        self, failed: RouteSpan, history: list[torch.Tensor], padding: Padding, wait: float, exclude: tuple[str, ...]
    ) -> list[Replayed]:
        started = time.perf_counter()
        streams = await self.opener.open_route(failed.start, failed.end, wait=wait, exclude=exclude)
        try:
            if history:
                outputs = await run_chain(streams, padding.step(0, torch.cat(history, dim=1)))
            else:
                outputs = [None] * len(streams)
        except BaseException:
            close_all(streams)
            raise
        if failed.peer_id:  # the failure's own warning is the user's one line per failover
            logger.debug(
                "replaced blocks %d:%d with %s in %.2fs",
                failed.start,
                failed.end,
                ", ".join(f"{stream.span.peer_id[-8:]}[{stream.span.start}:{stream.span.end}]" for stream in streams),
                time.perf_counter() - started,
            )
        return [Replayed(stream, 0, output) for stream, output in zip(streams, outputs, strict=True)]

    async def catch_up(self, streams: list[SpanStream], inputs: torch.Tensor, position: int, padding: Padding):
        """Streams that hold the tokens before ``position`` (a replica taking over) get ``inputs`` from there on."""
        outputs = await run_chain(streams, padding.step(position, inputs))
        return [Replayed(stream, position, output) for stream, output in zip(streams, outputs, strict=True)]

    async def redo_after(
        self, streams: list[SpanStream], honest: torch.Tensor, position: int, padding: Padding
    ) -> list[Replayed]:
        """``streams`` were sent wrong inputs from ``position`` on: each drops its cache from there and gets the
        right ones (``honest``: the previous span's true outputs from ``position`` on), up to the first stream
        that had not got that far."""
        inputs, redone = honest, []
        for stream in streams:
            held = stream.tokens
            if held <= position:
                break
            sent = inputs[:, : held - position]
            outputs = await stream.exchange(padding.step(position, sent, rewind=True))
            stream.keep(position, sent)
            redone.append(Replayed(stream, position, outputs))
            inputs = outputs
        return redone
