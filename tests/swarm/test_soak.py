"""A short soak (``petals_cli.testing.soak``): a small swarm on the emulated WAN, a few faults of every kind, and only
correctness asserted: no wrong token, no crash, no leak beyond a generous bound; never a time. The long run with
the figures is ``benchmarks/soak.py``. Also the soak's own logic: its plan, its token check, its attribution of
failures and its reading of client logs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from petals_cli.errors import NoRouteError, ServerError
from petals_cli.testing import make_tiny_model, wan
from petals_cli.testing.soak import Soak
from petals_cli.testing.soak_client import check_tokens, error_record
from petals_cli.testing.soak_records import KINDS, AppliedFault, Peer, SoakRun, SoakSettings, plan_faults
from petals_cli.testing.soak_report import detections, had_no_replica, summarize
from petals_cli.testing.soak_text import render

SHORT = SoakSettings(
    minutes=1.5,
    spans=("0:2", "2:4", "4:6"),
    replicas=(2, 2, 2),
    spare_hosts=2,
    clients=2,
    sessions=4,
    verify_clients=1,
    new_tokens=24,
    faults_per_kind=1,
    partition_s=15.0,
    loss_s=20.0,
    stop_s=(3.0, 8.0),
    join_after_s=(5.0, 15.0),
    bootstrap_down_s=5.0,
    tamper_s=30.0,
    sample_s=10.0,
    layers=6,
)
MEMORY_BOUND_MIB = 150.0  # generous: a leak, not noise
FD_BOUND = 64


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(wan.unavailable() is not None, reason=f"an emulated WAN {wan.unavailable()}")
def test_a_short_soak_gives_no_wrong_token_no_crash_and_no_leak(tmp_path):
    model = make_tiny_model(tmp_path / "soak-llama", "llama", num_layers=SHORT.layers)
    run = Soak(SHORT, model, tmp_path / "run", say=print).run()  # pytest -s shows how it goes
    report = summarize(SoakRun.from_json(json.loads((tmp_path / "run" / "run.json").read_text())))
    assert report == summarize(run)  # the saved run gives the same report
    print(render(report))
    assert report["generations"] > 0 and report["tokens"] > 0
    assert report["wrong_tokens"] == 0, [r for r in run.records if r.get("wrong")]
    assert report["crashes"] == [], report["crashes"]
    applied = {fault["kind"] for fault in report["faults"] if "skipped" not in fault}
    assert applied >= set(KINDS) - {"tamper"}, report["faults"]  # a liar may find no free host
    for row in report["resources"]:
        if row["role"] == "server" and row["long_lived"]:
            grown = row["rss_mib"][1] - row["rss_mib"][0]
            assert grown < MEMORY_BOUND_MIB, row
            assert row["fds"][1] - row["fds"][0] < FD_BOUND, row


def test_settings_refuse_spans_that_do_not_tile_the_model():
    with pytest.raises(ValueError):
        SoakSettings(spans=("0:2", "3:8"), replicas=(2, 2))
    with pytest.raises(ValueError):
        SoakSettings(replicas=(2, 2))


def test_the_plan_has_every_kind_inside_the_run_in_time_order():
    settings = SoakSettings(minutes=10)
    planned = plan_faults(settings, random.Random(1))
    assert [fault.kind for fault in planned].count("kill") == 2  # one per 5 minutes
    assert {fault.kind for fault in planned} == set(KINDS)
    assert all(0.1 * settings.duration <= fault.at <= 0.8 * settings.duration for fault in planned)
    assert [fault.at for fault in planned] == sorted(fault.at for fault in planned)
    assert planned == plan_faults(settings, random.Random(1))


class _Logits(torch.nn.Module):
    """A stand-in model whose next-token logits are fixed per position."""

    def __init__(self, rows: list[list[float]]):
        super().__init__()
        self.rows = torch.tensor(rows)

    def forward(self, ids):
        class Output:
            logits = self.rows[: ids.shape[1]].unsqueeze(0)

        return Output()


def test_every_token_is_checked_after_the_prefix_the_swarm_took_and_near_ties_count_apart():
    rows = [[0, 0, 0], [0, 5, 1], [3, 0, 3 - 1e-5], [0, 0, 9], [0, 0, 0]]
    local = _Logits(rows)  # a 2-token prompt: positions 1..3 give the choices after it
    assert check_tokens(local, [0, 0], [1, 0, 2]) == {"wrong": 0, "ties": 0, "first_wrong": None}
    assert check_tokens(local, [0, 0], [1, 2, 2]) == {"wrong": 0, "ties": 1, "first_wrong": None}
    assert check_tokens(local, [0, 0], [0, 0, 1]) == {"wrong": 2, "ties": 0, "first_wrong": 0}
    # generation with min_new_tokens never picks an end-of-sequence token: the next best is right
    assert check_tokens(local, [0, 0], [2, 0, 2], suppressed=(1,)) == {"wrong": 0, "ties": 0, "first_wrong": None}


def test_a_failure_record_names_its_type_and_blocks():
    missing = error_record(NoRouteError("no route", missing_blocks=(4, 5)))
    assert missing == {"type": "NoRouteError", "typed": True, "message": "no route", "blocks": [4, 5]}
    named = error_record(ServerError("no server for blocks 2:4 answered after 8 tries"))
    assert named["blocks"] == [2, 3] and named["typed"]
    assert not error_record(RuntimeError("boom"))["typed"]


def _peer(name: str, span: str, ready: float, ended: float | None = None, peer_id: str = "") -> Peer:
    peer = Peer(name, "server", 1, None, Path("/nonexistent"), ready, span=span, ready=ready, ended=ended)
    peer.peer_id = peer_id or f"Qm{name:0>44}"
    return peer


def test_a_failure_is_attributed_only_when_a_block_it_names_had_no_live_replica_for_its_client_just_before():
    run = SoakRun(SoakSettings(spans=("0:2", "2:4"), replicas=(2, 1), layers=4), started=0.0, ended=1000.0)
    first, second, other = _peer("a", "0:2", 0.0, ended=100.0), _peer("b", "0:2", 0.0), _peer("c", "2:4", 0.0)
    run.peers = [first, second, other]
    second.frozen.append([90.0, 120.0])  # both gone from 100 to 120
    assert had_no_replica(run, 0, [0, 1], 110.0)
    assert not had_no_replica(run, 0, [2, 3], 110.0)
    assert had_no_replica(run, 0, [0], 124.0)  # a replica back 4 s before may not have been seen yet
    assert not had_no_replica(run, 0, [0], 130.0)  # one back 10 s before would have been
    assert had_no_replica(run, 0, [], 110.0)  # naming no block: any block
    run.faults.append(AppliedFault("partition", 300.0, "", victims=[second.peer_id], clients=[1], until=330.0))
    assert had_no_replica(run, 1, [0], 310.0) and not had_no_replica(run, 0, [0], 310.0)
    # a verifying client needs two honest replicas to outvote a liar: one honest server and a liar cannot decide
    liar, third = _peer("liar", "0:2", 400.0), _peer("d", "0:2", 400.0)
    liar.role = "tamper"
    run.peers += [liar, third]
    assert not had_no_replica(run, 0, [0], 410.0, needed=2)  # b and d outvote the liar
    run.peers.remove(third)
    assert had_no_replica(run, 0, [0], 410.0, needed=2) and not had_no_replica(run, 0, [0], 410.0)


def test_a_fault_is_detected_when_a_client_that_could_notice_it_first_names_its_victim():
    victim = "Qm" + "v" * 36 + "VICTIM01"
    run = SoakRun(SoakSettings(), started=0.0, ended=100.0)
    run.faults = [
        AppliedFault("kill", 10.0, "x", victims=[victim]),
        AppliedFault("partition", 50.0, "y", victims=[victim], clients=[1]),
    ]
    run.records = [
        {"kind": "generation", "client": 0, "started": 5.0, "ended": 12.0, "first_route": [victim], "route": []}
    ]
    lines = [
        (9.0, 0, "petals_cli.client.replay: server VICTIM01 (blocks 0:2): earlier"),
        (11.5, 0, "petals_cli.client.replay: server VICTIM01 (blocks 0:2): stopped answering"),
        (52.0, 0, "server VICTIM01 failed"),  # client 0 is not cut off from it
        (53.0, 1, "server VICTIM01 failed"),
    ]
    kill, partition = detections(run, lines)
    assert kill["after_s"] == 1.5 and kill["by"] == "client0" and kill["in_use"]
    assert partition["after_s"] == 3.0 and partition["by"] == "client1" and not partition["in_use"]


def test_a_link_cut_between_two_servers_is_in_use_when_they_are_neighbours_and_seen_by_the_pusher(tmp_path):
    first, second, third = ("Qm" + letter * 36 + f"SERVER0{index}" for index, letter in enumerate("abc"))
    run = SoakRun(SoakSettings(), started=0.0, ended=100.0)
    run.peers = [
        Peer(f"server{index}", "server", index, None, tmp_path / f"server{index}.log", 0.0, peer_id=peer_id)
        for index, peer_id in enumerate((first, second, third))
    ]
    run.faults = [AppliedFault("partition", 20.0, "x", victims=[first, third], until=50.0)]
    generation = {"kind": "generation", "client": 0, "started": 10.0, "ended": 30.0, "route": []}
    run.records = [dict(generation, first_route=[first, second, third])]
    quiet = detections(run, [(25.0, 0, f"server {third[-8:]} failed")], [])
    assert not quiet[0]["in_use"]  # both on the route, but the link between them carries nothing
    run.records.append(dict(generation, first_route=[second, first, third]))
    server_lines = [
        (21.0, second, f"push to {third[-8:]} failed"),  # not a victim: its link to it is whole
        (21.4, third, f"push to {first[-8:]} came late"),  # the right pair, ahead of the client
        (22.0, first, f"push to {third[-8:]} failed (TimeoutError)"),
    ]
    (cut,) = detections(run, [(23.0, 0, f"server {third[-8:]} failed")], server_lines)
    assert cut["in_use"] and cut["after_s"] == 1.4 and cut["by"] == "server2"
