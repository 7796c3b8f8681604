import dataclasses
import random

from petals_cli.server.placement import parse_placement
from petals_cli.server.selection import block_throughputs, choose_span, earlier_claims, rebalance
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


def test_a_joining_server_without_a_figure_counts_as_a_typical_one_and_a_mover_counts_where_it_goes():
    joining = server(2, 4, throughput=0.0, state=ServerState.JOINING)
    swarm = snapshot(4, a=server(0, 4, 10), b=server(0, 2, 30), c=joining)
    assert block_throughputs(swarm) == [40, 40, 30, 30]  # c counts as the median announced figure, 20
    mover = dataclasses.replace(server(0, 2, 10), moving_to=(2, 4))
    assert block_throughputs(snapshot(4, a=server(0, 4, 10), m=mover)) == [10, 10, 20, 20]


def per_block_servers(servers: dict, num_blocks: int) -> list[int]:
    return [round(total / 10) for total in block_throughputs(snapshot(num_blocks, **servers))]


def test_a_crowded_span_moves_into_many_equally_weak_blocks_though_the_minimum_stays_the_same():
    # The swarm the issue found after 12 joiners at once: 13 servers on 0:6, 5 on 6:12, 3 on each of 12:24.
    servers = {f"s{index}": server(0, 6) for index in range(13)}
    servers |= {f"t{index}": server(6, 12) for index in range(5)}
    servers |= {f"u{index}": server(12, 24, 10) for index in range(3)}
    decision = rebalance(snapshot(24, **servers), "s0", (0, 6), 10.0, balance_quality=0.15)
    assert decision.min_after == decision.min_before == 30  # the old rule (the minimum must rise) moved nobody
    assert decision.move and decision.new_span[0] >= 12 and decision.weakest_change == (30, 40)


def settle(servers: dict, num_blocks: int, quality: float = 0.15, rounds: int = 100) -> tuple[dict, list]:
    """Servers check one after another (as jittered periods make them) until nobody wants to move."""
    moves = []
    for _ in range(rounds):
        moved = False
        for peer in sorted(servers):
            info = servers[peer]
            span = (info.start_block, info.end_block)
            decision = rebalance(snapshot(num_blocks, **servers), peer, span, info.throughput, balance_quality=quality)
            if decision.move:
                before = sorted(block_throughputs(snapshot(num_blocks, **servers)))
                servers[peer] = dataclasses.replace(
                    info, start_block=decision.new_span[0], end_block=decision.new_span[1]
                )
                assert sorted(block_throughputs(snapshot(num_blocks, **servers))) > before  # strictly better
                moves.append((peer, span, decision.new_span))
                moved = True
        if not moved:
            return servers, moves
    raise AssertionError(f"still moving after {rounds} rounds: {moves[-10:]}")


def test_rebalancing_one_at_a_time_converges_to_an_even_swarm_and_no_server_goes_back():
    servers = {f"s{index}": server(0, 6) for index in range(13)}
    servers |= {f"t{index}": server(6, 12) for index in range(5)}
    servers |= {f"u{index}": server(12, 18) for index in range(3)} | {
        f"v{index}": server(18, 24) for index in range(3)
    }
    settled, moves = settle(servers, 24)
    assert per_block_servers(settled, 24) == [6] * 24  # 24 servers of 6 blocks: 6 on every block
    assert len({peer for peer, _, _ in moves}) == len(moves) == 7  # 7 of the 13 on 0:6 moved, each once
    returned = [(peer, old) for peer, old, new in moves if (peer, new) in {(p, o) for p, o, _ in moves}]
    assert not returned  # nobody moved back to a span it had left


def test_mixed_speeds_settle_without_cycles():
    rng = random.Random(7)
    for _ in range(20):
        servers = {}
        for index in range(rng.randint(4, 16)):
            length = rng.randint(2, 6)
            start = rng.randint(0, 12 - length)
            servers[f"p{index}"] = server(start, start + length, rng.choice([1.0, 3.0, 10.0, 25.0]))
        settle(servers, 12)  # raises if the swarm keeps moving


def test_a_balance_change_below_the_threshold_moves_nobody():
    # b on 2:4 is slower than a on 0:2; moving c (1.5) from 0:2 to 2:4 raises block 2..3's figure 10 -> 11.5 (+15%)
    swarm = snapshot(4, a=server(0, 2, 12), b=server(2, 4, 10), c=server(0, 2, 1.5))
    assert not rebalance(swarm, "c", (0, 2), 1.5, balance_quality=0.2).move
    decision = rebalance(swarm, "c", (0, 2), 1.5, balance_quality=0.1)
    assert decision.move and decision.new_span == (2, 4) and decision.weakest_change == (10, 11.5)


def test_joiners_that_chose_the_same_gap_at_once_settle_on_different_blocks():
    # Twelve 6-block servers tile a 24-block model twice; twelve more read the swarm at the same moment.
    base = {f"b{index}": server(6 * (index % 4), 6 * (index % 4) + 6) for index in range(8)}
    joiners = {f"j{index:02d}": 0 for index in range(12)}
    first = choose_span(block_throughputs(snapshot(24, **base)), 6)
    claims = {peer: first for peer in joiners}  # each read the same swarm: all claimed the same span
    for _ in range(len(joiners) + 1):  # each round: every joiner reads again, counting earlier claims only
        swarm = snapshot(24, **base, **{p: claim(*span, at=100.0) for p, span in claims.items()})
        chosen = {p: choose_span(block_throughputs(earlier_claims(swarm.without({p}), 100.0, p)), 6) for p in claims}
        if chosen == claims:
            break
        claims = chosen
    final = snapshot(24, **base, **{p: claim(*span, at=100.0) for p, span in claims.items()})
    assert [round(total / 10) for total in block_throughputs(final)] == [5] * 24  # 20 servers x 6 blocks / 24


def claim(start, end, at):
    return ServerInfo(state=ServerState.JOINING, start_block=start, end_block=end, version="t", claimed_at=at)


def test_earlier_claims_keeps_older_claims_ties_by_peer_id_and_servers_that_announce_no_claim_time():
    swarm = snapshot(
        8,
        early=claim(0, 4, at=5.0),
        tie_a=claim(0, 4, at=6.0),
        tie_c=claim(0, 4, at=6.0),
        late=claim(0, 4, at=7.0),
        old=claim(4, 8, at=0.0),
        online=server(4, 8),
    )
    assert set(earlier_claims(swarm, 6.0, "tie_b").servers) == {"early", "tie_a", "old", "online"}
