"""The swarm simulator: its timing against arithmetic from the device model, and that its decisions are the real
code's (placement, failover with the ban list, batching by the engine's planner, rebalancing, the baseline's herd)."""

from __future__ import annotations

import pytest

from petals_cli import routing, verify
from petals_cli.testing import petals_rules
from petals_cli.testing.paced import DeviceModel
from petals_cli.testing.sim_policies import idle, ours, petals
from petals_cli.testing.sim_report import hole_seconds, summarize
from petals_cli.testing.simswarm import ClientSpec, Scenario, ServerSpec, Sim
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot

DEVICE = DeviceModel(overhead_ms=10.0, block_ms=5.0, token_ms=1.0, batch_capacity=4)


def scenario(servers, clients, **fields) -> Scenario:
    base = dict(num_blocks=4, servers=tuple(servers), clients=tuple(clients), duration=60.0, prompt_tokens=4,
                new_tokens=8, hop_seconds=0.002, client_seconds=0.003, balance_period=0.0)  # fmt: skip
    return Scenario(**{**base, **fields})


def test_one_session_steps_as_the_device_model_says():
    servers = [ServerSpec("a", DEVICE, 2, fixed_span=(0, 2)), ServerSpec("b", DEVICE, 2, fixed_span=(2, 4))]
    clients = [ClientSpec("c", sessions=1, start_at=5.0)]
    run = Sim(scenario(servers, clients, duration=5.9), ours(scenario(servers, clients)), seed=1).run()
    first = run.generations[0]
    assert len(first.times) == 8 and [hop[0][-1] for hop in first.route] == ["a", "b"]
    # one token: client -> a -> b -> client (3 hops of 2 ms), 2 blocks on each, the client's 3 ms
    step = 3 * 0.002 + 2 * (0.010 + 2 * (0.005 + 0.001)) + 0.003
    gaps = [later - earlier for earlier, later in zip(first.times, first.times[1:], strict=False)]
    assert gaps == pytest.approx([step] * 7, abs=1e-9)
    prompt = 3 * 0.002 + 2 * (0.010 + 2 * (0.005 + 0.004)) + 0.003
    assert first.times[0] - first.started == pytest.approx(prompt, abs=1e-9)


def test_sessions_on_one_server_are_batched_by_the_engines_planner():
    servers = [ServerSpec("a", DEVICE, 4, fixed_span=(0, 4))]
    clients = [ClientSpec("c", sessions=3, start_at=5.0)]
    sim = Sim(scenario(servers, clients), ours(scenario(servers, clients)), seed=1)
    sim.run()
    server = sim.servers["a"]
    assert server.largest_batch >= 2 and server.calls < server.steps
    solo = DEVICE.seconds(4, 1)
    assert server.busy_seconds < server.steps * solo  # a batch costs little more than one step


def test_servers_joining_one_after_another_place_themselves_with_the_real_placement():
    servers = [ServerSpec(f"s{number}", DEVICE, 2, start_at=5.0 * number) for number in range(4)]
    run = Sim(scenario(servers, []), ours(scenario(servers, [])), seed=3).run()
    spans = run.spans[-1][1]
    assert sorted((start, end) for start, end, _ in spans.values()) == [(0, 2), (0, 2), (2, 4), (2, 4)]
    assert {state for _, _, state in spans.values()} == {"online"}


def test_a_crashed_server_is_failed_over_and_banned():
    servers = [
        ServerSpec("a", DEVICE, 2, fixed_span=(0, 2)),
        ServerSpec("b", DEVICE, 2, fixed_span=(2, 4), stop_at=5.3, crash=True),
        ServerSpec("b2", DeviceModel(50.0, 20.0, 1.0, 4), 2, fixed_span=(2, 4)),  # slower: routes avoid it first
    ]
    clients = [ClientSpec("c", sessions=1, start_at=5.0)]
    sim = Sim(scenario(servers, clients, new_tokens=200), ours(scenario(servers, clients)), seed=1)
    run = sim.run()
    first = run.generations[0]
    assert first.failovers >= 1 and len(first.times) == 200 and not first.error
    assert [hop[0].rsplit("-", 1)[1] for hop in first.route] == ["a", "b2"]
    dead = sim.servers["b"].peer_id
    assert dead in sim.clients["c"].silent  # its ping went unanswered: no route through it until it answers


