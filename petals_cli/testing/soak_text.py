"""The text of a soak's report (``render``) and the issue's targets, met or missed, from ``soak_report.summarize``."""

from __future__ import annotations

import statistics

from petals_cli.testing.soak_report import (
    DETECTION_TARGET,
    FD_SLACK,
    MEMORY_SLACK_MIB,
    MEMORY_SLACK_SHARE,
    TIMED_KINDS,
    fds_ok,
    memory_ok,
)


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
            "failures only where no replica existed (for a verifying client: no honest one to decide), each typed and "
            "naming its blocks",
            f"{len(unattributed)} other, {len(attributed)} attributed",
            not unattributed and all(failure["blocks"] for failure in attributed),
        ),
        (
            f"memory: last within {MEMORY_SLACK_SHARE:.0%} or {MEMORY_SLACK_MIB:g} MiB of the value at 5 minutes",
            f"{sum(map(memory_ok, long_lived))}/{len(long_lived)} servers",
            all(map(memory_ok, long_lived)),
        ),
        (
            f"descriptors flat (floor over the last window at most +{FD_SLACK} over the floor at 5 minutes)",
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
        undecided = "no third server" in failure["message"]
        cause = ("no honest replica to decide" if undecided else "no live replica") if failure["no_replica"] else ""
        cause = cause or "replicas existed"
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
    lines.append(
        "faults (+seconds into the run), and when a client's log first named the victim (for a link cut between two "
        "servers, either one's log naming the other too):"
    )
    noticed = {(entry["at_s"], entry["kind"]): entry for entry in report["detections"]}
    for fault in report["faults"]:
        entry = noticed.get((fault["at_s"], fault["kind"]))
        seen = ""
        if entry is not None:
            named = f"named after {entry['after_s']:g} s by {entry['by']}" if "after_s" in entry else ""
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
        "memory (RSS MiB), 5 minutes (or a sixth of the run) into the process's life -> at its last sample, and open "
        "descriptors, the least seen in a window of that length after it -> in the last one (the server, then its "
        "libp2p daemon):"
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
