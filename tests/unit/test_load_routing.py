"""The load rule of ``routing.inference_route``: the expected wait at each server (its live load, the sessions this
client placed there since reading it) and the seeded spreading of near-equal routes. Pure: snapshots in, routes out."""

import random
from collections import Counter

import pytest

from petals_cli.moves import faster_route, staying_seconds
from petals_cli.routing import SPREAD, RouteSpan, expected_step_seconds, inference_route, route_seconds, with_live_load
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot

RTTS = {peer: 0.001 for peer in ("busy", "idle", "a", "b", "c", "fast", "slow")}


def server(start=0, end=4, *, rps=100.0, sessions=0, queue=0, step=0.0, capacity=0, cache=10_000):
    return ServerInfo(
        state=ServerState.ONLINE, start_block=start, end_block=end, version="test", inference_rps=rps,
        cache_tokens_left=cache, sessions=sessions, queue_length=queue, step_seconds=step, batch_capacity=capacity,
    )  # fmt: skip


def swarm(**servers):
    return SwarmSnapshot(prefix="m", num_blocks=4, servers=servers)


def peers(route):
    return [span.peer_id for span in route]


def test_an_idle_server_costs_its_idle_step_time():
    assert expected_step_seconds(server(rps=100.0), blocks=4) == pytest.approx(0.04)
    assert expected_step_seconds(server(rps=100.0, capacity=8), blocks=2) == pytest.approx(0.02)


def test_the_expected_step_grows_with_sessions_over_capacity_and_recent_step_time():
    # service = max(4 / 100, 0.2 x 4 / 4) = 0.2 s; 6 sessions on a capacity of 2: x (1 + 6 / 2)
    assert expected_step_seconds(server(sessions=6, step=0.2, capacity=2), blocks=4) == pytest.approx(0.8)
    # part of the span: the recent step time counts in proportion to the blocks used
    assert expected_step_seconds(server(step=0.2, capacity=2), blocks=1) == pytest.approx(0.05)
    # more steps waiting than sessions (forwards, pushes): the queue counts instead
    assert expected_step_seconds(server(sessions=1, queue=3, capacity=1), blocks=4) == pytest.approx(0.04 * 4)
    # sessions this client placed since it read the server count as open ones
    assert expected_step_seconds(server(sessions=1, capacity=2), 4, placed=3) == pytest.approx(0.04 * 3)


def test_a_server_without_load_figures_costs_as_under_the_idle_rule():
    old = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=4, version="old", inference_rps=50.0)
    assert expected_step_seconds(old, 4) == pytest.approx(4 / 50.0)
    assert peers(inference_route(swarm(a=old), rtts=RTTS)) == ["a"]


def test_a_faster_replica_kept_busy_loses_new_sessions_to_an_idle_one_and_the_idle_rule_does_not():
    busy = server(rps=200.0, sessions=6, step=0.05, capacity=1)
    snapshot = swarm(busy=busy, idle=server(rps=100.0, capacity=1))
    assert peers(inference_route(snapshot, rtts=RTTS, rule="idle")) == ["busy"]
    assert peers(inference_route(snapshot, rtts=RTTS)) == ["idle"]
    assert peers(inference_route(snapshot, rtts=RTTS, rng=random.Random(1))) == ["idle"]


def test_sessions_placed_in_a_row_spread_before_the_next_reading():
    """One client opening sessions one after another counts what it placed: they alternate between equal replicas
    instead of all going to the one that looked idle."""
    snapshot = swarm(a=server(capacity=1), b=server(capacity=1), c=server(capacity=1))
    placed: Counter[str] = Counter()
    for _ in range(6):
        (span,) = inference_route(snapshot, rtts=RTTS, placed=placed)
        placed[span.peer_id] += 1
    assert placed == {"a": 2, "b": 2, "c": 2}


def test_spreading_picks_among_near_equal_routes_the_cheaper_more_often_and_never_a_far_dearer_one():
    snapshot = swarm(a=server(rps=100.0), b=server(rps=95.0), slow=server(rps=100.0 / (1 + 2 * SPREAD)))
    rng = random.Random(7)
    chosen = Counter(peers(inference_route(snapshot, rtts=RTTS, rng=rng))[0] for _ in range(400))
    assert chosen["slow"] == 0
    assert chosen["a"] > chosen["b"] > 50
    # without an rng (or under the idle rule) the choice is the cheapest, every time
    assert {peers(inference_route(snapshot, rtts=RTTS))[0] for _ in range(20)} == {"a"}
    assert {peers(inference_route(snapshot, rtts=RTTS, rule="idle", rng=rng))[0] for _ in range(20)} == {"a"}


def test_the_same_seed_gives_the_same_routes():
    snapshot = swarm(a=server(), b=server(), c=server())
    first = [peers(inference_route(snapshot, rtts=RTTS, rng=random.Random(3)))[0] for _ in range(10)]
    again = [peers(inference_route(snapshot, rtts=RTTS, rng=random.Random(3)))[0] for _ in range(10)]
    assert first == again


def test_live_readings_replace_the_load_but_not_the_span_or_state():
    announced = swarm(a=server(sessions=0), b=server())
    reading = server(start=0, end=2, sessions=5, queue=2, step=0.3, capacity=4, cache=7)
    live = with_live_load(announced, {"a": reading, "gone": reading})
    a = live.servers["a"]
    assert (a.sessions, a.queue_length, a.step_seconds, a.batch_capacity, a.cache_tokens_left) == (5, 2, 0.3, 4, 7)
    assert (a.start_block, a.end_block) == (0, 4) and set(live.servers) == {"a", "b"}


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="routing rule"):
        inference_route(swarm(a=server()), rule="fastest")