def test_a_server_moves_into_a_gap_left_by_one_that_left():
    servers = [
        ServerSpec("a", DEVICE, 2, start_at=0.0),
        ServerSpec("b", DEVICE, 2, start_at=5.0, stop_at=100.0, crash=False),
        ServerSpec("c", DEVICE, 2, start_at=10.0),
    ]
    fields = dict(duration=300.0, balance_period=20.0)
    run = Sim(scenario(servers, [], **fields), ours(scenario(servers, [], **fields)), seed=2).run()
    assert run.moves and run.moves[0][0] > 100.0
    assert hole_seconds(run, 101.0)[1] <= 30.0  # a gap closes within about one check period
    covered = {block for start, end, state in run.spans[-1][1].values() for block in range(start, end)}
    assert covered == {0, 1, 2, 3}


def test_the_baseline_herds_where_ours_spreads():
    """Ten clients deciding at once from one snapshot: the original rules send all to the fastest server; ours
    spreads them (live load, this client's placements, random spread)."""
    fast = ServerInfo(ServerState.ONLINE, 0, 4, "1", inference_rps=100.0, throughput=100.0, batch_capacity=4,
                      cache_tokens_left=10_000)  # fmt: skip
    near = ServerInfo(ServerState.ONLINE, 0, 4, "1", inference_rps=90.0, throughput=90.0, batch_capacity=4,
                      cache_tokens_left=10_000)  # fmt: skip
    snapshot = SwarmSnapshot("m", 4, {"fast": fast, "near": near})
    rtts = {"fast": 0.01, "near": 0.01}
    theirs = {petals_rules.route(snapshot, 0, 4, rtts=rtts)[0].peer_id for _ in range(10)}
    import random

    rng = random.Random(0)
    placed: dict[str, int] = {}
    mine = set()
    for _ in range(10):
        chosen = routing.inference_route(snapshot, 0, 4, rtts=rtts, push=True, placed=placed, rng=rng)[0].peer_id
        placed[chosen] = placed.get(chosen, 0) + 1
        mine.add(chosen)
    assert theirs == {"fast"} and mine == {"fast", "near"}


def test_policies_run_the_same_swarm_and_report():
    servers = [ServerSpec(f"s{number}", DEVICE, 2, start_at=2.0 * number) for number in range(6)]
    clients = [ClientSpec(f"c{number}", sessions=4, start_at=15.0) for number in range(2)]
    base = scenario(servers, clients, duration=60.0, balance_period=20.0)
    reports = {}
    for policy in (ours(base), idle(base), petals(base)):
        reports[policy.name] = summarize(Sim(base, policy, seed=5).run(), started=15.0)
    for report in reports.values():
        assert report["tokens_s"] > 0 and report["bound_tokens_s"] > 0 and report["route_decisions"] > 0
        assert report["failed_generations"] == 0


def test_one_shared_core_bounds_the_tokens():
    servers = [ServerSpec("a", DeviceModel(0.0, 0.001, 0.0, 8), 4, fixed_span=(0, 4))]
    clients = [ClientSpec("c", sessions=4, start_at=1.0)]
    base = scenario(servers, clients, duration=21.0, hop_seconds=0.0, client_seconds=0.0, cores=1,
                    client_cpu_s=0.05, server_cpu_s=0.0)  # fmt: skip
    report = summarize(Sim(base, ours(base), seed=1).run(), started=1.0)
    assert report["tokens_s"] == pytest.approx(20.0, rel=0.05)  # one core, 50 ms of client work per token


def _info(start, end, throughput=10.0):
    return ServerInfo(ServerState.ONLINE, start, end, "1", throughput=throughput, inference_rps=throughput)


