import random

import pytest

from petals_cli.errors import ModelNotServedError, NoRouteError
from petals_cli.routing import fewest_hops_route, format_blocks
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot


def snapshot(num_blocks, **spans):
    servers = {
        peer: ServerInfo(
            state=ServerState.OFFLINE if peer.startswith("off") else ServerState.ONLINE,
            start_block=start,
            end_block=end,
            version="test",
        )
        for peer, (start, end) in spans.items()
    }
    return SwarmSnapshot(prefix="m", num_blocks=num_blocks, servers=servers)


def test_chain_of_uneven_spans_covers_every_block_in_order():
    route = fewest_hops_route(snapshot(6, a=(0, 1), b=(1, 4), c=(4, 6)))
    assert [(span.peer_id, span.start, span.end) for span in route] == [("a", 0, 1), ("b", 1, 4), ("c", 4, 6)]


def test_overlapping_spans_use_the_fewest_hops_and_sub_spans():
    route = fewest_hops_route(snapshot(8, a=(0, 3), b=(0, 5), c=(2, 8), d=(5, 8)))
    assert len(route) == 2
    assert route[0].start == 0 and route[-1].end == 8
    assert all(left.end == right.start for left, right in zip(route, route[1:], strict=False))


def test_replicas_are_spread_by_the_random_tie_break():
    chosen = {
        fewest_hops_route(snapshot(4, a=(0, 4), b=(0, 4)), rng=random.Random(seed))[0].peer_id for seed in range(20)
    }
    assert chosen == {"a", "b"}


def test_gap_raises_no_route_naming_the_missing_blocks():
    with pytest.raises(NoRouteError) as raised:
        fewest_hops_route(snapshot(8, a=(0, 2), b=(5, 8)))
    assert raised.value.missing_blocks == (2, 3, 4)
    assert "2:5" in str(raised.value)


def test_offline_and_banned_servers_are_not_used():
    with pytest.raises(NoRouteError):
        fewest_hops_route(snapshot(4, a=(0, 2), off_b=(2, 4)))
    route = fewest_hops_route(snapshot(4, a=(0, 4), b=(0, 4)), banned={"a"})
    assert [span.peer_id for span in route] == ["b"]


def test_no_servers_at_all_is_model_not_served():
    with pytest.raises(ModelNotServedError):
        fewest_hops_route(snapshot(4))


def test_partial_range():
    route = fewest_hops_route(snapshot(8, a=(0, 8)), 3, 6)
    assert [(span.start, span.end) for span in route] == [(3, 6)]


def test_format_blocks():
    assert format_blocks([0, 1, 2, 5, 7, 8]) == "0:3, 5, 7:9"
