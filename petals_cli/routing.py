"""Choosing routes: pure functions over a ``SwarmSnapshot``.

No network, no clock, no randomness that was not passed in. A route is a chain of ``RouteSpan`` that
covers blocks [start, end) in order; each span is served by one online server that holds it.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection
from dataclasses import dataclass

from petals_cli.errors import ModelNotServedError, NoRouteError
from petals_cli.wire import SwarmSnapshot


@dataclass(frozen=True)
class RouteSpan:
    peer_id: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def missing_blocks(snapshot: SwarmSnapshot, start: int, end: int, banned: Collection[str] = ()) -> list[int]:
    held = set()
    for peer, info in snapshot.online().items():
        if peer not in banned:
            held.update(range(info.start_block, info.end_block))
    return [index for index in range(start, end) if index not in held]


def format_blocks(blocks: list[int]) -> str:
    """Compact ranges: [0, 1, 2, 5] -> '0:3, 5'."""
    parts, run_start = [], None
    for position, index in enumerate(blocks):
        if run_start is None:
            run_start = index
        if position + 1 == len(blocks) or blocks[position + 1] != index + 1:
            parts.append(str(index) if run_start == index else f"{run_start}:{index + 1}")
            run_start = None
    return ", ".join(parts)


def fewest_hops_route(
    snapshot: SwarmSnapshot,
    start: int = 0,
    end: int | None = None,
    *,
    banned: Collection[str] = (),
    rng: random.Random | None = None,
) -> list[RouteSpan]:
    """The route through the fewest servers; ties are broken by ``rng`` (spreads load across replicas)."""
    end = snapshot.num_blocks if end is None else end
    servers = {peer: info for peer, info in snapshot.online().items() if peer not in banned}
    if not snapshot.servers:
        raise ModelNotServedError(f"no server announces any block of {snapshot.prefix}")
    missing = missing_blocks(snapshot, start, end, banned)
    if missing:
        raise NoRouteError(
            f"no live server holds blocks {format_blocks(missing)} of {snapshot.prefix}", missing_blocks=missing
        )
    rng = rng or random.Random(0)
    tie_break = {peer: rng.random() for peer in servers}
    # Dijkstra over block positions: an edge jumps from `position` to the end of a span that holds it.
    best: dict[int, tuple[int, float]] = {start: (0, 0.0)}
    came_from: dict[int, tuple[int, str]] = {}
    queue = [(0, 0.0, start)]
    while queue:
        hops, noise, position = heapq.heappop(queue)
        if position == end:
            break
        if best.get(position, (hops, noise)) < (hops, noise):
            continue
        for peer, info in servers.items():
            if info.start_block <= position < info.end_block:
                target = min(info.end_block, end)
                cost = (hops + 1, noise + tie_break[peer])
                if target not in best or cost < best[target]:
                    best[target] = cost
                    came_from[target] = (position, peer)
                    heapq.heappush(queue, (*cost, target))
    route, position = [], end
    while position != start:
        previous, peer = came_from[position]
        route.append(RouteSpan(peer, previous, position))
        position = previous
    return route[::-1]
