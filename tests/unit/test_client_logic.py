"""The client's session logic against a fake swarm (``fake_swarm``): rollback, failover, verification, push.

Each test runs an ``InferenceSession`` over fake servers whose outputs depend on every token their caches hold, and
compares what it returns with ``reference``, computed here token by token from what the test sent, and what each
fake session received with what the client should have sent or replayed. No processes, no network, no model.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from petals_cli.client.inference import InferenceSession
from petals_cli.client.streams import Padding, close_all
from petals_cli.client.verdicts import ServerCaught
from petals_cli.routing import RouteSpan
from petals_cli.step import Step

from .fake_swarm import FakeServer, FakeSwarm

NUM_BLOCKS, BATCH, HIDDEN, MAX_LENGTH = 4, 2, 8, 32


def reference(tokens: torch.Tensor, start: int = 0, end: int = NUM_BLOCKS) -> torch.Tensor:
    """What blocks [start, end) of the fake model output for a whole token sequence, written out token by token
    (the fake servers compute it with a cumulative sum over their caches)."""
    hidden = tokens
    for block in range(start, end):
        outputs, running = [], torch.zeros_like(hidden[:, 0])
        for token in range(hidden.shape[1]):
            running = running + hidden[:, token]
            outputs.append(hidden[:, token] * (1 + 0.01 * (block + 1)) + 0.001 * running)
        hidden = torch.stack(outputs, dim=1)
    return hidden


class Run:
    """A session's steps and every token sent, so that each output is checked against the reference."""

    def __init__(self, session: InferenceSession, seed: int = 0):
        self.session, self.sent = session, []
        self.generator = torch.Generator().manual_seed(seed)

    def tokens(self, count: int) -> torch.Tensor:
        return torch.randn(BATCH, count, HIDDEN, dtype=torch.float64, generator=self.generator)

    def step(self, count: int, *, check: bool = True) -> torch.Tensor:
        hidden = self.tokens(count)
        output = self.session.step(hidden)
        self.sent.append(hidden)
        if check:
            assert_close(output, self.expected(count))
        return output

    def expected(self, count: int, start: int = 0, end: int = NUM_BLOCKS) -> torch.Tensor:
        """The reference outputs of blocks [start, end) for the last ``count`` tokens sent."""
        return reference(torch.cat(self.sent, dim=1), start, end)[:, -count:]

    def rollback(self, position: int) -> None:
        self.session.rollback(position)
        self.sent = [torch.cat(self.sent, dim=1)[:, :position]]


@pytest.fixture
def swarm():
    """Make a fake swarm and its client connection; every connection is closed at the end."""
    connections = []

    def make(*servers: FakeServer, **config):
        fake = FakeSwarm(NUM_BLOCKS)
        for server in servers:
            fake.add(server)
        connections.append(fake.connect(**config))
        return connections[-1]

    yield make
    for conn in connections:
        conn.close()


def open_session(conn) -> InferenceSession:
    return InferenceSession(conn, "fake", NUM_BLOCKS, max_length=MAX_LENGTH, batch_size=BATCH)


def kept(session: InferenceSession, index: int) -> torch.Tensor:
    return torch.cat(session._streams[index].history, dim=1)


@pytest.mark.parametrize("push", [False, True], ids=["relayed", "pushed"])
def test_rollback_cuts_kept_inputs_and_rewinds_every_server(swarm, push):
    first, second = FakeServer("first", 0, 2), FakeServer("second", 2, 4)
    conn = swarm(first, second, push=push)
    with open_session(conn) as session:
        run = Run(session)
        for count in (4, 1, 1):
            run.step(count)
        run.rollback(4)
        assert session.position == 4
        assert [stream.tokens for stream in session._streams] == [4, 4]
        assert_close(kept(session, 0), run.sent[0])  # the first 4 inputs each span was sent, nothing after
        assert_close(kept(session, 1), reference(run.sent[0], 0, 2))
        run.step(2)  # the outputs of the truncated sequence: the servers dropped positions 4 and 5
        run.step(1)
    for server in (first, second):
        (fake,) = server.opened
        assert [(got.position, got.tokens, got.rewind) for got in fake.received] == [
            (0, 4, False),
            (4, 1, False),
            (5, 1, False),
            (4, 2, True),
            (6, 1, False),
        ]
    assert [got.pushed for got in second.opened[0].received] == [push] * 5


@pytest.mark.parametrize("fault", ["error", "dead"])
@pytest.mark.parametrize("push", [False, True], ids=["relayed", "pushed"])
def test_failover_replays_exactly_the_kept_inputs(swarm, push, fault):
    first, failing, spare = FakeServer("first", 0, 2), FakeServer("failing", 2, 4), FakeServer("spare", 2, 4)
    conn = swarm(first, failing, spare, push=push)
    if fault == "error":
        failing.fail_at_step = 3
    with open_session(conn) as session:
        run = Run(session)
        run.step(3)
        run.step(1)
        failing.dead = fault == "dead"
        run.step(1)  # fails on its second span, which is rebuilt on the spare
        run.step(2)
        assert session.failovers == 1
        assert session.route == [RouteSpan("first", 0, 2), RouteSpan("spare", 2, 4)]
    assert conn.bans == ["failing"]
    (lost,), (rebuilt,) = failing.opened, spare.opened
    assert lost.closed
    replayed, current, after = rebuilt.received
    assert (replayed.position, replayed.tokens, replayed.rewind) == (0, 4, False)
    assert_close(replayed.inputs, torch.cat([got.inputs for got in lost.received[:2]], dim=1))
    assert_close(replayed.inputs, reference(torch.cat(run.sent[:2], dim=1), 0, 2))
    assert (current.position, current.tokens, after.position, after.tokens) == (4, 1, 5, 2)
    assert_close(current.inputs, reference(torch.cat(run.sent[:3], dim=1), 0, 2)[:, 4:])


