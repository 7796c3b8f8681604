"""Swarm status aggregation (pure) and the live feed's error reporting, without a network."""

import asyncio
import logging

from petals_cli import evidence
from petals_cli.errors import SwarmUnreachableError
from petals_cli.swarm import (
    SCHEMA_VERSION,
    StatusFeed,
    SwarmStatus,
    block_ranges,
    connection_kind,
    format_ranges,
    model_status,
    read_flags,
)
from petals_cli.wire import ModelIndexEntry, ServerInfo, ServerState, SwarmSnapshot

ENTRY = ModelIndexEntry(model="org/tiny", num_blocks=6, family="llama")


def info(start, end, state=ServerState.ONLINE, **extra) -> ServerInfo:
    return ServerInfo(state=state, start_block=start, end_block=end, version="0.1.0", **extra)


def test_model_status_counts_only_online_servers_and_sorts_by_span():
    snapshot = SwarmSnapshot(
        prefix="tiny",
        num_blocks=6,
        servers={
            "peer-c": info(3, 6, ServerState.OFFLINE),
            "peer-b": info(2, 4, ServerState.JOINING),
            "peer-a": info(0, 3, public_name="alpha", pings={"peer-x": 0.01}),
        },
    )
    status = model_status(ENTRY, snapshot, rtts={"peer-a": 0.002}, connections={"peer-a": ["/ip4/1.2.3.4/tcp/1"]})
    assert status.coverage == (1, 1, 1, 0, 0, 0) and status.missing_blocks == (3, 4, 5) and not status.healthy
    assert [server.peer_id for server in status.servers] == ["peer-a", "peer-b", "peer-c"]
    first, second, third = status.servers
    assert (first.state, first.public_name, first.rtt, first.connection) == ("online", "alpha", 0.002, "direct")
    assert first.pings == {"peer-x": 0.01}
    assert (second.state, second.rtt, second.connection) == ("joining", None, "unknown")
    assert third.state == "offline"


def test_a_server_that_did_not_answer_is_unreachable_and_covers_nothing():
    snapshot = SwarmSnapshot(
        prefix="tiny",
        num_blocks=6,
        servers={"peer-a": info(0, 3), "peer-b": info(3, 6), "peer-c": info(2, 4, ServerState.JOINING)},
    )
    status = model_status(ENTRY, snapshot, unreachable={"peer-b", "peer-c"})
    assert status.coverage == (1, 1, 1, 0, 0, 0) and status.missing_blocks == (3, 4, 5) and not status.healthy
    assert [server.state for server in status.servers] == ["online", "joining", "unreachable"]  # joining: not asked


def test_json_schema_is_stable():
    snapshot = SwarmSnapshot(prefix="tiny", num_blocks=6, servers={"peer-a": info(0, 6, adapters=("lora",))})
    document = SwarmStatus(models=(model_status(ENTRY, snapshot),), taken_at=12.5).to_json()
    assert document["schema_version"] == SCHEMA_VERSION == 1
    assert (document["taken_at"], document["error"]) == (12.5, None)
    (model,) = document["models"]
    assert set(model) == {
        "prefix",
        "model",
        "family",
        "num_blocks",
        "healthy",
        "missing_blocks",
        "coverage",
        "servers",
    }
    assert model["healthy"] is True and model["coverage"] == [1] * 6
    assert set(model["servers"][0]) == {
        "peer_id",
        "public_name",
        "start_block",
        "end_block",
        "state",
        "throughput",
        "inference_rps",
        "forward_rps",
        "cache_tokens_left",
        "dtype",
        "quantization",
        "version",
        "protocol",
        "adapters",
        "connection",
        "pings",
        "rtt",
        "batch_size",
        "queue_length",
        "largest_batch",
        "sessions",
        "step_seconds",
        "batch_capacity",
        "flagged",
        "relays",
    }
    assert model["servers"][0]["adapters"] == ["lora"] and model["servers"][0]["flagged"] == 0


