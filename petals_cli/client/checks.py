"""Verification (``--verify RATE``): replicas re-run a sample of a server's work and the outputs are compared.

Inference: a replica (sessions on other servers holding the same blocks) re-runs a span's steps. A check sends it
every input the span got since the last check, so it compares all of those tokens, not just the sampled step, and
it runs beside the server. A server's first check is waited for before its output is used; later ones, sampled
with probability RATE (one at a time per span), are settled at a later step, so the session does not wait. On a
mismatch a third replica decides (``vote``, the same for inference and for forward/backward requests); whoever it
outvotes is banned for the run, said to be caught and reported with signed evidence (``Verifier.caught``).

Every check ends in a typed ``Verdict`` (``verdicts``, with the vote and what one client's checks share). This
module keeps its own state per span (keyed by the span's stream), opens and runs its replicas, but never changes
a session's route: a ``ServerCaught`` verdict names the replacement, the honest outputs and the first wrong
position, and the session applies it. With verification off, sessions use ``NoChecks``, which does nothing.
Forward/backward requests are checked by ``RequestChecks``.

Never imports the session, replay or push.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from petals_cli.client.streams import (
    Connection,
    Opener,
    Padding,
    ServerFailure,
    SpanStream,
    close_all,
    first_tokens,
    run_chain,
    tokens_from,
)
from petals_cli.client.verdicts import (
    Confirmed,
    Outvoted,
    ReplicaCaught,
    ReplicaFailed,
    ServerCaught,
    Superseded,
    Unverifiable,
    Verdict,
    Verifier,
    vote,
)
from petals_cli.errors import NoRouteError, PetalsError, VerificationError
from petals_cli.routing import RouteSpan
from petals_cli.verify import Comparison, compare

logger = logging.getLogger(__name__)
NO_LIMIT = 1 << 62  # a check's verdict not cut by any rollback


# --- inference ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _SpanCheck:
    """What verification keeps about one stream: its answers since the start, and its replica."""

    outputs: list[torch.Tensor] = field(default_factory=list)  # what the server answered to each of its inputs
    replica: list[SpanStream] | None = None  # sessions on other servers holding the same blocks
    replica_tokens: int = 0  # tokens the replica's caches hold
    checked: int = 0  # tokens whose outputs a replica has confirmed (the last verified point)
    confirmed: bool = False  # a check has confirmed this server (its first one is waited for)
    unverifiable: bool = False  # no other server holds these blocks
    pending: asyncio.Task | None = None  # a check not waited for, settled at a later step
    pending_limit: int = NO_LIMIT  # a check's verdict holds for tokens before this (rollbacks and redos cut it)


@dataclass(frozen=True)
class _ReplicaRun:
    """A replica's outputs for every token from ``start`` (the last verified point) to the end of a checked step."""

    start: int
    outputs: torch.Tensor


class NoChecks:
    """Verification off: nothing is checked, kept or counted."""

    active = False
    verified_steps = verified_tokens = caught = 0

    def start(self, stream: SpanStream, hidden: torch.Tensor, padding: Padding) -> None:
        return None

    def record(self, stream: SpanStream, outputs: torch.Tensor) -> None:
        pass

    def replayed(self, stream: SpanStream, position: int, outputs: torch.Tensor | None) -> None:
        pass

    def cut(self, stream: SpanStream, position: int) -> None:
        pass

    def take_finished(self, stream: SpanStream, wait: bool) -> None:
        return None

    async def abandon(self, check: None, stream: SpanStream | None = None) -> None:
        pass


