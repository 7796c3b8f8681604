"""Where a server should sit in the swarm: pure functions over a ``SwarmSnapshot``.

- ``block_throughputs``: how much serving capacity each block has (online and joining servers; a server that is
  moving counts where it is going).
- ``choose_span``: the span of N blocks that strengthens the swarm's weakest blocks.
- ``earlier_claims``: the swarm as a joining server must see it to settle a gap that several joiners chose at once.
- ``rebalance``: whether moving would make the swarm's weakest blocks stronger by more than a threshold, without
  leaving any block this server holds uncovered.
- ``confirm_move``: whether a server acts on such a decision now (a gap at once; anything else twice in a row and
  not too soon after its last move).

Balance is compared block by block from the weakest up (the per-block throughputs sorted ascending, compared
lexicographically): a swarm whose twelve weakest blocks have 3 servers each gets better when six of them get a
fourth, though its minimum stays 3. A move is made only when the first of those sorted figures that it changes
rises by more than ``balance_quality``; each such move makes the sorted figures strictly larger, so servers moving
one at a time on what they read can never cycle (flap) back.

No network, no clock, no randomness.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot

ACTIVE_STATES = (ServerState.ONLINE, ServerState.JOINING)
MOVE_COOLDOWN_PERIODS = 5  # balance periods between two moves of a server, unless the second fills a gap
COVERAGE_FLOOR = 1e-3  # an online server that announces no throughput still covers its blocks
DEFAULT_THROUGHPUT = 1.0  # what a joining server without a figure counts for when nobody announces one


def planned_span(info: ServerInfo, num_blocks: int) -> tuple[int, int]:
    """Where a server will serve: its announced move target while it moves, else its span (clipped to the model)."""
    start, end = info.moving_to if len(info.moving_to) == 2 else (info.start_block, info.end_block)
    return max(start, 0), min(end, num_blocks)


def block_throughputs(snapshot: SwarmSnapshot, *, exclude: str | None = None) -> list[float]:
    """Per block, the summed throughput of the servers that hold it or are about to (``exclude``: leave one out).

    A joining server has measured nothing yet (its figure comes once its blocks are loaded): it counts as a typical
    server of this swarm, the median of the announced figures, so that servers deciding next see its blocks taken.
    A server announcing ``moving_to`` counts on its new span only: others must not count on it where it is leaving.
    """
    active = {peer: info for peer, info in snapshot.servers.items() if peer != exclude and info.state in ACTIVE_STATES}
    announced = [info.throughput for info in active.values() if info.throughput > 0]
    typical = statistics.median(announced) if announced else DEFAULT_THROUGHPUT
    totals = [0.0] * snapshot.num_blocks
    for info in active.values():
        throughput = info.throughput if info.throughput > 0 else COVERAGE_FLOOR
        if info.state == ServerState.JOINING and info.throughput <= 0:
            throughput = typical
        for index in range(*planned_span(info, snapshot.num_blocks)):
            totals[index] += throughput
    return totals


def choose_span(throughputs: list[float], length: int) -> tuple[int, int]:
    """The window of ``length`` blocks whose throughputs, sorted ascending, are lexicographically smallest.

    That window contains the weakest block (on ties, the most weak blocks); remaining ties go to the leftmost
    window, so servers joining an empty swarm one after another tile it.
    """
    length = max(1, min(length, len(throughputs)))
    windows = range(len(throughputs) - length + 1)
    start = min(windows, key=lambda start: (sorted(throughputs[start : start + length]), start))
    return start, start + length


def earlier_claims(snapshot: SwarmSnapshot, claimed_at: float, own: str) -> SwarmSnapshot:
    """The swarm less the joining servers that claimed their blocks after ``own`` did (at ``claimed_at``).

    Joiners that read the swarm at the same moment all see the same gap and all claim it. Each then reads again and
    chooses counting only the claims made before its own (ties: the smaller peer id first): the first claimant keeps
    the gap, the second sees it taken and chooses again, and so on, one total order that every joiner agrees on.
    Servers that announce no claim time (older versions) count as earliest."""
    mine = (claimed_at, own)
    later = {
        peer
        for peer, info in snapshot.servers.items()
        if info.state == ServerState.JOINING and info.claimed_at > 0 and (info.claimed_at, peer) > mine
    }
    return snapshot.without(later)


@dataclass(frozen=True)
class Rebalance:
    move: bool
    new_span: tuple[int, int]
    min_before: float
    min_after: float
    weakest_change: tuple[float, float]  # the first per-block figure, weakest first, that the move changes: old, new
    fills_gap: bool  # the new span covers a block that nobody else holds


def first_change(before: list[float], after: list[float]) -> tuple[float, float] | None:
    """Sorted ascending, the first position where ``after`` differs from ``before``: (before's, after's) figure."""
    for old, new in zip(sorted(before), sorted(after), strict=True):
        if not math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-12):
            return old, new
    return None


def rebalance(
    snapshot: SwarmSnapshot,
    peer_id: str,
    span: tuple[int, int],
    own_throughput: float,
    *,
    balance_quality: float,
) -> Rebalance:
    """Should the server ``peer_id`` holding ``span`` move? Only if the weakest per-block figure that the move
    changes rises by more than ``balance_quality`` (a fraction), and never when leaving would open a gap."""
    others = block_throughputs(snapshot, exclude=peer_id)
    start, end = span
    own = max(own_throughput, COVERAGE_FLOOR)
    current = list(others)
    for index in range(start, end):
        current[index] += own
    candidate = choose_span(others, end - start)
    moved = list(others)
    for index in range(*candidate):
        moved[index] += own
    change = first_change(current, moved) or (0.0, 0.0)
    leaves_gap = any(others[index] <= 0.0 for index in range(start, end) if not candidate[0] <= index < candidate[1])
    better = change[1] > change[0] * (1.0 + balance_quality) and change[1] > change[0]
    return Rebalance(
        move=candidate != span and better and not leaves_gap,
        new_span=candidate,
        min_before=min(current, default=0.0),
        min_after=min(moved, default=0.0),
        weakest_change=change,
        fills_gap=any(others[index] <= 0.0 for index in range(*candidate)),
    )


def confirm_move(
    decision: Rebalance, pending: tuple[int, int] | None, since_last_move: float, balance_period: float
) -> tuple[bool, tuple[int, int] | None]:
    """(move now, the span to confirm at the next check) for a server that checked ``decision``, the span it was
    about to confirm being ``pending``, ``since_last_move`` seconds after its last move.

    A move that fills a gap (a block nobody else holds) is made at once. Any other move must be the decision of
    two checks in a row (servers that just moved have announced where they went by then) and comes at least
    ``MOVE_COOLDOWN_PERIODS`` periods after the server's last move: a swarm whose balance changes under it does
    not send its servers back and forth."""
    if not decision.move:
        return False, None
    cooled = since_last_move >= MOVE_COOLDOWN_PERIODS * balance_period
    if decision.fills_gap or (cooled and pending == decision.new_span):
        return True, None
    return False, decision.new_span
