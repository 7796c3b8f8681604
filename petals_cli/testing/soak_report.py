"""The figures of a soak (``summarize``) and their text (``render``), from what ``soak.Soak`` gathered.

Wrong tokens and near ties come from the clients' own checks. A failed generation is attributed to the schedule when
a block it names (every block, when it names none) had no live replica for its client at some moment in the
``VISIBILITY`` seconds before it failed: a replica is a server that was up and announced, not frozen, and not cut
off from that client (a new server's announcement takes a moment to be seen; a client that waits for missing blocks
reads the swarm again every half second). Whether the monitor saw each new server, and how soon, is reported too.
The time to detect a fault is from the moment the schedule applied it to the first line of a client's log that
names one of its victims (a failover, a ban after a failed ping, a caught liar). Memory and descriptors are compared
between the sample nearest ``min(5 minutes, a sixth of the run)`` and the last one. Nothing here asserts: the
benchmark prints these figures, the test checks a few of them.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from petals_cli.testing.soak_records import SoakRun

VISIBILITY = 5.0  # seconds for a new server to be seen, and within which a replica-less moment explains a failure
DETECTION_WINDOW = 120.0  # a fault not named in a client's log within this long counts as not noticed
DETECTED_KINDS = ("leave", "kill", "stop", "partition", "tamper")
TIMED_KINDS = ("kill", "stop", "partition")  # the target: noticed within DETECTION_TARGET seconds
DETECTION_TARGET = 2.0
MEMORY_SLACK_MIB, MEMORY_SLACK_SHARE, FD_SLACK = 50.0, 0.10, 8
_LOG_LINE = re.compile(r"^(\d{9,}\.\d+) (\w+) (\S+): (.*)$")


def live_replicas(run: SoakRun, client: int, block: int, moment: float) -> int:
    """Servers of ``block`` that ``client`` could use at ``moment`` (liars not counted)."""
    count = 0
    for peer in run.peers:
        if peer.role != "server" or peer.ready is None or block not in peer.blocks():
            continue
        if not peer.ready <= moment < (peer.ended or run.ended):
            continue
        if any(start <= moment < (end or run.ended) for start, end in peer.frozen):
            continue
        cut = any(
            fault.kind == "partition" and client in fault.clients and peer.peer_id in fault.victims
            for fault in run.faults
            if fault.at <= moment < (fault.until or run.ended)
        )
        count += not cut
    return count


def had_no_replica(run: SoakRun, client: int, blocks: list[int], failed: float) -> bool:
    """Whether a block of ``blocks`` (every block, when none is named) had no live replica for ``client`` at some
    moment within ``VISIBILITY`` seconds before ``failed``."""
    blocks = blocks or list(range(run.settings.layers))
    moment = failed - VISIBILITY
    while moment <= failed:
        if any(live_replicas(run, client, block, moment) == 0 for block in blocks):
            return True
        moment += 0.25
    return False


def visibility(run: SoakRun) -> list[dict]:
    """Per server started during the run: how long after it was up the monitor first saw it online in the DHT
    (None: never, while it lived)."""
    rows = []
    for peer in run.peers:
        if peer.role not in ("server", "tamper") or peer.ready is None or peer.ready < run.started:
            continue
        seen = next(
            (
                sample["at"]
                for sample in run.dht
                if sample["at"] >= peer.ready and peer.peer_id in sample.get("online_peers", ())
            ),
            None,
        )
        rows.append(
            {
                "name": peer.name,
                "span": peer.span,
                "up_at_s": round(peer.ready - run.started, 1),
                "lived_s": round((peer.ended or run.ended) - peer.ready, 1),
                "seen_after_s": None if seen is None else round(seen - peer.ready, 1),
            }
        )
    return rows


def client_log_lines(paths: list[Path]) -> list[tuple[float, int, str]]:
    """(Unix time, client index, message) of every timed line in the clients' logs, in time order."""
    lines = []
    for index, path in enumerate(paths):
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            match = _LOG_LINE.match(line)
            if match:
                lines.append((float(match.group(1)), index, f"{match.group(3)}: {match.group(4)}"))
    return sorted(lines)