def test_a_session_staying_on_its_server_does_not_count_itself_twice_and_a_route_costs_its_hops():
    busy = server(sessions=3, step=0.08, capacity=2)  # 3 sessions open, this one among them
    span = RouteSpan("a", 0, 4)
    assert staying_seconds(busy, span, rtt=0.01) == pytest.approx(0.01 + 0.08 * (1 + 2 / 2))
    assert expected_step_seconds(busy, 4) == pytest.approx(0.08 * (1 + 3 / 2))  # a newcomer would be a 4th
    snapshot = swarm(a=server(0, 2, rps=100.0), b=server(2, 4, rps=50.0))
    route = [RouteSpan("a", 0, 2), RouteSpan("b", 2, 4)]
    seconds = route_seconds(snapshot, route, rtts={"a": 0.01, "b": 0.02}, placed={"b": 1})
    # b's one placed session, on a server of half the model (it spends about half its cycle there): 1 + 1/2 / 1
    assert seconds == pytest.approx((0.01 + 2 / 100) + (0.02 + 2 / 50 * 1.5))


def test_open_sessions_weigh_by_the_share_of_the_model_the_server_holds():
    # a server of 4 blocks of 16 with 8 sessions open: each spends about a quarter of its cycle there, so about 2 are
    # ahead of a new step (capacity 1): 3 steps' time, not 9
    quarter = server(0, 4, sessions=8, step=0.1, capacity=1)
    assert expected_step_seconds(quarter, 4, num_blocks=16) == pytest.approx(0.1 * (1 + 8 / 4))
    assert expected_step_seconds(quarter, 4) == pytest.approx(0.1 * (1 + 8))  # no model size: every session counts
    # the steps waiting now count in full when more
    waiting = server(0, 4, sessions=8, queue=5, step=0.1, capacity=1)
    assert expected_step_seconds(waiting, 4, num_blocks=16) == pytest.approx(0.1 * (1 + 5))
    # the route's choice: a fast server of a quarter of the model with 6 sessions beats an idle one 3 times slower,
    # which it would not if all 6 sessions were counted as waiting there
    fast, slow = server(0, 4, rps=300.0, sessions=6, step=4 / 300, capacity=2), server(0, 4, rps=100.0)
    snapshot = SwarmSnapshot(prefix="m", num_blocks=16, servers={"fast": fast, "slow": slow})
    assert peers(inference_route(snapshot, 0, 4, rtts=RTTS)) == ["fast"]
    whole = SwarmSnapshot(prefix="m", num_blocks=4, servers={"fast": fast, "slow": slow})
    assert peers(inference_route(whole, 0, 4, rtts=RTTS)) == ["slow"]


def test_a_server_where_this_client_holds_its_per_peer_cap_takes_no_more_of_its_sessions():
    from dataclasses import replace

    from petals_cli.errors import NoRouteError
    from petals_cli.routing import at_peer_cap

    fast, slow = server(rps=1000.0), server(rps=10.0)
    capped = replace(fast, sessions_per_peer=2, your_sessions=2)
    for rule in ("load", "idle"):
        assert peers(inference_route(swarm(fast=fast, slow=slow), rtts=RTTS, rule=rule)) == ["fast"]
        assert peers(inference_route(swarm(fast=capped, slow=slow), rtts=RTTS, rule=rule)) == ["slow"]
        # sessions placed since the reading count toward the cap, as they count as load
        one_held = replace(capped, your_sessions=1)
        routes = [
            inference_route(swarm(fast=one_held, slow=slow), rtts=RTTS, rule=rule, placed=p) for p in ({}, {"fast": 1})
        ]
        assert [peers(route) for route in routes] == [["fast"], ["slow"]]
    assert not at_peer_cap(replace(fast, your_sessions=50))  # a server announcing no cap (an older one)
    with pytest.raises(NoRouteError, match="full or excluded"):
        inference_route(swarm(fast=capped), rtts=RTTS)


def test_the_move_check_moves_a_session_off_a_server_that_got_slow_and_only_then():
    span = RouteSpan("busy", 0, 4)
    snapshot = swarm(busy=server(sessions=8, step=0.5, capacity=1), idle=server(rps=100.0))
    move = faster_route(snapshot, span, rtts=RTTS, banned={"busy"})
    assert move is not None and [s.peer_id for s in move.route] == ["idle"]
    assert move.staying == pytest.approx(staying_seconds(snapshot.servers["busy"], span, 0.001))
    assert move.elsewhere == pytest.approx(route_seconds(snapshot, move.route, rtts=RTTS))
    assert faster_route(snapshot, span, rtts=RTTS, banned={"busy", "idle"}) is None  # nowhere else to go
    alike = swarm(busy=server(rps=8.0), idle=server(rps=8.0))  # 0.5 s a step on either: a move gains nothing
    assert faster_route(alike, span, rtts=RTTS, banned={"busy"}) is None
    calm = swarm(busy=server(rps=100.0), idle=server(rps=1000.0))  # 10 times faster, but 41 ms a step here
    assert faster_route(calm, span, rtts=RTTS, banned={"busy"}) is None
    assert faster_route(snapshot, RouteSpan("gone", 0, 4), rtts=RTTS, banned={"gone"}) is None
