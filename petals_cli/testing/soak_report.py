"""The figures of a soak (``summarize``), from what ``soak.Soak`` gathered; their text is ``soak_text.render``.

Wrong tokens and near ties come from the clients' own checks. A failed generation is attributed to the schedule when
a block it names (every block, when it names none) had no live replica for its client at some moment in the
``VISIBILITY`` seconds before it failed: a replica is a server that was up and announced, not frozen, and not cut
off from that client (a new server's announcement takes a moment to be seen; a client that waits for missing blocks
reads the swarm again every half second). Whether the monitor saw each new server, and how soon, is reported too.
The time to detect a fault is from the moment the schedule applied it to the first line of a client's log that names
one of its victims (a failover, a ban after a failed ping, a caught liar). Memory is compared between the sample
nearest ``min(5 minutes, a sixth of the run)`` and the last one; descriptors by their floor over a window at each
end. Nothing here asserts: the benchmark prints these figures, the test checks a few of them.
"""

from __future__ import annotations

import re
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


def had_no_replica(run: SoakRun, client: int, blocks: list[int], failed: float, needed: int = 1) -> bool:
    """Whether a block of ``blocks`` (every block, when none is named) had fewer than ``needed`` live replicas for
    ``client`` at some moment within ``VISIBILITY`` seconds before ``failed``. A verifying client that finds two
    servers disagreeing needs a third to decide: with a liar serving, that is two honest replicas."""
    blocks = blocks or list(range(run.settings.layers))
    moment = failed - VISIBILITY
    while moment <= failed:
        if any(live_replicas(run, client, block, moment) < needed for block in blocks):
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


def _adjacent(route: list[str], victims: set[str]) -> bool:
    return any({first, second} == victims for first, second in zip(route, route[1:], strict=False))


def in_use(run: SoakRun, fault, moment: float | None) -> bool:
    """Whether a generation running at ``moment`` (at any moment: None) of a client that could notice ``fault`` had a
    victim of it on its route (as it was at its first token or at its end); for a link cut between two servers, the
    two one after the other (the link a push takes)."""
    victims = set(fault.victims)
    between_servers = fault.kind == "partition" and not fault.clients and len(victims) == 2
    return any(
        record.get("kind") == "generation"
        and (moment is None or record["started"] <= moment <= record["ended"])
        and (not fault.clients or record["client"] in fault.clients)
        and any(
            _adjacent(route, victims) if between_servers else victims & set(route)
            for route in (record.get("first_route", []), record.get("route", []))
        )
        for record in run.records
    )


def server_log_lines(run: SoakRun) -> list[tuple[float, str, str]]:
    """(Unix time, peer id, message) of every timed line in the servers' logs, in time order."""
    lines = []
    for peer in run.peers:
        if peer.role != "server" or not peer.peer_id or not peer.log.exists():
            continue
        for line in peer.log.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match:
                lines.append((float(match.group(1)), peer.peer_id, f"{match.group(3)}: {match.group(4)}"))
    return sorted(lines)


def detections(
    run: SoakRun, lines: list[tuple[float, int, str]], server_lines: list[tuple[float, str, str]] = ()
) -> list[dict]:
    """Per fault with victims: how long until a client's log first named one (from the moment a liar was up, for a
    liar), and whether a generation was using a victim then. A link cut between two servers is seen first by the
    one pushing over it: its own log naming the other counts too (``by`` says which noticed)."""
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
        candidates = [
            (moment, f"client{client}", message)
            for moment, client, message in lines
            if start <= moment <= start + DETECTION_WINDOW
            and (not fault.clients or client in fault.clients)
            and any(suffix in message for suffix in suffixes)
        ]
        if fault.kind == "partition" and not fault.clients:
            names = {peer.peer_id: peer.name for peer in run.peers}
            candidates += [
                (moment, names.get(peer_id, peer_id[-8:]), message)
                for moment, peer_id, message in server_lines
                if start <= moment <= start + DETECTION_WINDOW
                and peer_id in fault.victims
                and any(victim[-8:] in message for victim in fault.victims if victim != peer_id)
            ]
        first = min(candidates, default=None)
        entry = {"kind": fault.kind, "at_s": round(fault.at - run.started, 1), "target": fault.target}
        entry["in_use"] = in_use(run, fault, None if fault.kind == "tamper" else start)
        if first is not None:
            entry.update(after_s=round(first[0] - start, 2), by=first[1], line=first[2][:160])
        found.append(entry)
    return found


def _at(samples: list[dict], moment: float) -> dict | None:
    return min(samples, key=lambda sample: abs(sample["at"] - moment)) if samples else None


def resources(run: SoakRun) -> list[dict]:
    """Per process: memory (MiB) at its reference moment and at its last sample, and open descriptors as the least
    seen in the ``R`` seconds after the reference and in its last ``R`` seconds. The reference is ``R = min(5 minutes,
    a sixth of the run)`` after the later of the run's start and the process's own; a server that was sampled for at
    least ``R`` after it (``long_lived``) counts for the targets."""
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
        early = [sample for sample in peer.samples if reference <= sample["at"] <= reference + settle] or [first]
        late = [sample for sample in peer.samples if sample["at"] >= last["at"] - settle] or [last]
        for key in ("fds", "p2pd_fds"):
            if key in first and key in last:
                # Open descriptors go up and down with the streams in flight (9 to 25 within a minute on a busy
                # server), so a point against a point measures traffic; a leak raises the floor.
                row[key] = [_floor(early, key), _floor(late, key)]
                row[f"{key}_max"] = max(sample.get(key, 0) for sample in peer.samples)
        rows.append(row)
    return rows


def _floor(samples: list[dict], key: str) -> int:
    return min(sample[key] for sample in samples if key in sample)


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
        undecided = error["type"] == "VerificationError" and "no third server" in error["message"]
        attributed = had_no_replica(run, record["client"], error["blocks"], record["ended"], 2 if undecided else 1)
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
        "detections": detections(run, lines, server_log_lines(run)),
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
