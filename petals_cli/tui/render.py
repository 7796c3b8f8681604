"""Pure rendering for `swarm top`: ``SwarmStatus`` in, rich ``Text`` and table cells out (no widgets, no I/O).

Everything is ``Text``, never a markup string: what servers announce may look like markup (a table cell given as a
string would be parsed as such), and is shown as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.text import Text

from petals_cli.swarm import ModelStatus, ServerStatus, SwarmStatus, format_ranges, short_peer_id

STATE_STYLES = {"online": "green", "joining": "yellow", "offline": "red", "unreachable": "bold red"}
FLAG_STYLE = "bold red"
COLUMNS = (
    ("model", "model"),
    ("peer", "peer"),
    ("name", "name"),
    ("span", "span"),
    ("state", "state"),
    ("throughput", "tput"),
    ("cache", "cache left"),
    ("sessions", "sessions"),
    ("queue", "queue"),
    ("step", "step"),
    ("dtype", "dtype"),
    ("version", "version"),
    ("link", "link"),
    ("rtt", "rtt"),
)
Row = tuple[ModelStatus, ServerStatus]
SORT_KEYS: dict[str, Callable[[Row], Any]] = {
    "span": lambda row: (row[0].prefix, row[1].start_block, row[1].end_block, row[1].peer_id),
    "peer": lambda row: row[1].peer_id,
    "name": lambda row: (row[1].public_name.lower(), row[1].peer_id),
    "state": lambda row: (row[1].state != "online", row[1].state, row[1].peer_id),
    "throughput": lambda row: (-row[1].throughput, row[1].peer_id),
    "cache": lambda row: (-row[1].cache_tokens_left, row[1].peer_id),
    "sessions": lambda row: (-row[1].sessions, -row[1].queue_length, row[1].peer_id),
    "rtt": lambda row: (row[1].rtt is None, row[1].rtt or 0.0, row[1].peer_id),
}


def milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def step_text(server: ServerStatus) -> str:
    """Its recent one-token step time under load; "-" before its first step (or from a server too old to say)."""
    return milliseconds(server.step_seconds) if server.step_seconds > 0 else "-"


def load_text(server: ServerStatus) -> str:
    """Sessions open and how many one step runs together: "6 (1 a step)"; just the count when not announced."""
    capacity = f" ({server.batch_capacity} a step)" if server.batch_capacity else ""
    return f"{server.sessions}{capacity}"


def flag_text(flagged: int) -> str:
    """The marker of a server that this machine's verification reported; "" when there are no reports."""
    return f"⚠ tampered ({_count(flagged, 'report')})" if flagged > 0 else ""


def state_text(server: ServerStatus) -> Text:
    text = Text(server.state, style=STATE_STYLES.get(server.state, ""))
    if server.flagged:
        text.append(f" {flag_text(server.flagged)}", style=FLAG_STYLE)
    return text


def row_key(row: Row) -> str:
    return f"{row[0].prefix}/{row[1].peer_id}"


def server_rows(status: SwarmStatus, *, sort: str = "span", text_filter: str = "") -> list[Row]:
    """Every (model, server) pair, filtered by a peer id / public name substring, sorted by ``sort``."""
    needle = text_filter.lower()
    rows = [
        (model, server)
        for model in status.models
        for server in model.servers
        if needle in server.peer_id.lower() or needle in server.public_name.lower()
    ]
    return sorted(rows, key=SORT_KEYS[sort])


def table_cells(row: Row) -> tuple[Text, ...]:
    model, server = row
    return (
        Text(model.prefix),
        Text(server.short_id),
        Text(server.public_name or "-"),
        Text(f"{server.start_block}:{server.end_block}"),
        state_text(server),
        Text(f"{server.throughput:.1f}"),
        Text(str(server.cache_tokens_left)),
        Text(str(server.sessions)),
        Text(str(server.queue_length)),
        Text(step_text(server)),
        Text(server.precision),
        Text(server.version),
        Text(server.connection),
        Text(milliseconds(server.rtt)),
    )


