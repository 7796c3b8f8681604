"""Moving an open session: whether one span of it should be rebuilt on a faster route, mid-session.

Pure, like ``routing`` (whose costs it compares): ``faster_route`` is the one decision, made by the client
(``SwarmClient.faster_elsewhere``) and by the simulator (``testing.sim_clients``). A session leaves a server whose
next step is expected to take over ``MOVE_FACTOR`` times and ``MOVE_MIN_GAIN`` seconds longer than another route's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from petals_cli.errors import NoRouteError
from petals_cli.routing import DEFAULT_RTT, RouteSpan, expected_step_seconds, inference_route, route_seconds
from petals_cli.wire import ServerInfo, SwarmSnapshot

MOVE_FACTOR = 2.0  # a session leaves a server whose next step is expected to take this many times longer elsewhere
MOVE_MIN_GAIN = 0.05  # ... and at least this many seconds longer (milliseconds are not worth rebuilding a cache)


def staying_seconds(info: ServerInfo, span: RouteSpan, rtt: float, num_blocks: int = 0) -> float:
    """Expected seconds of the next step of a session already open on ``span``'s server (described by ``info``):
    that server's open sessions include this one, which ``expected_step_seconds`` would count twice."""
    mine_removed = replace(info, sessions=max(0, info.sessions - 1))
    return rtt + expected_step_seconds(mine_removed, span.end - span.start, num_blocks=num_blocks)


def worth_moving(staying: float, elsewhere: float) -> bool:
    """Whether a session whose next step is expected to take ``staying`` seconds where it is should move to a route
    expected to take ``elsewhere``: more than ``MOVE_FACTOR`` times and ``MOVE_MIN_GAIN`` seconds faster."""
    return staying > MOVE_FACTOR * elsewhere and staying - elsewhere > MOVE_MIN_GAIN


@dataclass(frozen=True)
class Move:
    """A faster route for one span of an open session: expected seconds of its next step where it is and there."""

    route: list[RouteSpan]
    staying: float
    elsewhere: float


def faster_route(
    snapshot: SwarmSnapshot,
    span: RouteSpan,
    *,
    rtts: Mapping[str, float],
    banned: Collection[str],
    cache_tokens_needed: int = 0,
    adapter: str = "",
    placed: Mapping[str, int] | None = None,
    search: Callable[..., list[RouteSpan]] | None = None,
) -> Move | None:
    """The mid-session move check (the client's and the simulator's): the best route over ``span``'s blocks avoiding
    ``banned`` (which should hold ``span``'s own server), when ``worth_moving`` from where the session is; None when
    not, when no route exists, or when ``snapshot`` does not describe ``span``'s server. ``snapshot`` carries the live
    load; ``placed``: as for ``inference_route``; ``search``: ``inference_route`` or a wrapper of it (the simulator
    times its searches)."""
    info = snapshot.servers.get(span.peer_id)
    if info is None:
        return None
    staying = staying_seconds(info, span, rtts.get(span.peer_id, DEFAULT_RTT), snapshot.num_blocks)
    if staying <= MOVE_MIN_GAIN:
        return None  # no route could save enough: skip the search
    try:
        route = (search or inference_route)(
            snapshot,
            span.start,
            span.end,
            rtts=rtts,
            banned=banned,
            cache_tokens_needed=cache_tokens_needed,
            adapter=adapter,
            placed=placed,
        )
    except NoRouteError:
        return None
    elsewhere = route_seconds(snapshot, route, rtts=rtts, placed=placed)
    return Move(route, staying, elsewhere) if worth_moving(staying, elsewhere) else None