class InferenceChecks:
    """The checks of one inference session, span by span."""

    active = True

    def __init__(self, opener: Opener, verifier: Verifier):
        self.opener, self.verifier = opener, verifier
        self._spans: dict[SpanStream, _SpanCheck] = {}
        self.verified_steps = 0  # checks a replica confirmed
        self.verified_tokens = 0  # tokens whose outputs those checks covered (summed over spans)
        self.caught = 0  # servers caught returning wrong outputs and replaced

    def _of(self, stream: SpanStream) -> _SpanCheck:
        state = self._spans.get(stream)
        if state is None:
            state = self._spans[stream] = _SpanCheck()
            stream.on_close(lambda: self._forget(stream))
        return state

    def _forget(self, stream: SpanStream) -> None:
        state = self._spans.pop(stream, None)
        if state is None:
            return
        if state.pending is not None:
            state.pending.cancel()
        close_all(state.replica or ())

    def record(self, stream: SpanStream, outputs: torch.Tensor) -> None:
        """``stream``'s server answered ``outputs`` to its latest input."""
        self._of(stream).outputs.append(outputs)

    def replayed(self, stream: SpanStream, position: int, outputs: torch.Tensor | None) -> None:
        """``stream``'s server answered ``outputs`` for its tokens from ``position`` on, in place of its earlier
        answers from there (a replay, a catch-up or a redo); a check in flight holds only for the tokens before."""
        self.cut(stream, position)
        if outputs is not None:
            self._of(stream).outputs.append(outputs)

    def cut(self, stream: SpanStream, position: int) -> None:
        """Every token from ``position`` on was rolled back; a replica holding more is rewound at the next check."""
        state = self._of(stream)
        state.outputs = first_tokens(state.outputs, position)
        state.checked = min(state.checked, position)
        state.pending_limit = min(state.pending_limit, position)

    def start(self, stream: SpanStream, hidden: torch.Tensor, padding: Padding) -> asyncio.Task | None:
        """Start a check of the step whose input to ``stream`` is ``hidden``; returns it when the step must wait
        for it (the server's first check), else keeps it to settle at a later step (``take_finished``)."""
        state = self._of(stream)
        if state.unverifiable or state.pending is not None:
            return None
        if state.confirmed and self.verifier.rng.random() >= self.verifier.rate:
            return None
        earlier = list(stream.history)  # the step's own input is appended while the check runs
        check = asyncio.ensure_future(self._run_replica(stream, earlier, hidden, padding))
        state.pending_limit = NO_LIMIT
        if not state.confirmed:
            return check
        state.pending = check
        return None

    def take_finished(self, stream: SpanStream, wait: bool) -> asyncio.Task | None:
        """``stream``'s check of an earlier step if it has finished (or with ``wait``, if there is one)."""
        state = self._spans.get(stream)
        check = None if state is None else state.pending
        if check is None or not (wait or check.done()):
            return None
        state.pending = None
        return check

    async def abandon(self, check: asyncio.Task | None, stream: SpanStream | None = None) -> None:
        """Stop waiting for a check whose verdict no longer matters. With ``stream`` (whose replica it feeds), let
        it finish so the replica's caches stay in step (rewound at the next check), or drop that replica if it
        failed."""
        if check is None:
            return
        if stream is None:
            check.cancel()
        (outcome,) = await asyncio.gather(check, return_exceptions=True)
        state = None if stream is None else self._spans.get(stream)
        if state is not None and isinstance(outcome, BaseException):
            close_all(state.replica or ())
            state.replica = None

    async def _run(self, streams: list[SpanStream], step) -> torch.Tensor:
        """``run_chain`` through replica streams, keeping their answers; the last one's outputs."""
        outputs = await run_chain(streams, step)
        for stream, output in zip(streams, outputs, strict=True):
            state = self._of(stream)
            state.outputs = [*first_tokens(state.outputs, step.position), output]
        return outputs[-1]

    async def _run_replica(self, stream: SpanStream, earlier: list[torch.Tensor], hidden, padding: Padding):
        """The replica's run of every token from the last verified point to the end of this step. Opens the replica
        first when there is none (it then catches up from 0)."""
        state = self._of(stream)
        if state.replica is None:
            span = stream.span
            replica = await self.opener.open_route(span.start, span.end, wait=0.0, exclude={span.peer_id})
            state.replica, state.replica_tokens, state.checked = replica, 0, 0
        start = state.checked
        inputs = torch.cat([*tokens_from(earlier, start), hidden], dim=1)
        # a rollback or a replaced server upstream: the replica drops what it holds beyond ``start``
        outputs = await self._run(state.replica, padding.step(start, inputs, rewind=state.replica_tokens > start))
        state.replica_tokens = start + inputs.shape[1]
        return _ReplicaRun(start, outputs)

    async def settle(self, stream: SpanStream, check: asyncio.Task, padding: Padding) -> Verdict:
        """Wait for a check of ``stream`` and judge it; ``padding`` covers every token the session has sent."""
        if check.cancelled():
            return Superseded()
        state = self._of(stream)
        try:
            run: _ReplicaRun = await check
        except NoRouteError:
            state.unverifiable = True
            logger.warning(
                "blocks %d:%d: no other server holds them, so their outputs are not verified",
                stream.span.start,
                stream.span.end,
            )
            return Unverifiable()
        except (ServerFailure, PetalsError) as failure:  # the replica failed, not the server it checks
            logger.warning("%s (a replica checking another server); checking with another one later", failure)
            if isinstance(failure, ServerFailure):
                self.opener.conn.ban(failure.span.peer_id)
            close_all(state.replica or ())
            state.replica = None
            return ReplicaFailed(str(failure))
        start, expected = run.start, run.outputs
        end = start + expected.shape[1]
        if state.pending_limit < end:  # rolled back or redone meanwhile: its inputs are not this span's now
            return Superseded()
        answered = torch.cat(tokens_from(state.outputs, start), dim=1)[:, : end - start]
        comparison = compare(answered, expected)
        if not comparison.agree:
            return await self._arbitrate(stream, state, start, (answered, expected), comparison, padding)
        self.verified_tokens += end - state.checked
        self.verifier.confirmed(end - state.checked)
        tokens, state.checked, state.confirmed = end - state.checked, end, True
        self.verified_steps += 1
        return Confirmed(tokens)

    async def _arbitrate(
        self, stream: SpanStream, state: _SpanCheck, start: int, answers, comparison: Comparison, padding: Padding
    ) -> Verdict:
        """A server and its replica disagree from ``start + comparison.first_bad`` on: a third replica, run over the
        span's history, decides; whoever it outvotes is banned for the rest of the run and reported."""
        answered, expected = answers
        span, replica = stream.span, state.replica or []
        end = start + answered.shape[1]
        first_bad = start + comparison.first_bad
        history = torch.cat(stream.history, dim=1)
        judge: list[SpanStream] = []

        async def run_judge(exclude: set[str]):
            judge.extend(await self.opener.open_route(span.start, span.end, wait=0.0, exclude=exclude))
            try:
                verdict = await self._run(judge, padding.step(0, history[:, :end]))
            except ServerFailure:
                close_all(judge)
                raise
            return [member.span.peer_id for member in judge], verdict[:, start:]

        disagreement = (
            f"disagree from position {first_bad} "
            f"(relative error {comparison.max_error:.3g} > {comparison.tolerance:g})"
        )
        try:
            decision = await vote(
                span,
                [member.span.peer_id for member in replica],
                run_judge,
                lambda answer, verdict: compare(answer, verdict).agree,
                (answered, expected),
                disagreement=disagreement,
            )
        except VerificationError:
            close_all(judge)
            raise
        inputs, witnesses = history[:, :end], decision.witnesses
        if decision.server_right:  # the replica lied: it goes, the server stays, checked by the judge from now on
            for member in replica:
                self._caught(member.span, first_bad, Outvoted(inputs, expected, answered, witnesses))
                member.close()
            state.replica, state.replica_tokens = judge, end
            state.checked, state.confirmed = end, True
            return ReplicaCaught(tuple(member.span.peer_id for member in replica))
        self._caught(span, first_bad, Outvoted(inputs, answered, expected, witnesses))
        close_all(judge)
        state.replica = None  # it takes over: closing the caught server's stream must not close it
        for member in replica:
            member_state = self._of(member)
            member_state.checked, member_state.confirmed = end, True  # confirmed by the judge
        return ServerCaught(replica, expected, first_bad, start, end)

    def _caught(self, span: RouteSpan, position: int, proof: Outvoted) -> None:
        self.caught += 1
        what = f"wrong outputs from position {position}"
        self.verifier.caught(self.opener.conn, self.opener.prefix, span, what, "inference", position, proof)


