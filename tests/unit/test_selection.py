from petals_cli.server.placement import parse_placement
from petals_cli.server.selection import block_throughputs, choose_span, rebalance
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot


def server(start, end, throughput=10.0, state=ServerState.ONLINE):
    return ServerInfo(state=state, start_block=start, end_block=end, version="t", throughput=throughput)


def snapshot(num_blocks, **servers):
    return SwarmSnapshot(prefix="m", num_blocks=num_blocks, servers=servers)


def test_block_throughputs_sum_active_servers_and_can_leave_one_out():
    swarm = snapshot(4, a=server(0, 2, 10), b=server(1, 4, 5), c=server(0, 4, 7, state=ServerState.OFFLINE))
    assert block_throughputs(swarm) == [10, 15, 5, 5]
    assert block_throughputs(swarm, exclude="a") == [0, 5, 5, 5]


def test_ties_go_to_the_leftmost_window():
    assert choose_span([0.0] * 8, 4) == (0, 4)


def test_choose_span_covers_the_weakest_blocks():
    assert choose_span([5, 5, 0, 0, 5, 5], 2) == (2, 4)
    assert choose_span([5, 1, 5, 5, 0, 5], 3) in {(2, 5), (3, 6)}  # must contain block 4, the weakest
    assert choose_span([5, 5, 5], 10) == (0, 3)


def test_two_servers_with_num_blocks_on_an_empty_swarm_cover_different_blocks():
    first = choose_span(block_throughputs(snapshot(6)), 3)
    joining = server(*first, state=ServerState.JOINING)  # announced as soon as chosen, before loading
    second = choose_span(block_throughputs(snapshot(6, a=joining)), 3)
    assert set(range(*first)).isdisjoint(range(*second))


def test_a_replica_moves_to_cover_a_dead_servers_gap():
    # a and c hold 0:2; the server of 2:4 is gone.
    swarm = snapshot(4, a=server(0, 2), c=server(0, 2))
    decision = rebalance(swarm, "c", (0, 2), 10.0, balance_quality=0.15)
    assert decision.move and decision.new_span == (2, 4)
    assert decision.min_before == 0 and decision.min_after == 10


def test_never_move_when_leaving_would_open_a_gap():
    swarm = snapshot(4, a=server(0, 2))  # a alone holds 0:2, and 2:4 is a gap
    decision = rebalance(swarm, "a", (0, 2), 10.0, balance_quality=0.15)
    assert not decision.move


def test_small_improvements_are_not_worth_a_move():
    swarm = snapshot(4, a=server(0, 2, 10), b=server(2, 4, 9), c=server(0, 2, 1), d=server(2, 4, 1))
    assert not rebalance(swarm, "c", (0, 2), 1.0, balance_quality=0.15).move
    assert not rebalance(swarm, "a", (0, 2), 10.0, balance_quality=0.15).move  # would open... or not help


def test_parse_placement():
    assert parse_placement("auto", 8) == (None, None)
    assert parse_placement("", 8) == (None, None)
    assert parse_placement("3", 8) == (None, 3)
    assert parse_placement("2:5", 8) == ((2, 5), None)