def test_status_shows_each_servers_live_load_in_its_table_and_json(capsys):
    from commands.swarm import SERVER_COLUMNS, _render_status

    busy = info(0, 6, sessions=6, queue_length=3, step_seconds=0.0642, batch_capacity=2, batch_size=2, largest_batch=2)
    snapshot = SwarmSnapshot(prefix="tiny", num_blocks=6, servers={"peer-busy": busy, "peer-old": info(0, 6)})
    status = SwarmStatus(models=(model_status(ENTRY, snapshot),), taken_at=12.5)
    servers = {server["peer_id"]: server for server in status.to_json()["models"][0]["servers"]}
    load = ("sessions", "queue_length", "step_seconds", "batch_capacity")
    assert [servers["peer-busy"][name] for name in load] == [6, 3, 0.0642, 2]
    assert [servers["peer-old"][name] for name in load] == [0, 0, 0.0, 0]  # a server that announces no load
    _render_status(status)
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if line.split()[:1] == ["peer"])
    assert "load" in header and "load" in SERVER_COLUMNS  # one column: sessions, queue, recent step (fits 80 wide)
    busy_row, old_row = (line.split() for line in lines if "online" in line)
    at = header.index("load") - 1  # the header's "cache left" is two words
    assert busy_row[at : at + 4] == ["6s", "q3", "64.2", "ms"]
    assert old_row[at : at + 3] == ["0s", "q0", "-"]


def test_status_of_a_flagged_server_shows_its_reports(capsys):
    from commands.swarm import _render_status

    snapshot = SwarmSnapshot(prefix="tiny", num_blocks=6, servers={"peer-a": info(0, 3), "peer-b": info(3, 6)})
    status = SwarmStatus(models=(model_status(ENTRY, snapshot, flagged={"peer-b": 2}),), taken_at=12.5)
    assert [server.flagged for server in status.models[0].servers] == [0, 2]
    assert [server["flagged"] for server in status.to_json()["models"][0]["servers"]] == [0, 2]
    _render_status(status)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith(" peer-")}
    assert "online ⚠ tampered (2 reports)" in rows["peer-b"] and "tampered" not in rows["peer-a"]


def test_flags_are_read_from_the_evidence_log_per_model(tmp_path, monkeypatch, caplog):
    log = tmp_path / "verification.jsonl"
    monkeypatch.setenv("PETALS_EVIDENCE_LOG", str(log))
    reporter = evidence.reporter_identity(tmp_path / "reporter.key")
    for prefix, suspect in (("tiny", "peer-b"), ("tiny", "peer-b"), ("other", "peer-a")):
        fields = dict(kind="forward", prefix=prefix, start=0, end=2, position=0, inputs_sha256="", suspect=suspect)
        fields |= dict(suspect_sha256="", witnesses=(), witness_sha256="", max_error=1.0, tolerance=0.1, time=1.0)
        evidence.append(evidence.sign(evidence.Evidence(**fields), reporter))
    assert read_flags(["tiny", "other", "empty"]) == {"tiny": {"peer-b": 2}, "other": {"peer-a": 1}, "empty": {}}
    monkeypatch.setenv("PETALS_EVIDENCE_LOG", str(tmp_path))  # a directory: unreadable as a log
    with caplog.at_level(logging.WARNING, logger="petals_cli.swarm"):
        assert read_flags(["tiny"]) == {}
    assert "cannot read the evidence log" in caplog.text


def test_block_ranges_and_connection_kinds():
    assert block_ranges([7, 2, 3, 4]) == [(2, 5), (7, 8)] and format_ranges((0, 1, 5)) == "0:2, 5:6"
    assert connection_kind(None) == connection_kind([]) == "unknown"
    assert connection_kind(["/ip4/1.2.3.4/tcp/5/p2p/QmRelay/p2p-circuit"]) == "relayed"
    assert connection_kind(["/ip4/1.2.3.4/tcp/5/p2p/QmRelay/p2p-circuit", "/ip4/5.6.7.8/tcp/9"]) == "direct"