def inference_checks(opener: Opener) -> InferenceChecks | NoChecks:
    """The checks of a session opened by ``opener``: none unless the client verifies."""
    if opener.conn.config.verify_rate <= 0:
        return NoChecks()
    return InferenceChecks(opener, Verifier.of(opener.conn))


# --- forward and backward requests --------------------------------------------------------------------------

Rerun = Callable[[set[str]], Awaitable[tuple[list[RouteSpan], list[torch.Tensor]]]]


class RequestChecks:
    """Checks of forward and backward requests: a server's first request and then a share ``verify_rate`` of them
    are also sent to a replica of the same blocks, at once (``rerun(exclude)`` runs one on other servers)."""

    def __init__(self, conn: Connection, prefix: str):
        self.conn, self.prefix = conn, prefix
        self.verifier = Verifier.of(conn)

    def start(self, span: RouteSpan, rerun: Rerun) -> asyncio.Task | None:
        verifier = self.verifier
        chosen = verifier.rate > 0 and (
            span.peer_id not in verifier.verified_peers or verifier.rng.random() < verifier.rate
        )
        return asyncio.ensure_future(rerun({span.peer_id})) if chosen else None

    @staticmethod
    async def abandon(check: asyncio.Task | None) -> None:
        """Stop a check whose request failed anyway."""
        if check is not None:
            check.cancel()
            await asyncio.gather(check, return_exceptions=True)

    async def settle(self, span: RouteSpan, method: str, tensors, outputs, check: asyncio.Task, rerun) -> Verdict:
        """Judge the server's ``outputs`` for a ``method`` request of ``tensors`` against the replica's ``check``."""
        try:
            route, expected = await check
        except NoRouteError:
            logger.warning("blocks %d:%d: no other server holds them, so they are not verified", span.start, span.end)
            return Unverifiable()
        except ServerFailure as failure:
            logger.warning("%s (a replica checking another server)", failure)
            self.conn.ban(failure.span.peer_id)
            return ReplicaFailed(str(failure))
        if _all_agree(outputs, expected):
            self.verifier.verified_peers.add(span.peer_id)
            self.verifier.confirmed(tensors[0].shape[:-1].numel())
            return Confirmed(tensors[0].shape[:-1].numel())
        kind = method[4:]

        async def judge(exclude):
            judges, verdict = await rerun(exclude)
            return [member.peer_id for member in judges], verdict

        decision = await vote(
            span,
            [member.peer_id for member in route],
            judge,
            _all_agree,
            (outputs, expected),
            disagreement=f"disagree on a {kind} request",
            outputs=f"{kind} outputs",
        )
        wrong, right = (expected, outputs) if decision.server_right else (outputs, expected)
        for caught in route if decision.server_right else [span]:
            proof = Outvoted(tensors[0], wrong[0], right[0], decision.witnesses)
            self.verifier.caught(self.conn, self.prefix, caught, f"a wrong {kind} answer", kind, 0, proof)
        if decision.server_right:
            self.verifier.verified_peers.add(span.peer_id)
            return ReplicaCaught(tuple(member.peer_id for member in route))
        return ServerCaught([], expected)


def _all_agree(outputs: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return all(compare(got, want).agree for got, want in zip(outputs, expected, strict=True))
