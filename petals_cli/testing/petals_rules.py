"""The original Petals' rules as a baseline policy for the swarm simulator, written from their published description
(``shared/notes/public-swarm-prior-art.md``), not from its code:

- routing: the cheapest route by Dijkstra, each hop costing half the round trip to the server (from the client, or
  the previous server's published ping; 0.15 s when unknown), 18 ms of overhead and 1 / inference_rps per block,
  plus 10 s when the server's announced cache room is too small; a route changes servers only at the end of a
  server's span. No live load, no spreading: clients deciding from the same figures take the same route.
- placement: a joining server takes the window of blocks whose throughputs, sorted, are smallest (as ours).
- rebalancing, checked about every minute: take this server out, put it where the swarm needs it most, then let
  every other server re-place itself greedily in random order until nothing changes; move when the swarm's
  throughput (its weakest block) before over after is below 0.75, never leaving a block empty.
- failed servers: banned for 15 s, doubling.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Mapping

from petals_cli.errors import NoRouteError
from petals_cli.routing import RouteSpan, format_blocks, missing_blocks
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot

UNKNOWN_RTT = 0.15
HOP_OVERHEAD = 0.018
CACHE_PENALTY = 10.0
BALANCE_QUALITY = 0.75
BAN_SECONDS = 15.0
MAX_PASSES = 10  # of the greedy re-placement (it stops earlier once nothing moves)


def route(
    snapshot: SwarmSnapshot,
    start: int = 0,
    end: int | None = None,
    *,
    rtts: Mapping[str, float] | None = None,
    banned: Collection[str] = (),
    cache_tokens_needed: int = 0,
    **_ignored,
) -> list[RouteSpan]:
    """The cheapest route under the original rules (see the module's docstring)."""
    end = snapshot.num_blocks if end is None else end
    rtts = rtts or {}
    missing = missing_blocks(snapshot, start, end, banned)
    if missing:
        raise NoRouteError(f"no live server holds blocks {format_blocks(missing)}", missing_blocks=missing)
    servers = [(peer, info) for peer, info in snapshot.online().items() if peer not in banned]
    holders: dict[int, list[tuple[str, ServerInfo]]] = {}
    for peer, info in servers:
        for position in range(max(info.start_block, start), min(info.end_block, end)):
            holders.setdefault(position, []).append((peer, info))
    best = {(start, ""): 0.0}
    came: dict[tuple[int, str], tuple[int, str]] = {}
    queue = [(0.0, start, "")]
    while queue:
        cost, position, previous = heapq.heappop(queue)
        if position == end:
            chain, state = [], (position, previous)
            while state in came:
                before = came[state]
                chain.append(RouteSpan(state[1], before[0], state[0]))
                state = before
            return chain[::-1]
        if cost > best.get((position, previous), float("inf")):
            continue
        for peer, info in holders.get(position, ()):
            if peer == previous:
                continue
            pings = snapshot.servers[previous].pings if previous else rtts
            rtt = pings.get(peer, UNKNOWN_RTT)
            target = min(info.end_block, end)
            rps = info.inference_rps if info.inference_rps > 0 else info.throughput
            compute = (target - position) / rps if rps > 0 else UNKNOWN_RTT
            penalty = CACHE_PENALTY if info.cache_tokens_left < cache_tokens_needed else 0.0
            total = cost + rtt / 2 + HOP_OVERHEAD + compute + penalty
            if total < best.get((target, peer), float("inf")):
                best[(target, peer)] = total
                came[(target, peer)] = (position, previous)
                heapq.heappush(queue, (total, target, peer))
    raise NoRouteError(f"no route over blocks {start}:{end}", missing_blocks=tuple(range(start, end)))


def _best_window(totals: list[float], length: int) -> int:
    return min(range(len(totals) - length + 1), key=lambda first: (sorted(totals[first : first + length]), first))


def _totals(spans: dict[str, tuple[int, int, float]], num_blocks: int) -> list[float]:
    totals = [0.0] * num_blocks
    for start, end, throughput in spans.values():
        for index in range(start, end):
            totals[index] += throughput
    return totals


def should_move(
    snapshot: SwarmSnapshot, own: str, span: tuple[int, int], throughput: float, rng: random.Random,
    max_others: int | None = None,
) -> tuple[int, int] | None:  # fmt: skip
    """Where this server should move under the original rule, or None. ``max_others``: re-place at most that many
    other servers per pass (a swarm of a thousand takes seconds per full pass)."""
    active = (ServerState.ONLINE, ServerState.JOINING)
    others = {peer: (info.start_block, info.end_block, max(info.throughput, 1e-3))
              for peer, info in snapshot.servers.items() if peer != own and info.state in active}  # fmt: skip
    length, num_blocks = span[1] - span[0], snapshot.num_blocks
    before = _totals({**others, own: (*span, throughput)}, num_blocks)
    without = _totals(others, num_blocks)
    if any(without[index] <= 0 for index in range(*span)):
        return None  # leaving would empty a block
    first = _best_window(without, length)
    placed = {**others, own: (first, first + length, throughput)}
    order = sorted(others)
    rng.shuffle(order)
    if max_others is not None:
        order = order[:max_others]
    totals = _totals(placed, num_blocks)
    for _ in range(MAX_PASSES):
        changed = False
        for peer in order:
            start, end, peer_throughput = placed[peer]
            for index in range(start, end):
                totals[index] -= peer_throughput
            better = start
            if all(totals[index] > 0 for index in range(start, end)):
                better = _best_window(totals, end - start)
            placed[peer] = (better, better + end - start, peer_throughput)
            for index in range(better, better + end - start):
                totals[index] += peer_throughput
            changed = changed or better != start
        if not changed:
            break
    old, new = min(before), min(totals)
    if new > 0 and old / new < BALANCE_QUALITY and (first, first + length) != tuple(span):
        return first, first + length
    return None