def liar_and_honest_replicas(tamper_from: int) -> list[FakeServer]:
    """A server of blocks 0:2 lying from ``tamper_from`` on (added first: routes prefer it), two honest replicas of
    those blocks (one checks it, the other judges), and the one server of blocks 2:4 (never verifiable)."""
    liar = FakeServer("liar", 0, 2)
    liar.tamper_from = tamper_from
    return [liar, FakeServer("honest-1", 0, 2), FakeServer("honest-2", 0, 2), FakeServer("tail", 2, 4)]


@pytest.mark.parametrize("push", [False, True], ids=["relayed", "pushed"])
def test_caught_server_is_replaced_and_later_spans_redone(swarm, push):
    servers = liar_and_honest_replicas(tamper_from=3)
    tail = servers[-1]
    conn = swarm(*servers, push=push, verify_rate=1.0, verify_seed=0)
    with open_session(conn) as session:
        run = Run(session)
        run.step(3)  # the first check of each server is waited for: the liar's is honest still
        lied = run.step(1, check=False)  # checked beside the step, settled later: the lie reaches the caller
        assert not torch.allclose(lied, run.expected(1))
        session.settle_checks()
        assert session.caught == 1 and conn.banned_forever == ["liar"]
        assert session.route == [RouteSpan("honest-1", 0, 2), RouteSpan("tail", 2, 4)]
        (tail_session,) = tail.opened
        redo = tail_session.received[-1]
        assert (redo.position, redo.tokens, redo.rewind) == (3, 1, True)  # from the first wrong position on
        assert_close(redo.inputs, run.expected(1, 0, 2))
        run.step(2)
        run.step(1)
    assert [(got.position, got.rewind) for got in tail_session.received[-2:]] == [(4, False), (6, False)]


@pytest.mark.parametrize("push", [False, True], ids=["relayed", "pushed"])
def test_lie_starting_inside_a_checked_step(swarm, push):
    conn = swarm(*liar_and_honest_replicas(tamper_from=2), push=push, verify_rate=1.0, verify_seed=0)
    with open_session(conn) as session:
        run = Run(session)
        run.step(4)  # the liar's first check is waited for, and finds its lie from the step's third token on
        assert session.caught == 1 and session.route == [RouteSpan("honest-1", 0, 2), RouteSpan("tail", 2, 4)]
        run.step(1)


def test_settle_returns_the_verdict_and_leaves_the_route_to_the_session(swarm):
    conn = swarm(*liar_and_honest_replicas(tamper_from=2), push=False, verify_rate=1.0, verify_seed=0)
    with open_session(conn) as session:
        run = Run(session)
        run.step(2)
        route = session.route
        hidden = run.tokens(1)
        run.sent.append(hidden)

        async def checked_step():
            """One step through the liar only, its check started and settled as the session would do it."""
            stream, checks, padding = session._streams[0], session._checks, Padding()
            assert checks.start(stream, hidden, padding) is None  # a confirmed server: checked beside the step
            output = await stream.exchange(Step(2, hidden))
            stream.keep(2, hidden)
            checks.record(stream, output)
            return await checks.settle(stream, checks.take_finished(stream, wait=True), padding)

        verdict = conn.run(checked_step())
        try:
            assert isinstance(verdict, ServerCaught)
            assert [stream.span for stream in verdict.replacement] == [RouteSpan("honest-1", 0, 2)]
            assert (verdict.position, verdict.end) == (2, 3)
            assert_close(verdict.honest, run.expected(1, 0, 2))
            assert session.caught == 1 and conn.banned_forever == ["liar"]
            assert session.route == route  # the checks decide; only the session changes its route
        finally:
            conn.loop.call_soon_threadsafe(close_all, verdict.replacement)


@pytest.mark.parametrize(("refusal", "relayed_per_step"), [(None, 0), ("refuses", 1), ("own session ids", 1)], ids=str)
def test_refused_push_is_relayed_by_the_client(swarm, refusal, relayed_per_step):
    first, middle, last = FakeServer("first", 0, 1), FakeServer("middle", 1, 3), FakeServer("last", 3, 4)
    last.accept_pushes = refusal != "refuses"
    last.own_session_ids = refusal == "own session ids"
    conn = swarm(first, middle, last, push=True)
    with open_session(conn) as session:
        run = Run(session)
        for count in (3, 1, 1):
            run.step(count)
        assert session.relayed_hops == 3 * relayed_per_step
    assert [got.pushed for got in middle.opened[0].received] == [True] * 3
    assert [got.pushed for got in last.opened[0].received] == [not relayed_per_step] * 3
