"""Checking the simulator against a real run of the scale benchmark (``testing/scale.py``'s ``run.json``).

The simulated swarm is the real one's: its servers (speed classes, sequential joins at the real moments), its
clients and sessions, its kill (the same servers, at the same moment). What a real run on this one machine adds to
the device models is measured in that run, never fitted to the figures compared:

- the processes' own CPU (``cpu_s`` of each process and its libp2p daemon, sampled by the benchmark): the clients'
  per token generated, the servers' per token of the steps they received (their meters' rows), the rest (bootstrap
  peer, monitor) as background; all of it queues for this machine's cores in the simulation;
- round trips and hop costs on loopback are left at their defaults (tiny next to the CPU).

``compare`` sets the figures side by side: tokens/s before the kill, step p50/p95, coverage (servers per block)
just after the kill and at the end, and moves.
"""

from __future__ import annotations

import os

from petals_cli.testing.scale import ScaleRun
from petals_cli.testing.scale_report import coverage, spans_at, summarize
from petals_cli.testing.sim_report import WARM_SECONDS
from petals_cli.testing.sim_scenarios import Overheads, Timeline, like_scale_run
from petals_cli.testing.simswarm import Scenario

FIGURES = (  # (name, the real report's key, the simulated report's key)
    ("tokens/s before the kill", "tokens_s_before", "tokens_s"),
    ("step p50 (s)", "step_p50_s", "step_p50_s"),
    ("step p95 (s)", "step_p95_s", "step_p95_s"),
    ("tokens/s after the kill", "tokens_s_after", "tokens_s_after"),
    ("servers per block, weakest, after the kill", "coverage_after_kill_min", "coverage_after_kill_min"),
    ("servers per block, weakest, at the end", "coverage_end_min", "coverage_end_min"),
    ("moves", "moves", "moves"),
)
CHECKED = ("tokens_s_before", "step_p95_s", "coverage_after_kill_min", "moves")  # the four


def timeline(run: ScaleRun) -> Timeline:
    servers = [peer for peer in run.peers if peer.role == "server"]
    origin = min(peer.started for peer in servers)
    joins = tuple(peer.started - origin for peer in sorted(servers, key=lambda peer: int(peer.name[6:])))
    return Timeline(joins, run.started - origin, run.killed_at - origin, run.ended - origin)


def victims(run: ScaleRun) -> tuple[int, ...]:
    names = {peer.peer_id: int(peer.name[6:]) for peer in run.peers if peer.role == "server"}
    return tuple(names[peer] for peer in run.killed)


def _cpu_between(run: ScaleRun, role: str, first: float, last: float) -> float:
    """CPU seconds the processes of ``role`` (and their daemons) used between their samples nearest the window."""
    total = 0.0
    for peer in run.peers:
        inside = [sample for sample in peer.samples if first <= sample["at"] <= last and "cpu_s" in sample]
        if peer.role == role and len(inside) >= 2:
            used = [sample["cpu_s"] + sample.get("p2pd_cpu_s", 0.0) for sample in (inside[0], inside[-1])]
            total += (used[1] - used[0]) * (last - first) / (inside[-1]["at"] - inside[0]["at"])
    return total


def measured(run: ScaleRun) -> dict:
    """The machine's cost per token of the clients' and servers' own work, from the run's CPU samples."""
    first = run.started + min(WARM_SECONDS, 0.25 * (run.killed_at - run.started))
    last = run.killed_at
    tokens = sum(first <= at < last for record in run.records if record.get("kind") == "generation"
                 for at in record["times"])  # fmt: skip
    rows = 0
    for lines in run.meters.values():
        inside = [line for line in lines if first <= line["at"] <= last]
        if len(inside) >= 2:
            rows += (inside[-1]["rows"] - inside[0]["rows"]) * (last - first) / (inside[-1]["at"] - inside[0]["at"])
    clients, servers = _cpu_between(run, "client", first, last), _cpu_between(run, "server", first, last)
    others = sum(_cpu_between(run, role, first, last) for role in ("bootstrap", "monitor"))
    return {
        "window_s": round(last - first, 1),
        "tokens": tokens,
        "server_rows": round(rows),
        "client_cpu_s": round(clients, 1),
        "server_cpu_s": round(servers, 1),
        "other_cpu_s": round(others, 1),
        "client_cpu_per_token_s": clients / tokens if tokens else 0.0,
        "server_cpu_per_row_s": servers / rows if rows else 0.0,
        "background_cores": others / (last - first),
        "cores": os.cpu_count() or 1,
    }


def scenario_of(run: ScaleRun, costs: dict | None = None) -> tuple[Scenario, Timeline]:
    costs = costs or measured(run)
    scenario, line = like_scale_run(run.settings, timeline(run), Overheads(), victims(run))
    from dataclasses import replace

    scenario = replace(
        scenario,
        cores=costs["cores"],
        client_cpu_s=costs["client_cpu_per_token_s"],
        server_cpu_s=costs["server_cpu_per_row_s"],
        background_cpu=costs["background_cores"],
        client_seconds=0.0,
    )
    return scenario, line


def real_figures(run: ScaleRun) -> dict:
    report = summarize(run)
    gone = set(run.killed)
    spans = {peer: span for peer, span in spans_at(run, run.killed_at).items() if peer not in gone}
    report["coverage_after_kill_min"] = min(coverage(spans, run.settings.layers), default=0)
    report["coverage_end_min"] = report["placement_after"]["coverage_min"]
    return report


def compare(real: dict, simulated: dict) -> list[dict]:
    rows = []
    for name, real_key, sim_key in FIGURES:
        ours, theirs = simulated.get(sim_key), real.get(real_key)
        off = None
        if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
            off = 0.0 if ours == theirs else (ours - theirs) / theirs if theirs else None
        rows.append({"figure": name, "real": theirs, "simulated": ours, "off": None if off is None else round(off, 3),
                     "checked": real_key in CHECKED})  # fmt: skip
    return rows
