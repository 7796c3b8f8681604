"""Where a server should sit in the swarm: pure functions over a ``SwarmSnapshot``.

- ``block_throughputs``: how much serving capacity each block has (online and joining servers).
- ``choose_span``: the span of N blocks that strengthens the swarm's weakest blocks.
- ``rebalance``: whether moving would raise the swarm's minimum per-block throughput by more than a
  threshold, without leaving any block this server holds uncovered.

No network, no clock, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

from petals_cli.wire import ServerState, SwarmSnapshot

ACTIVE_STATES = (ServerState.ONLINE, ServerState.JOINING)
COVERAGE_FLOOR = 1e-3  # a server that announces no throughput (yet) still covers its blocks


def block_throughputs(snapshot: SwarmSnapshot, *, exclude: str | None = None) -> list[float]:
    """Per block, the summed throughput of the servers holding it (``exclude``: leave one server out)."""
    totals = [0.0] * snapshot.num_blocks
    for peer, info in snapshot.servers.items():
        if peer == exclude or info.state not in ACTIVE_STATES:
            continue
        for index in range(max(info.start_block, 0), min(info.end_block, snapshot.num_blocks)):
            totals[index] += max(info.throughput, COVERAGE_FLOOR)
    return totals


def choose_span(throughputs: list[float], length: int) -> tuple[int, int]:
    """The window of ``length`` blocks whose throughputs, sorted ascending, are lexicographically smallest.

    That window contains the weakest block (on ties, the most weak blocks); remaining ties go to the leftmost
    window, so servers joining an empty swarm one after another tile it. (Servers that start at the same
    moment are spread by a random start delay and their JOINING records, and rebalancing fixes the rest.)
    """
    length = max(1, min(length, len(throughputs)))
    windows = range(len(throughputs) - length + 1)
    start = min(windows, key=lambda start: (sorted(throughputs[start : start + length]), start))
    return start, start + length


@dataclass(frozen=True)
class Rebalance:
    move: bool
    new_span: tuple[int, int]
    min_before: float
    min_after: float


def rebalance(
    snapshot: SwarmSnapshot,
    peer_id: str,
    span: tuple[int, int],
    own_throughput: float,
    *,
    balance_quality: float,
) -> Rebalance:
    """Should the server ``peer_id`` holding ``span`` move? Moves only if the swarm's weakest block gets
    stronger by more than ``balance_quality`` (a fraction), and never when leaving would open a gap."""
    others = block_throughputs(snapshot, exclude=peer_id)
    start, end = span
    current = list(others)
    for index in range(start, end):
        current[index] += own_throughput
    min_before = min(current) if current else 0.0
    candidate = choose_span(others, end - start)
    moved = list(others)
    for index in range(*candidate):
        moved[index] += own_throughput
    min_after = min(moved) if moved else 0.0
    leaves_gap = any(others[index] <= 0.0 for index in range(start, end) if not candidate[0] <= index < candidate[1])
    better = min_after > min_before * (1.0 + balance_quality) and min_after > min_before
    return Rebalance(
        move=candidate != span and better and not leaves_gap,
        new_span=candidate,
        min_before=min_before,
        min_after=min_after,
    )
