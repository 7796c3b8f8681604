import dataclasses
import random
from collections import Counter

import pytest

from petals_cli.errors import ModelNotServedError, NoRouteError
from petals_cli.routing import BanList, format_blocks, inference_route, training_route
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot


def server(start, end, *, state=ServerState.ONLINE, rps=0.0, cache=10_000):
    return ServerInfo(
        state=state,
        start_block=start,
        end_block=end,
        version="test",
        inference_rps=rps,
        forward_rps=rps,
        cache_tokens_left=cache,
    )


def snapshot(num_blocks, **servers):
    return SwarmSnapshot(prefix="m", num_blocks=num_blocks, servers=servers)


def spans(route):
    return [(span.peer_id, span.start, span.end) for span in route]


@pytest.mark.parametrize("route_function", [inference_route, training_route])
def test_chain_of_uneven_spans_covers_every_block_in_order(route_function):
    route = route_function(snapshot(6, a=server(0, 1), b=server(1, 4), c=server(4, 6)))
    assert spans(route) == [("a", 0, 1), ("b", 1, 4), ("c", 4, 6)]


def test_overlapping_spans_prefer_fewer_hops_and_use_sub_spans():
    route = inference_route(snapshot(8, a=server(0, 3), b=server(0, 5), c=server(2, 8), d=server(5, 8)))
    assert len(route) == 2
    assert route[0].start == 0 and route[-1].end == 8
    assert all(left.end == right.start for left, right in zip(route, route[1:], strict=False))


def test_inference_prefers_the_replica_with_the_lower_round_trip():
    swarm = snapshot(4, near=server(0, 4), far=server(0, 4))
    assert spans(inference_route(swarm, rtts={"near": 0.001, "far": 0.2})) == [("near", 0, 4)]
    assert spans(inference_route(swarm, rtts={"near": 0.3, "far": 0.2})) == [("far", 0, 4)]


def test_inference_weighs_compute_against_an_extra_hop():
    # One slow server holding everything vs two fast ones: two fast hops win when compute dominates.
    swarm = snapshot(8, slow=server(0, 8, rps=1.0), fast1=server(0, 4, rps=1000.0), fast2=server(4, 8, rps=1000.0))
    assert [peer for peer, *_ in spans(inference_route(swarm, rtts=dict.fromkeys(swarm.servers, 0.01)))] == [
        "fast1",
        "fast2",
    ]


def test_pushed_routes_follow_the_round_trips_servers_publish_between_them():
    # Two replicas of the second half, equally close to the client: only the first server's pings tell them apart.
    swarm = snapshot(
        4,
        a=dataclasses.replace(server(0, 2, rps=1000.0), pings={"near": 0.002, "far": 0.3}),
        near=server(2, 4, rps=1000.0),
        far=server(2, 4, rps=1000.0),
    )
    rtts = {"a": 0.05, "near": 0.05, "far": 0.04}
    assert spans(inference_route(swarm, rtts=rtts, push=True)) == [("a", 0, 2), ("near", 2, 4)]
    # relayed through the client, the server-to-server round trip does not matter: the client's does
    assert spans(inference_route(swarm, rtts=rtts)) == [("a", 0, 2), ("far", 2, 4)]


def test_a_pushed_chain_costs_one_way_trips_so_an_extra_hop_costs_less_than_relayed():
    # one slower server holding everything vs two faster ones: with push the second hop costs half a round trip
    swarm = snapshot(8, one=server(0, 8, rps=100.0), half1=server(0, 4, rps=300.0), half2=server(4, 8, rps=300.0))
    rtts = dict.fromkeys(swarm.servers, 0.06)
    assert [span.peer_id for span in inference_route(swarm, rtts=rtts)] == ["one"]  # 0.140 s vs 0.147 s relayed
    assert [span.peer_id for span in inference_route(swarm, rtts=rtts, push=True)] == ["half1", "half2"]  # 0.127 s


def test_servers_without_cache_room_are_skipped():
    swarm = snapshot(4, full=server(0, 4, cache=10), roomy=server(0, 4, cache=1000))
    assert spans(inference_route(swarm, rtts={"full": 0.001}, cache_tokens_needed=100)) == [("roomy", 0, 4)]
    with pytest.raises(NoRouteError, match="full"):
        inference_route(swarm, cache_tokens_needed=5000)


def test_training_spreads_over_replicas_by_throughput():
    swarm = snapshot(4, strong=server(0, 4, rps=300.0), weak=server(0, 4, rps=100.0))
    rtts = dict.fromkeys(swarm.servers, 0.0)
    chosen = Counter(training_route(swarm, rtts=rtts, rng=random.Random(seed))[0].peer_id for seed in range(400))
    assert chosen["strong"] > chosen["weak"] > 40


