"""The scale benchmark's figures, from a ``ScaleRun``; pure (no processes, no clock) and its text.

Windows: "before" is the generation before the kill, less its first quarter (sessions starting up, at most 60 s);
"after" is the second half of the generation after it. Spans are the monitor's reads of the DHT (servers announced
online that answered its pings; SIGKILLed ones are left out from the kill on).
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from petals_cli.testing.scale import ScaleRun
from petals_cli.testing.scale_bound import PacedSpan, block_capacities, pipeline_bound

FLAP_WINDOW_S = 300.0  # moving twice within this is a flap
RECOVERY_WINDOW_S = 30.0  # throughput after the kill is judged over windows this long


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _rounded(value, digits: int = 3):
    return None if value is None else round(value, digits)


def spans_at(run: ScaleRun, when: float) -> dict[str, tuple[int, int]]:
    """Online servers' spans in the last monitor read finished by ``when`` (a read still pinging when the kill came
    would see its victims as unreachable); killed ones are left out of reads after the kill."""
    reads = [read for read in run.dht if "servers" in read and read["at"] + read["read_s"] <= when]
    if not reads:
        return {}
    read = reads[-1]
    gone = set(read["unreachable"]) | (set(run.killed) if run.killed_at and read["at"] >= run.killed_at else set())
    return {peer: (start, end) for peer, (start, end, state) in read["servers"].items()
            if state == "online" and peer not in gone}  # fmt: skip


def paced_spans(run: ScaleRun, spans: dict[str, tuple[int, int]]) -> list[PacedSpan]:
    names = {peer.peer_id: peer.name for peer in run.peers if peer.role == "server"}
    return [
        PacedSpan(names[peer], start, end, run.settings.device(run.classes[names[peer]]))
        for peer, (start, end) in spans.items()
        if peer in names
    ]


def coverage(spans: dict[str, tuple[int, int]], num_blocks: int) -> list[int]:
    counts = [0] * num_blocks
    for start, end in spans.values():
        for block in range(start, min(end, num_blocks)):
            counts[block] += 1
    return counts


def tokens_between(run: ScaleRun, first: float, last: float) -> int:
    return sum(first <= at < last for record in _generations(run) for at in record["times"])


def _generations(run: ScaleRun) -> list[dict]:
    return [record for record in run.records if record.get("kind") == "generation"]


def steps_between(run: ScaleRun, first: float, last: float) -> list[float]:
    """One-token step latencies (the gaps between a generation's tokens) that ended in [first, last)."""
    return [
        later - earlier
        for record in _generations(run)
        for earlier, later in zip(record["times"], record["times"][1:], strict=False)
        if first <= later < last
    ]


def utilisation(run: ScaleRun, first: float, last: float) -> dict[str, float]:
    """Each server's busy fraction over [first, last): the growth of its meters' ``busy_s`` between the lines
    nearest those times, over the time between them."""
    found = {}
    for name, lines in run.meters.items():
        inside = [line for line in lines if first <= line["at"] <= last]
        if len(inside) >= 2 and inside[-1]["at"] > inside[0]["at"]:
            found[name] = (inside[-1]["busy_s"] - inside[0]["busy_s"]) / (inside[-1]["at"] - inside[0]["at"])
    return found


def dht_traffic(run: ScaleRun, first: float, last: float) -> dict:
    """Per server and minute over [first, last): DHT RPCs (made plus answered) and their protobuf bytes."""
    per_server = {}
    for name, lines in run.meters.items():
        inside = [line for line in lines if first <= line["at"] <= last]
        if len(inside) < 2 or inside[-1]["at"] <= inside[0]["at"]:
            continue
        minutes = (inside[-1]["at"] - inside[0]["at"]) / 60

        def total(line, columns):
            return sum(
                line["rpc"].get(rpc, [0] * 4)[c] for rpc in line["rpc"] if rpc.startswith("DHT") for c in columns
            )

        rpcs = (total(inside[-1], (0, 2)) - total(inside[0], (0, 2))) / minutes
        sent = (total(inside[-1], (1, 3)) - total(inside[0], (1, 3))) / minutes
        per_server[name] = (rpcs, sent)
    if not per_server:
        return {}
    rpcs, sizes = [value[0] for value in per_server.values()], [value[1] for value in per_server.values()]
    return {
        "rpcs_per_min_mean": round(statistics.mean(rpcs), 1),
        "rpcs_per_min_max": round(max(rpcs), 1),
        "bytes_per_min_mean": round(statistics.mean(sizes)),
        "bytes_per_min_max": round(max(sizes)),
    }


def moves(run: ScaleRun) -> list[dict]:
    """Every change of an online server's span between monitor reads after placement: who, when, from, to."""
    found, last_span = [], {}
    for read in run.dht:
        if "servers" not in read or read["at"] < run.placed:
            continue
        for peer, (start, end, state) in read["servers"].items():
            if state != "online":
                continue
            if peer in last_span and last_span[peer] != (start, end):
                found.append({"peer": peer, "at": read["at"], "from": last_span[peer], "to": (start, end)})
            last_span[peer] = (start, end)
    return found


def recovery(run: ScaleRun) -> float | None:
    """Seconds from the kill until a monitor read showed every block held by a live online server."""
    for read in run.dht:
        if "servers" in read and read["at"] >= run.killed_at:
            counts = coverage(spans_at(run, read["at"]), run.settings.layers)
            if min(counts) > 0:
                return read["at"] - run.killed_at
    return None


def throughput_recovery(run: ScaleRun, before: float) -> float | None:
    """Seconds from the kill until a window of ``RECOVERY_WINDOW_S`` carried 0.9 x the throughput before."""
    at = run.killed_at
    while at + RECOVERY_WINDOW_S <= run.ended:
        if tokens_between(run, at, at + RECOVERY_WINDOW_S) / RECOVERY_WINDOW_S >= 0.9 * before:
            return at + RECOVERY_WINDOW_S - run.killed_at
        at += 5.0
    return None


def placement(run: ScaleRun, when: float) -> dict:
    spans = spans_at(run, when)
    counts = coverage(spans, run.settings.layers)
    servers = paced_spans(run, spans)
    capacities = block_capacities(servers, run.settings.layers)
    return {
        "servers": len(spans),
        "coverage_min": min(counts, default=0),
        "coverage_max": max(counts, default=0),
        "coverage": counts,
        "bound_tokens_s": round(pipeline_bound(servers, run.settings.layers), 2),
        "block_capacity_max_tokens_s": round(max(capacities, default=0.0), 2),
        "spans": {server.name: f"{server.start}:{server.end}" for server in servers},
    }


def summarize(run: ScaleRun) -> dict:
    settings = run.settings
    warm = min(60.0, 0.25 * (run.killed_at - run.started))
    first, last = run.started + warm, run.killed_at
    after_first = run.killed_at + (run.ended - run.killed_at) / 2
    generations = _generations(run)
    checked = [record for record in generations if record.get("checked")]
    before = tokens_between(run, first, last) / max(last - first, 1e-9)
    after = tokens_between(run, after_first, run.ended) / max(run.ended - after_first, 1e-9)
    at_kill = placement(run, run.killed_at)
    steps = steps_between(run, first, last)
    busy = utilisation(run, first, last)
    spans = {server.name: server for server in paced_spans(run, spans_at(run, run.killed_at))}
    worst_ratio, worst_block = 0.0, None
    for block in range(settings.layers):
        holders = [busy[name] for name, server in spans.items() if server.start <= block < server.end and name in busy]
        if holders and statistics.mean(holders) > 0 and max(holders) / statistics.mean(holders) > worst_ratio:
            worst_ratio, worst_block = max(holders) / statistics.mean(holders), block
    moved = moves(run)
    by_peer = defaultdict(list)
    for move in moved:
        by_peer[move["peer"]].append(move["at"])
    flapping = [peer for peer, times in by_peer.items() if _flaps(times)]
    decisions = [seconds for record in generations for seconds in record.get("decisions", ())]
    errors = defaultdict(int)
    for record in generations:
        if record.get("error"):
            errors[record["error"]["type"]] += 1
    covered_in = recovery(run)
    back_in = throughput_recovery(run, before)
    report = {
        "settings": {**{key: value for key, value in vars(settings).items()}, "mix": dict(settings.mix)},
        "workdir": run.workdir,
        "tokens": sum(len(record["times"]) for record in generations),
        "generations": len(generations),
        "failed_generations": dict(errors),
        "checked_generations": len(checked),
        "checked_tokens": sum(len(record["times"]) for record in checked),
        "wrong_tokens": sum(record.get("wrong", 0) for record in checked),
        "near_ties": sum(record.get("ties", 0) for record in checked),
        "placement_at_start": placement(run, run.started),
        "placement_at_kill": at_kill,
        "window_before_s": [round(first - run.started, 1), round(last - run.started, 1)],
        "tokens_s_before": round(before, 2),
        "bound_ratio": _rounded(before / at_kill["bound_tokens_s"] if at_kill["bound_tokens_s"] else None),
        "step_p50_s": _rounded(percentile(steps, 0.5)),
        "step_p95_s": _rounded(percentile(steps, 0.95)),
        "utilisation": {name: round(value, 3) for name, value in sorted(busy.items())},
        "utilisation_worst_block": worst_block,
        "utilisation_max_over_mean": round(worst_ratio, 3),
        "route_decision_p50_ms": _rounded(1000 * (percentile(decisions, 0.5) or 0)),
        "route_decision_p95_ms": _rounded(1000 * (percentile(decisions, 0.95) or 0)),
        "route_decisions": len(decisions),
        "dht_per_server_minute": dht_traffic(run, first, last),
        "killed": len(run.killed),
        "covered_again_s": _rounded(covered_in, 1),
        "tokens_s_after": round(after, 2),
        "after_ratio": _rounded(after / before if before else None),
        "throughput_back_s": _rounded(back_in, 1),
        "placement_after": placement(run, run.ended),
        "moves": len(moved),
        "servers_moved": len(by_peer),
        "flapping_servers": len(flapping),
        "max_rss_mib": _max_rss(run),
    }
    report["targets"] = targets(report, settings.after_minutes)
    return report


def _flaps(times: list[float]) -> bool:
    """Two moves within ``FLAP_WINDOW_S`` of each other."""
    return any(later - earlier < FLAP_WINDOW_S for earlier, later in zip(times, times[1:], strict=False))


def _max_rss(run: ScaleRun) -> dict:
    found = defaultdict(int)
    for peer in run.peers:
        for sample in peer.samples:
            found[peer.role] = max(found[peer.role], (sample["rss_kib"] + sample.get("p2pd_rss_kib", 0)) // 1024)
    return dict(found)


def targets(report: dict, after_minutes: float) -> list[dict]:
    """The issue's targets, each met or missed (reported, never asserted)."""

    def target(name: str, met) -> dict:
        return {"target": name, "met": met}

    p50, p95 = report["step_p50_s"], report["step_p95_s"]
    ratio = report["bound_ratio"]
    return [
        target("no wrong token", report["wrong_tokens"] == 0),
        target("aggregate >= 0.8 x the bound", ratio is not None and ratio >= 0.8),
        target("utilisation <= 1.5 x the mean of a block's holders", report["utilisation_max_over_mean"] <= 1.5),
        target("p95 step <= 2 x p50", p50 is not None and p95 <= 2 * p50),
        target(
            "every block covered again within 60 s",
            report["covered_again_s"] is not None and report["covered_again_s"] <= 60,
        ),  # fmt: skip
        target("no server moves more than once in 5 minutes", report["flapping_servers"] == 0),
        target(
            "throughput >= 0.9 x before within 2 minutes",
            report["throughput_back_s"] is not None and report["throughput_back_s"] <= 120,
        ),  # fmt: skip
    ]


def render(report: dict) -> str:
    """The report as text."""
    settings, start, kill = report["settings"], report["placement_at_start"], report["placement_at_kill"]
    dht = report["dht_per_server_minute"] or {}
    lines = [
        f"swarm scale: {settings['servers']} paced servers {settings['mix']} joining {settings['join']}, "
        f"{settings['layers']} blocks, {settings['sessions']} sessions in {settings['clients']} client processes, "
        f"routing {settings['routing']!r}; run folder {report['workdir']}",
        f"tokens {report['tokens']} in {report['generations']} generations; checked {report['checked_tokens']} "
        f"tokens of {report['checked_generations']} generations against transformers: {report['wrong_tokens']} "
        f"wrong ({report['near_ties']} near ties); failed generations {report['failed_generations'] or 'none'}",
        f"placement once joined: coverage per block {start['coverage_min']}..{start['coverage_max']}, bound "
        f"{start['bound_tokens_s']} tokens/s; at the kill: {kill['coverage_min']}..{kill['coverage_max']}, bound "
        f"{kill['bound_tokens_s']} tokens/s (strongest block {kill['block_capacity_max_tokens_s']})",
        f"coverage per block at the kill: {' '.join(map(str, kill['coverage']))}",
        f"throughput {report['tokens_s_before']} tokens/s over {report['window_before_s']} s = "
        f"{report['bound_ratio']} x the bound; steps p50 {report['step_p50_s']} s, p95 {report['step_p95_s']} s",
        f"utilisation (busy fraction): {report['utilisation']}; worst block {report['utilisation_worst_block']}: "
        f"max {report['utilisation_max_over_mean']} x the mean of its holders",
        f"routing decisions: {report['route_decisions']}, p50 {report['route_decision_p50_ms']} ms, p95 "
        f"{report['route_decision_p95_ms']} ms",
        f"DHT per server and minute: {dht.get('rpcs_per_min_mean')} RPCs (max {dht.get('rpcs_per_min_max')}), "
        f"{dht.get('bytes_per_min_mean')} bytes (max {dht.get('bytes_per_min_max')})",
        f"SIGKILLed {report['killed']}: every block covered again after {report['covered_again_s']} s; throughput "
        f"after {report['tokens_s_after']} tokens/s ({report['after_ratio']} x before), 0.9 x before within "
        f"{report['throughput_back_s']} s; {report['moves']} moves by {report['servers_moved']} servers, "
        f"{report['flapping_servers']} flapping; bound after {report['placement_after']['bound_tokens_s']} tokens/s",
        f"largest memory (process + its libp2p daemon, MiB): {report['max_rss_mib']}",
        "targets (reported, never asserted):",
    ]
    lines += [f"  {'met   ' if item['met'] else 'MISSED'} {item['target']}" for item in report["targets"]]
    return "\n".join(lines)