def in_use(run: SoakRun, fault, moment: float | None) -> bool:
    """Whether a generation running at ``moment`` (at any moment: None) of a client that could notice ``fault`` had a
    victim of it on its route (as it was at its first token or at its end)."""
    victims = set(fault.victims)
    return any(
        record.get("kind") == "generation"
        and (moment is None or record["started"] <= moment <= record["ended"])
        and (not fault.clients or record["client"] in fault.clients)
        and victims & set(record.get("first_route", []) + record.get("route", []))
        for record in run.records
    )


def detections(run: SoakRun, lines: list[tuple[float, int, str]]) -> list[dict]:
    """Per fault with victims: how long until a client's log first named one (from the moment a liar was up, for a
    liar), and whether a generation was using a victim then."""
    found = []
    for fault in run.faults:
        if fault.kind not in DETECTED_KINDS or fault.skipped:
            continue
        start = fault.at
        if fault.kind == "tamper":
            ready = [peer.ready for peer in run.peers if peer.peer_id in fault.victims and peer.ready is not None]
            if not ready:
                continue
            start = ready[0]
        suffixes = [victim[-8:] for victim in fault.victims if victim]
        first = next(
            (
                (moment, client, message)
                for moment, client, message in lines
                if start <= moment <= start + DETECTION_WINDOW
                and (not fault.clients or client in fault.clients)
                and any(suffix in message for suffix in suffixes)
            ),
            None,
        )
        entry = {"kind": fault.kind, "at_s": round(fault.at - run.started, 1), "target": fault.target}
        entry["in_use"] = in_use(run, fault, None if fault.kind == "tamper" else start)
        if first is not None:
            entry.update(after_s=round(first[0] - start, 2), client=first[1], line=first[2][:160])
        found.append(entry)
    return found


def _at(samples: list[dict], moment: float) -> dict | None:
    return min(samples, key=lambda sample: abs(sample["at"] - moment)) if samples else None


def resources(run: SoakRun) -> list[dict]:
    """Per process: memory (MiB) and descriptors at its reference moment and at its last sample. The reference is
    ``R = min(5 minutes, a sixth of the run)`` after the later of the run's start and the process's own; a server
    that was sampled for at least ``R`` after it (``long_lived``) counts for the targets."""
    settle = min(300.0, run.settings.duration / 6)
    rows = []
    for peer in run.peers:
        if not peer.samples:
            continue
        reference = max(run.started, peer.ready or peer.started) + settle
        first, last = _at(peer.samples, reference), peer.samples[-1]
        row = {"name": peer.name, "role": peer.role, "span": peer.span, "samples": len(peer.samples)}
        row["long_lived"] = first["at"] <= reference + run.settings.sample_s and last["at"] >= reference + settle
        row["lived_s"] = round(last["at"] - (peer.ready or peer.started))
        for key in ("rss_kib", "p2pd_rss_kib"):
            if key in first and key in last:
                name = key.replace("_kib", "_mib")
                row[name] = [round(first[key] / 1024, 1), round(last[key] / 1024, 1)]
        for key in ("fds", "p2pd_fds"):
            if key in first and key in last:
                row[key] = [first[key], last[key]]
                row[f"{key}_max"] = max(sample.get(key, 0) for sample in peer.samples)
        rows.append(row)
    return rows


def memory_ok(row: dict) -> bool:
    before, after = row.get("rss_mib", [0, 0])
    return after - before <= max(MEMORY_SLACK_MIB, MEMORY_SLACK_SHARE * before)


def fds_ok(row: dict) -> bool:
    before, after = row.get("fds", [0, 0])
    return after - before <= FD_SLACK