def models_text(status: SwarmStatus) -> Text:
    if not status.models:
        return Text("no models served yet" if status.taken_at else "waiting for the first update…", style="dim")
    text = Text()
    for model in status.models:
        online = sum(server.state == "online" for server in model.servers)
        text.append(f"{model.prefix} ", style="bold")
        text.append(f"{model.family}, {model.num_blocks} blocks, {online}/{len(model.servers)} servers online  ")
        if model.healthy:
            text.append("healthy", style="bold green")
        else:
            text.append(f"broken: no server for blocks {format_ranges(model.missing_blocks)}", style="bold red")
        text.append("\n")
    text.rstrip()
    return text


def coverage_text(status: SwarmStatus, rows: list[Row]) -> Text:
    """Blocks × servers: a cell per block each server holds, coloured by its state; then per-block counts."""
    text = Text()
    shown = {row_key(row) for row in rows}
    for model in status.models:
        text.append(f"{model.prefix}\n", style="bold")
        for server in model.servers:
            if row_key((model, server)) not in shown:
                continue
            text.append(f"{server.short_id:>10} ")
            for index in range(model.num_blocks):
                held = server.start_block <= index < server.end_block
                text.append("█" if held else "·", style=STATE_STYLES.get(server.state, "") if held else "dim")
            text.append("\n")
        text.append(f"{'online':>10} ")
        for count in model.coverage:
            text.append(str(count) if count < 10 else "+", style="red" if count == 0 else "green")
        text.append("\n")
    text.rstrip()
    return text


def detail_text(row: Row | None) -> Text:
    if row is None:
        return Text("select a server", style="dim")
    model, server = row
    text = Text()
    text.append(f"{server.public_name or server.short_id}\n", style="bold")
    lines = [
        ("peer id", server.peer_id),
        ("model", f"{model.prefix} blocks {server.start_block}:{server.end_block}"),
        ("state", server.state),
        ("version", f"{server.version} (protocol {server.protocol})"),
        ("dtype", f"{server.dtype}, quantization {server.quantization}"),
        (
            "throughput",
            f"{server.throughput:.1f} (inference {server.inference_rps:.1f}/s, forward {server.forward_rps:.1f}/s)",
        ),
        ("cache left", f"{server.cache_tokens_left} tokens"),
        ("sessions", load_text(server)),
        (
            "step engine",
            f"last step {server.batch_size} session(s), largest {server.largest_batch}, "
            f"{server.queue_length} waiting, recent step {step_text(server)}",
        ),
        ("adapters", ", ".join(server.adapters) or "none"),
        (
            "link",
            server.connection + (f" through {', '.join(map(short_peer_id, server.relays))}" if server.relays else ""),
        ),
        ("rtt (this client)", milliseconds(server.rtt)),
    ]
    for label, value in lines:
        text.append(f"{label}: ", style="bold")
        text.append(f"{value}\n")
    if server.flagged:
        text.append("verification: ", style="bold")
        text.append(f"{flag_text(server.flagged)} in this machine's evidence log\n", style=FLAG_STYLE)
    text.append("pings to next servers:\n", style="bold")
    if not server.pings:
        text.append("  none\n", style="dim")
    for peer, rtt in sorted(server.pings.items()):
        text.append(f"  {short_peer_id(peer)}  {milliseconds(rtt)}\n")
    text.rstrip()
    return text


def status_line(latest: SwarmStatus, last_good: SwarmStatus | None, *, sort: str, text_filter: str) -> Text:
    text = Text()
    if latest.error:
        text.append(f"⚠ {latest.error}", style="bold red")
        text.append(f" · last good update {_clock(last_good.taken_at) if last_good else 'never'} · retrying")
    elif latest.taken_at:
        servers = sum(len(model.servers) for model in latest.models)
        text.append(f"updated {_clock(latest.taken_at)} · {_count(len(latest.models), 'model')} · ")
        text.append(_count(servers, "server"))
    else:
        text.append("connecting…")
    text.append(f" · sort: {sort}")
    if text_filter:
        text.append(f" · filter: {text_filter!r}")
    text.append(" · ? help")
    return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))