def test_feed_reports_an_unreachable_swarm_as_a_status_and_retries():
    attempts = []

    def unreachable(config):
        attempts.append(config)
        raise SwarmUnreachableError("cannot reach initial peers /ip4/127.0.0.1/tcp/9")

    feed = StatusFeed(object(), interval=0.01, client_factory=unreachable)

    async def two_statuses():
        stream = feed.stream()
        statuses = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return statuses

    try:
        statuses = asyncio.run(two_statuses())
    finally:
        feed.close()
    assert [status.error.startswith("swarm unreachable: cannot reach") for status in statuses] == [True, True]
    assert len(attempts) == 2 and all(status.taken_at > 0 and not status.models for status in statuses)


HOSTILE = "[reverse]HACKED[/reverse] [link=https://evil.example]click[/link]\x1b[2J\x07"


def test_hostile_announcements_are_printed_as_plain_text_on_a_terminal(capsys, monkeypatch):
    """Every string a server announces, and the model index's names, reach the terminal as the text they are: no
    markup interpreted (reverse video, a hyperlink), control characters visible, lengths bounded."""
    from commands.swarm import _render_status

    hostile = ServerInfo(
        state=ServerState.ONLINE,
        start_block=0,
        end_block=6,
        public_name=HOSTILE,
        version="[blink]1[/blink]",
        dtype="[bold]f[/]",
        quantization="\x1b[5m",
    )
    snapshot = SwarmSnapshot(prefix="tiny", num_blocks=6, servers={"peer-a": hostile, "peer-b": info(0, 6)})
    entry = ModelIndexEntry(model="[link=https://evil.example]m[/link]", num_blocks=6, family="l" * 9000)
    status = SwarmStatus(models=(model_status(entry, snapshot, rtts={"peer-a": 0.001}),), taken_at=1.0)
    monkeypatch.setenv("FORCE_COLOR", "1")  # as on a terminal: styles are written as escape sequences
    monkeypatch.setenv("COLUMNS", "400")
    _render_status(status)
    out = capsys.readouterr().out
    assert "[reverse]HACKED[/reverse] [link=https://evil.example]click[/link]\\x1b[2J\\x07" in out
    assert "[blink]1[/blink]" in out and "[bold]f[/]/\\x1b[5m" in out and "[link=https://evil.example]m[/link]" in out
    assert "\x1b[7m" not in out and "\x1b[5m" not in out and "\x1b]8;" not in out  # no reverse, blink, link
    assert "\x1b[2J" not in out and "\x07" not in out
    assert "l" * 199 + "…" in out and "l" * 201 not in out


def test_an_error_a_server_relays_is_one_visible_bounded_line():
    from petals_cli.errors import ServerError, error_from_wire

    error = error_from_wire("server_error", "boom\x1b]8;;https://evil.example\x07click\nsecond line" + "y" * 5000)
    assert isinstance(error, ServerError) and "\n" not in str(error) and "\x1b" not in str(error)
    assert str(error).startswith("boom\\x1b]8;;https://evil.example\\x07click\\nsecond line")
    assert len(str(error)) <= 1000


def test_a_status_pings_a_bounded_number_at_once_within_one_deadline():
    from petals_cli.swarm import ping_within

    at_once, most = 4, 0
    running: set[str] = set()

    async def ping(peer: str) -> bool:
        nonlocal most
        running.add(peer)
        most = max(most, len(running))
        try:
            await asyncio.sleep(10.0 if peer.startswith("dead") else 0.01)  # a dead server: its ping times out
        finally:
            running.discard(peer)
        return True

    peers = [f"live{index}" for index in range(20)] + [f"dead{index}" for index in range(3)]
    answered = asyncio.run(asyncio.wait_for(ping_within(ping, peers, at_once=at_once, seconds=0.5), 5.0))
    assert most <= at_once and not running  # the pings cut short by the deadline were cancelled
    assert set(answered) == {f"live{index}" for index in range(20)}  # the dead ones: not measured, left out
    assert asyncio.run(ping_within(ping, [], at_once=at_once, seconds=0.5)) == {}