def summarize(run: SoakRun) -> dict:
    settings = run.settings
    generations = [record for record in run.records if record.get("kind") == "generation"]
    verifying = set(range(settings.verify_clients))
    failures = []
    for record in generations:
        if record["error"] is None:
            continue
        error = record["error"]
        attributed = had_no_replica(run, record["client"], error["blocks"], record["ended"])
        failures.append(
            {
                "at_s": round(record["started"] - run.started, 1),
                "lasted_s": round(record["ended"] - record["started"], 1),
                "client": record["client"],
                "type": error["type"],
                "typed": error["typed"],
                "blocks": error["blocks"],
                "message": error["message"],
                "no_replica": attributed,
            }
        )
    crashes = [
        {"name": f"client{record['client']}", "error": record["error"][-600:]}
        for record in run.records
        if record.get("kind") == "crash"
    ]
    crashes += [{"name": peer.name, "error": peer.end} for peer in run.peers if peer.end.startswith("crashed")]
    failed_starts = [{"name": peer.name, "end": peer.end} for peer in run.peers if peer.end.startswith("failed to")]
    unclean = [
        {"name": peer.name, "end": peer.end} for peer in run.peers if "exit code" in peer.end or "did not" in peer.end
    ]
    exits = {
        peer.name: round(peer.ended - peer.told_to_stop, 1)
        for peer in run.peers
        if peer.told_to_stop is not None and peer.ended is not None and "killed" not in peer.end
    }
    tracebacks = {}
    for peer in run.peers:
        text = peer.log.read_text(errors="replace") if peer.log.exists() else ""
        if "Traceback" in text:
            tracebacks[peer.name] = text.count("Traceback")
    lines = client_log_lines(run.client_logs)
    elapsed = max(run.ended - run.started, 1e-9)
    tokens = sum(record["tokens"] for record in generations)
    return {
        "settings": {
            "minutes": settings.minutes,
            "servers": sum(settings.replicas),
            "spans": dict(zip(settings.spans, settings.replicas, strict=True)),
            "clients": settings.clients,
            "sessions": settings.sessions,
            "verify_clients": settings.verify_clients,
            "verify_rate": settings.verify_rate,
            "new_tokens": settings.new_tokens,
            "rtt_ms": settings.rtt_ms,
            "mbit": settings.mbit,
            "seed": settings.seed,
        },
        "elapsed_s": round(elapsed, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 2),
        "generations": len(generations),
        "wrong_tokens": sum(record["wrong"] for record in generations),
        "wrong_tokens_verified": sum(record["wrong"] for record in generations if record["client"] in verifying),
        "wrong_generations": sum(record["wrong"] > 0 for record in generations),
        "near_ties": sum(record["ties"] for record in generations),
        "failovers": sum(record["failovers"] for record in generations),
        "liars_caught": sum(record["caught"] for record in generations),
        "failures": failures,
        "crashes": crashes,
        "unclean_exits": unclean,
        "failed_starts": failed_starts,
        "exit_s": exits,
        "tracebacks_in_logs": tracebacks,
        "resources": resources(run),
        "dht": [{"at_s": round(sample["at"] - run.started, 1), **sample} for sample in run.dht],
        "faults": [
            {"at_s": round(fault.at - run.started, 1), "kind": fault.kind, "target": fault.target}
            | ({"skipped": fault.skipped} if fault.skipped else {})
            for fault in run.faults
        ],
        "detections": detections(run, lines),
        "bootstrap_restarts": bootstrap_windows(run, generations),
        "new_servers_seen": visibility(run),
        "wan": run.wan_totals,
        "workdir": str(run.workdir),
    }


def bootstrap_windows(run: SoakRun, generations: list[dict]) -> list[dict]:
    """Per restart of the bootstrap peer: tokens of generations running while it was down, and failures that began
    between its stop and 30 s after it was back."""
    windows = []
    for fault in run.faults:
        if fault.kind != "bootstrap" or fault.skipped:
            continue
        down, up = fault.at, fault.until or run.ended
        during = [record for record in generations if record["started"] < up and record["ended"] > down]
        failed = [record for record in generations if record["error"] and down - 5 <= record["ended"] <= up + 30]
        windows.append(
            {
                "at_s": round(down - run.started, 1),
                "down_s": round(up - down, 1),
                "generations_spanning": len(during),
                "completed_while_down": sum(down < record["ended"] <= up and not record["error"] for record in during),
                "failed_near": len(failed),
                "failed_near_clients": sorted({record["client"] for record in failed}),
            }
        )
    return windows