def test_gap_raises_no_route_naming_the_missing_blocks():
    with pytest.raises(NoRouteError) as raised:
        inference_route(snapshot(8, a=server(0, 2), b=server(5, 8)))
    assert raised.value.missing_blocks == (2, 3, 4)
    assert "2:5" in str(raised.value)


def test_offline_and_banned_servers_are_not_used():
    with pytest.raises(NoRouteError):
        inference_route(snapshot(4, a=server(0, 2), b=server(2, 4, state=ServerState.OFFLINE)))
    assert spans(inference_route(snapshot(4, a=server(0, 4), b=server(0, 4)), banned={"a"})) == [("b", 0, 4)]
    with pytest.raises(NoRouteError):
        training_route(snapshot(4, a=server(0, 4)), banned={"a"})


def test_no_servers_at_all_is_model_not_served():
    with pytest.raises(ModelNotServedError):
        inference_route(snapshot(4))


def test_partial_range():
    assert spans(inference_route(snapshot(8, a=server(0, 8)), 3, 6)) == [("a", 3, 6)]


def test_format_blocks():
    assert format_blocks([0, 1, 2, 5, 7, 8]) == "0:3, 5, 7:9"


def test_bans_back_off_exponentially_and_success_clears_them():
    bans = BanList(base_seconds=1.0, max_seconds=5.0)
    assert bans.ban("a", now=100.0) == 1.0
    assert bans.banned(now=100.5) == {"a"}
    assert bans.banned(now=101.5) == set()
    assert bans.ban("a", now=102.0) == 2.0
    assert bans.ban("a", now=105.0) == 4.0
    assert bans.ban("a", now=110.0) == 5.0  # capped
    bans.succeed("a")
    assert bans.banned(now=110.1) == set()
    assert bans.ban("a", now=111.0) == 1.0


@pytest.mark.parametrize("route_function", [inference_route, training_route])
def test_an_adapter_routes_only_through_servers_that_announce_it(route_function):
    import dataclasses

    fast = server(0, 4, rps=1000.0)
    lora = dataclasses.replace(server(0, 2), adapters=("lora", "other"))
    lora_tail = dataclasses.replace(server(2, 4), adapters=("lora",))
    swarm = snapshot(4, fast=fast, a=lora, b=lora_tail)
    assert spans(route_function(swarm, adapter="lora")) == [("a", 0, 2), ("b", 2, 4)]
    assert spans(route_function(swarm)) == [("fast", 0, 4)]
    with pytest.raises(NoRouteError, match="has the adapter 'missing'"):
        route_function(swarm, adapter="missing")
    with pytest.raises(NoRouteError, match="blocks 2:4"):
        route_function(snapshot(4, fast=fast, a=lora), adapter="other")


def _random_swarm(rng: random.Random, servers: int, num_blocks: int) -> tuple[SwarmSnapshot, dict[str, float]]:
    found, rtts = {}, {}
    for number in range(servers):
        length = rng.choice((4, 8, 16))
        start = (0, num_blocks - length)[number] if number < 2 else rng.randrange(0, num_blocks - length + 1)
        info = server(start, start + length, rps=rng.choice((20.0, 50.0, 200.0)))
        found[f"peer{number:03d}"] = dataclasses.replace(info, sessions=rng.randrange(0, 6), batch_capacity=4)
        rtts[f"peer{number:03d}"] = rng.choice((0.01, 0.05, 0.15))
    return SwarmSnapshot("m", num_blocks, found), rtts


@pytest.mark.parametrize("push", [False, True])
def test_large_swarms_search_few_servers_per_block_and_lose_little(monkeypatch, push):
    """Beyond MAX_HOLDERS servers per block the search keeps the cheapest per block and changes servers only where
    a hop ends where a kept span starts or ends: routes nearly as cheap as the exact search's."""
    from petals_cli import routing

    ratios = []

    for seed in range(8):
        snapshot, rtts = _random_swarm(random.Random(seed), 80, 32)
        pruned = inference_route(snapshot, rtts=rtts, push=push)
        with monkeypatch.context() as patched:
            patched.setattr(routing, "MAX_HOLDERS", 10_000)
            exact = inference_route(snapshot, rtts=rtts, push=push)
        assert [span.start for span in pruned][0] == 0 and pruned[-1].end == 32
        assert all(a.end == b.start for a, b in zip(pruned, pruned[1:], strict=False))
        assert len({span.peer_id for span in exact}) <= len(exact)
        if not push:
            ratios.append(
                routing.route_seconds(snapshot, pruned, rtts=rtts) / routing.route_seconds(snapshot, exact, rtts=rtts)
            )
    assert push or (max(ratios) <= 1.15 and sum(ratios) / len(ratios) <= 1.05)
