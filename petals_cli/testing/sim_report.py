"""Figures of a simulated swarm (``simswarm.SimRun``), defined as ``scale_report`` defines them for a real run, so
that the two can be set side by side.

- tokens/s: tokens generated in the window (after a warm-up, before the kill) over its length; the bound is the max
  flow of the placement at the kill (``scale_bound``);
- step p50/p95: the gaps between a generation's tokens that ended in that window;
- coverage: servers per block (online ones), at the kill, just after it and at the end; seconds until every block
  was held again; seconds with a block held by nobody (coverage holes over the whole run);
- moves: changes of an online server's span after the start; per server and hour;
- utilisation: each server's busy fraction; its spread (max over mean per block, as the real report);
- routing decisions: wall milliseconds of each call of the real route function.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from petals_cli.testing.scale_bound import PacedSpan, pipeline_bound
from petals_cli.testing.scale_report import percentile
from petals_cli.testing.simswarm import SimRun
from petals_cli.verify import checks_needed

WARM_SECONDS = 60.0  # at most: the warm-up left out of the window, as scale_report


def _r(value, digits: int = 3):
    return None if value is None else round(value, digits)


def coverage_at(run: SimRun, when: float, leaving_out: set[str] = frozenset()) -> list[int]:
    """Online servers per block in the last sample taken by ``when``, less ``leaving_out``."""
    counts = [0] * run.scenario.num_blocks
    spans = [spans for at, spans in run.spans if at <= when]
    for name, (start, end, state) in (spans[-1] if spans else {}).items():
        if state == "online" and name not in leaving_out:
            for block in range(start, end):
                counts[block] += 1
    return counts


def bound_at(run: SimRun, when: float) -> float:
    spans = [spans for at, spans in run.spans if at <= when]
    servers = [
        PacedSpan(name, start, end, run.devices[name])
        for name, (start, end, state) in (spans[-1] if spans else {}).items()
        if state == "online"
    ]
    return pipeline_bound(servers, run.scenario.num_blocks)


def hole_seconds(run: SimRun, after: float = 0.0) -> tuple[float, float]:
    """(seconds with any block held by no online server, the longest such stretch) from ``after`` on, by samples."""
    total, longest, began, previous = 0.0, 0.0, None, None
    for at, spans in run.spans:
        if at < after:
            continue
        held = set()
        for start, end, state in spans.values():
            if state == "online":
                held.update(range(start, end))
        hole = len(held) < run.scenario.num_blocks
        if previous is not None and hole:
            total += at - previous
        if hole and began is None:
            began = at
        if not hole and began is not None:
            longest, began = max(longest, at - began), None
        previous = at
    if began is not None and previous is not None:
        longest = max(longest, previous - began)
    return total, longest


def liar_figures(run: SimRun) -> dict:
    """With liars and checks: ``verify.checks_needed`` for their tamper rate (the steps by which one is caught with
    95% probability) against what happened: of the sessions in which a liar served that many steps (or was caught
    sooner), the fraction that caught it within them."""
    rates = {spec.tamper for spec in run.scenario.servers if spec.tamper > 0}
    if not rates or run.scenario.check_rate <= 0:
        return {}
    needed = checks_needed(run.scenario.check_rate, max(rates))
    judged = [
        (served, caught)
        for served, caught in run.liars
        if served >= needed or (caught is not None and caught <= needed)
    ]
    in_time = sum(1 for _, caught in judged if caught is not None and caught <= needed)
    return {
        "liar_steps_needed_95": needed,
        "liar_sessions_judged": len(judged),
        "liar_caught_within_needed": _r(in_time / len(judged) if judged else None),
        "liar_catches": sum(1 for _, caught in run.liars if caught is not None),
    }


def summarize(run: SimRun, *, started: float, killed_at: float | None = None) -> dict:
    scenario = run.scenario
    end = scenario.duration
    last = killed_at if killed_at is not None else end
    first = started + min(WARM_SECONDS, 0.25 * (last - started))
    times = [at for record in run.generations for at in record.times]
    tokens = sum(first <= at < last for at in times)
    steps = [
        later - earlier
        for record in run.generations
        for earlier, later in zip(record.times, record.times[1:], strict=False)
        if first <= later < last
    ]
    bound = bound_at(run, last - 1e-9)
    per_block = defaultdict(list)
    for name, (start, stop, state) in (run.spans[-1][1] if run.spans else {}).items():
        if state == "online" and name in run.utilisation:
            for block in range(start, stop):
                per_block[block].append(run.utilisation[name])
    ratios = [max(values) / statistics.mean(values) for values in per_block.values() if statistics.mean(values) > 0]
    spread = max(ratios, default=0.0)
    report = {
        "policy": run.policy,
        "servers": len(scenario.servers),
        "clients": len(scenario.clients),
        "simulated_s": round(end, 1),
        "wall_s": round(run.wall_seconds, 1),
        "events": run.events,
        "generations": len(run.generations),
        "failed_generations": sum(1 for record in run.generations if record.error),
        "failovers": sum(record.failovers for record in run.generations),
        "session_moves": sum(record.moves for record in run.generations),
        "window_s": [round(first, 1), round(last, 1)],
        "tokens_s": round(tokens / max(last - first, 1e-9), 2),
        "bound_tokens_s": round(bound, 2),
        "bound_ratio": _r(tokens / max(last - first, 1e-9) / bound if bound else None),
        "step_p50_s": _r(percentile(steps, 0.5)),
        "step_p95_s": _r(percentile(steps, 0.95)),
        "utilisation_max_over_mean": round(spread, 3),
        "utilisation_p10_p90": [
            _r(percentile(list(run.utilisation.values()), 0.1)),
            _r(percentile(list(run.utilisation.values()), 0.9)),
        ],  # fmt: skip
        "route_decisions": len(run.decisions),
        "route_decision_p50_ms": _r(1000 * (percentile(run.decisions, 0.5) or 0)),
        "route_decision_p99_ms": _r(1000 * (percentile(run.decisions, 0.99) or 0)),
        "moves": len(run.moves),
        "servers_moved": len({name for _, name, _, _ in run.moves}),
        "checks": run.checks,
        "refused_sessions": run.refusals,
        "steps_per_call": _r(run.steps / run.calls if run.calls else None, 2),
    }
    if killed_at is not None:
        gone = {name for name, at in run.stopped.items() if at <= killed_at + 1e-6}
        after = coverage_at(run, killed_at - 1e-6, leaving_out=gone)
        report["coverage_at_kill_min"] = min(coverage_at(run, killed_at - 1e-6), default=0)
        report["coverage_after_kill_min"] = min(after, default=0)
        report["coverage_end_min"] = min(coverage_at(run, end), default=0)
        back = next((at - killed_at for at, _ in run.spans if at >= killed_at and min(coverage_at(run, at)) > 0), None)
        report["covered_again_s"] = _r(back, 1)
        after_first = killed_at + (end - killed_at) / 2
        report["tokens_s_after"] = round(
            sum(after_first <= at < end for at in times) / max(end - after_first, 1e-9), 2
        )
    report.update(liar_figures(run))
    holes, longest = hole_seconds(run, started)
    hours = max(end - started, 1e-9) / 3600
    report["hole_s"], report["longest_hole_s"] = round(holes, 1), round(longest, 1)
    report["moves_per_server_hour"] = round(len(run.moves) / max(1, len(scenario.servers)) / hours, 3)
    return report