def targets(report: dict) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for the issue's targets."""
    unattributed = [failure for failure in report["failures"] if not failure["no_replica"] or not failure["typed"]]
    attributed = [failure for failure in report["failures"] if failure["no_replica"] and failure["typed"]]
    long_lived = [row for row in report["resources"] if row["role"] == "server" and row["long_lived"]]
    timed = [entry for entry in report["detections"] if entry["kind"] in TIMED_KINDS and entry["in_use"]]
    noticed = [entry["after_s"] for entry in timed if "after_s" in entry]
    wrong = report["wrong_tokens"]
    rows = [
        ("0 wrong tokens", f"{report['wrong_tokens']} (near ties apart: {report['near_ties']})", not wrong),
        (
            "0 crashes",
            f"{len(report['crashes'])} (and {len(report['failed_starts'])} servers that failed to start)",
            not report["crashes"],
        ),
        (
            "failures only where no replica existed, each typed and naming its blocks",
            f"{len(unattributed)} other, {len(attributed)} attributed",
            not unattributed and all(failure["blocks"] for failure in attributed),
        ),
        (
            f"memory: last within {MEMORY_SLACK_SHARE:.0%} or {MEMORY_SLACK_MIB:g} MiB of the value at 5 minutes",
            f"{sum(map(memory_ok, long_lived))}/{len(long_lived)} servers",
            all(map(memory_ok, long_lived)),
        ),
        (
            f"descriptors flat (at most +{FD_SLACK})",
            f"{sum(map(fds_ok, long_lived))}/{len(long_lived)} servers",
            all(map(fds_ok, long_lived)),
        ),
        (
            f"kill, stop, partition of a server in use noticed within {DETECTION_TARGET:g} s",
            f"{sum(after <= DETECTION_TARGET for after in noticed)}/{len(timed)} (noticed: {len(noticed)}; "
            f"median {statistics.median(noticed) if noticed else '-'} s, worst {max(noticed, default='-')} s)",
            all(entry.get("after_s", float("inf")) <= DETECTION_TARGET for entry in timed),
        ),
        (
            "generation goes on while the bootstrap peer restarts",
            "; ".join(
                f"{window['completed_while_down']} done while down, {window['failed_near']} failed near"
                for window in report["bootstrap_restarts"]
            )
            or "no restart",
            all(
                window["completed_while_down"] > 0 and not window["failed_near"]
                for window in report["bootstrap_restarts"]
            ),
        ),
    ]
    return rows


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]


def _pair(values: list | None, unit: str = "") -> str:
    return f"{values[0]:g}{unit} -> {values[1]:g}{unit}" if values else "-"