def test_the_original_rule_moves_when_the_swarm_would_gain_a_third_and_never_opens_a_gap():
    import random

    # blocks 4:8 held by one server, 0:4 by three: one of those three moving there raises the weakest block 10 -> 20
    swarm = {"a": _info(0, 4), "b": _info(0, 4), "c": _info(0, 4), "d": _info(4, 8)}
    snapshot = SwarmSnapshot("m", 8, swarm)
    assert petals_rules.should_move(snapshot, "a", (0, 4), 10.0, random.Random(0)) == (4, 8)
    alone = SwarmSnapshot("m", 8, {"a": _info(0, 4), "d": _info(4, 8)})
    assert petals_rules.should_move(alone, "a", (0, 4), 10.0, random.Random(0)) is None  # 0:4 would be empty
    even = SwarmSnapshot("m", 8, {"a": _info(0, 4), "b": _info(0, 4), "c": _info(4, 8), "d": _info(4, 8)})
    assert petals_rules.should_move(even, "a", (0, 4), 10.0, random.Random(0)) is None


def test_the_machine_costs_are_measured_from_the_runs_cpu_counters():
    from pathlib import Path

    from petals_cli.testing.scale import ScaleRun, ScaleSettings
    from petals_cli.testing.sim_validate import measured
    from petals_cli.testing.soak_records import Peer

    settings = ScaleSettings(servers=3, sessions=1, clients=1, layers=4, mix=(("fast", 1),))
    run = ScaleRun(settings, started=0.0, killed_at=240.0, ended=300.0)
    samples = [{"at": 60.0, "cpu_s": 10.0, "p2pd_cpu_s": 1.0}, {"at": 240.0, "cpu_s": 28.0, "p2pd_cpu_s": 3.0}]
    client = Peer("client0", "client", 0, None, Path("c.log"), 0.0, samples=samples)
    server_samples = [{"at": 60.0, "cpu_s": 5.0}, {"at": 240.0, "cpu_s": 41.0}]
    server = Peer("server0", "server", 0, None, Path("s.log"), 0.0, samples=server_samples)
    run.peers = [client, server]
    run.records = [{"kind": "generation", "times": [60.0 + 0.9 * index for index in range(200)]}]
    run.meters = {"server0": [{"at": 60.0, "rows": 100}, {"at": 240.0, "rows": 1000}]}
    costs = measured(run)
    assert costs["tokens"] == 200 and costs["client_cpu_s"] == 20.0 and costs["server_cpu_s"] == 36.0
    assert costs["client_cpu_per_token_s"] == pytest.approx(0.1) and costs["server_cpu_per_row_s"] == pytest.approx(
        0.04
    )


def test_a_liar_is_caught_about_as_verify_checks_needed_predicts_and_never_used_again():
    liar = DeviceModel(overhead_ms=5.0, block_ms=2.0, token_ms=1.0, batch_capacity=4)  # the fastest: routes want it
    servers = [
        ServerSpec("liar", liar, 4, fixed_span=(0, 4), tamper=0.3),
        ServerSpec("honest1", DEVICE, 4, fixed_span=(0, 4)),
        ServerSpec("honest2", DEVICE, 4, fixed_span=(0, 4)),
    ]
    clients = [ClientSpec(f"c{number}", sessions=1, start_at=1.0) for number in range(40)]
    base = scenario(servers, clients, duration=40.0, new_tokens=64, check_rate=0.2)
    sim = Sim(base, ours(base), seed=4)
    run = sim.run()
    report = summarize(run, started=1.0)
    assert report["liar_steps_needed_95"] == verify.checks_needed(0.2, 0.3)
    assert report["liar_catches"] > 10 and report["liar_sessions_judged"] > 10
    assert report["liar_caught_within_needed"] >= 0.9  # the 95% prediction, with room for 40-odd samples
    liar_id = sim.servers["liar"].peer_id
    for client in sim.clients.values():
        if liar_id in client.bans.forever:  # a client that caught it routes no later session through it
            caught_at = client.name
            later = [record for record in run.generations if record.client == caught_at and record.started > 30.0]
            assert all(liar_id not in {hop[0] for hop in record.route} for record in later)


def test_generations_in_progress_at_the_end_are_all_recorded():
    servers = [ServerSpec("a", DEVICE, 4, fixed_span=(0, 4))]
    clients = [ClientSpec("c", sessions=6, start_at=1.0)]
    base = scenario(servers, clients, duration=3.0, new_tokens=1000)
    run = Sim(base, ours(base), seed=1).run()
    assert len(run.generations) == 6 and all(record.times for record in run.generations)