def render(report: dict) -> str:
    settings = report["settings"]
    spans = ", ".join(f"{span} x{count}" for span, count in settings["spans"].items())
    lines = [
        f"soak: {report['elapsed_s']:.0f} s of generation; {settings['servers']} servers ({spans}), "
        f"{settings['sessions']} sessions in {settings['clients']} clients ({settings['verify_clients']} with "
        f"--verify {settings['verify_rate']:g}), {settings['new_tokens']} new tokens each; WAN RTT "
        f"{settings['rtt_ms']:g} ms, {settings['mbit']:g} Mbit/s; seed {settings['seed']}",
        f"tokens generated: {report['tokens']} ({report['tokens_per_s']:g}/s) in {report['generations']} "
        f"generations; failovers {report['failovers']}; liars caught {report['liars_caught']}",
        f"tokens that differ from local transformers: {report['wrong_tokens']} (in {report['wrong_generations']} "
        f"generations; from verifying clients {report['wrong_tokens_verified']}); near ties {report['near_ties']}",
        f"failed generations: {len(report['failures'])}",
    ]
    for failure in report["failures"]:
        cause = "no live replica" if failure["no_replica"] else "replicas existed"
        lines.append(
            f"  +{failure['at_s']:g}s client{failure['client']} after {failure['lasted_s']:g}s: {failure['type']}"
            f"{'' if failure['typed'] else ' (untyped)'} blocks {failure['blocks'] or '-'} [{cause}]: "
            f"{failure['message'][:140]}"
        )
    lines.append(f"crashes: {len(report['crashes'])}")
    lines += [f"  {crash['name']}: {crash['error'].strip().splitlines()[-1][:200]}" for crash in report["crashes"]]
    lines += [f"failed to start: {peer['name']}: {peer['end']}" for peer in report["failed_starts"]]
    if report["unclean_exits"]:
        exits = "; ".join(f"{peer['name']} {peer['end']}" for peer in report["unclean_exits"])
        lines.append(f"unclean exits when stopped: {exits}")
    if report["exit_s"]:
        slowest = sorted(report["exit_s"].items(), key=lambda item: -item[1])[:3]
        lines.append(
            f"seconds from SIGTERM (a client: its input closed) to exit: median "
            f"{statistics.median(report['exit_s'].values()):g}, slowest "
            + ", ".join(f"{name} {seconds:g}" for name, seconds in slowest)
        )
    if report["tracebacks_in_logs"]:
        logged = ", ".join(f"{name} {count}" for name, count in sorted(report["tracebacks_in_logs"].items()))
        lines.append(f"tracebacks in logs (not crashes by themselves): {logged}")
    lines.append("faults (+seconds into the run), and when a client's log first named the victim:")
    noticed = {(entry["at_s"], entry["kind"]): entry for entry in report["detections"]}
    for fault in report["faults"]:
        entry = noticed.get((fault["at_s"], fault["kind"]))
        seen = ""
        if entry is not None:
            named = f"named after {entry['after_s']:g} s by client{entry['client']}" if "after_s" in entry else ""
            seen = f" -> {named or 'not named by any client'}"
            seen += "" if entry["in_use"] else " (no generation had it on its route then)"
        skipped = f" (skipped: {fault['skipped']})" if "skipped" in fault else ""
        lines.append(f"  +{fault['at_s']:g}s {fault['kind']}: {fault['target']}{skipped}{seen}")
    for row in report["new_servers_seen"]:
        seen = f"after {row['seen_after_s']:g} s" if row["seen_after_s"] is not None else "NEVER"
        lines.append(
            f"new server {row['name']} [{row['span']}] up at +{row['up_at_s']:g}s for {row['lived_s']:g} s: "
            f"seen online in the DHT by the monitor {seen}"
        )
    for window in report["bootstrap_restarts"]:
        lines.append(
            f"bootstrap restart at +{window['at_s']:g}s (down {window['down_s']:g} s): "
            f"{window['generations_spanning']} generations ran across it, {window['completed_while_down']} "
            f"completed while it was down, "
            f"{window['failed_near']} failed from its stop to 30 s after its return (clients "
            f"{window['failed_near_clients'] or '-'})"
        )
    lines.append(
        "memory (RSS MiB) and open descriptors, 5 minutes (or a sixth of the run) into the process's life -> at its "
        "last sample (the server, then its libp2p daemon):"
    )
    rows = [["process", "span", "lived s", "RSS", "fds", "p2pd RSS", "p2pd fds", "ok"]]
    for row in report["resources"]:
        flag = ("yes" if memory_ok(row) and fds_ok(row) else "NO") if row["long_lived"] else "(short-lived)"
        rows.append(
            [
                row["name"],
                row["span"] or "-",
                str(row["lived_s"]),
                _pair(row.get("rss_mib")),
                _pair(row.get("fds")),
                _pair(row.get("p2pd_rss_mib")),
                _pair(row.get("p2pd_fds")),
                flag if row["role"] == "server" else "",
            ]
        )
    lines += _table(rows)
    samples = report["dht"]
    lines.append(f"DHT (monitor, {len(samples)} reads; records = (block, server) pairs stored, stale ones included):")
    step = max(1, len(samples) // 8)
    rows = [["+s", "records", "index", "online", "joining", "offline", "unreachable", "min cover", "read s"]]
    for sample in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        if "error" in sample:
            rows.append([f"{sample['at_s']:g}", sample["error"][:60], *[""] * 7])
            continue
        keys = ("records", "index_records", "online", "joining", "offline", "unreachable", "min_coverage", "read_s")
        rows.append([f"{sample['at_s']:g}", *(str(sample.get(key, "-")) for key in keys)])
    lines += _table(rows)
    wan = report["wan"]
    lines.append(
        f"WAN: {wan.get('packets', 0)} packets forwarded, {wan.get('loss_drops', 0)} lost on purpose, "
        f"{wan.get('partition_drops', 0)} dropped by partitions, {wan.get('queue_drops', 0)} by full queues"
    )
    lines.append("targets:")
    for target, measured, met in targets(report):
        lines.append(f"  [{'met' if met else 'MISSED'}] {target}: {measured}")
    lines.append(f"logs: {report['workdir']}")
    return "\n".join(lines)
