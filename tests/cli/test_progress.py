"""Terminal feedback (loading spinners, weights bar, connecting, bench phases, waits for servers) goes to a terminal's
stderr, and never into pipes; the client reports a wait for servers through a hook, not by printing."""

import asyncio
import io
import os
import random
import signal
import subprocess

import pexpect
import pytest

from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.errors import ModelNotServedError, NoRouteError
from petals_cli.routing import BanList
from petals_cli.testing import make_tiny_model
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot
from tests.conftest import petals_command

SPINNER_WORDS = ("Loading", "Connecting", "Waiting", "Measuring", "\x1b[")


def test_feedback_shows_on_a_terminal_only(tmp_path):
    bootstrap = subprocess.Popen(
        petals_command("swarm", "bootstrap"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        model = make_tiny_model(tmp_path / "tiny", num_layers=2)
        peers = bootstrap.stdout.readline().split()[1:]  # a swarm where nobody serves the model
        environment = {**os.environ, "PETALS_ROUTE_WAIT": "2"}
        generate = petals_command("generate", str(model), "--prompt", "x", "--initial-peers", *peers)
        bench = petals_command("bench", str(model), "--initial-peers", *peers, "--mode", "inference")
        piped = subprocess.Popen(generate, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        terminal_options = {"encoding": "utf-8", "timeout": 120, "dimensions": (40, 200), "env": environment}
        terminals = [pexpect.spawn(command[0], command[1:], **terminal_options) for command in (generate, bench)]
        phases = {
            0: ["Loading petals", f"Loading {model}", "Loading local weights of", "Connecting to the swarm"],
            1: ["Loading petals", "connecting to the swarm", "Measuring through the swarm: inference, warming up"],
        }
        for index, terminal in enumerate(terminals):
            for phase in phases[index]:
                terminal.expect_exact(phase)
            terminal.expect_exact("Waiting for servers of blocks 0:2 (")
            terminal.expect_exact("error: no server announces any block")
            terminal.expect(pexpect.EOF)
            terminal.close()
            assert terminal.exitstatus == 5
        stdout, stderr = piped.communicate(timeout=120)  # bench's pipe: tests/cli/test_bench.py
        assert piped.returncode == 5, stderr
        assert "no server announces any block" in stderr
        assert not [word for word in SPINNER_WORDS if word in stdout + stderr]
    finally:
        bootstrap.send_signal(signal.SIGINT)
        bootstrap.wait(10)


def _server(start, end):
    return ServerInfo(state=ServerState.ONLINE, start_block=start, end_block=end, version="test", cache_tokens_left=99)


def _client(snapshots, route_wait):
    """A SwarmClient with no network: its reads of the swarm return ``snapshots`` in turn (the last one then on)."""
    client = SwarmClient.__new__(SwarmClient)
    client.config = ClientConfig(route_wait=route_wait)
    client.bans, client.rtts, client._silent, client._rng = BanList(), {}, {}, random.Random(0)
    client.live, client._placed = {}, {}  # no server's load read yet, no session placed
    client.waits = []
    client.on_route_wait = lambda missing, seconds_left: client.waits.append((missing, seconds_left))

    async def snapshot(prefix, num_blocks, *, max_age=None):
        servers = snapshots.pop(0) if len(snapshots) > 1 else snapshots[0]
        return SwarmSnapshot(prefix=prefix, num_blocks=num_blocks, servers=servers)

    client.snapshot = snapshot
    return client


def test_route_tells_its_hook_which_blocks_it_waits_for_and_when_the_wait_ends():
    half, whole = {"a": _server(0, 2)}, {"a": _server(0, 2), "b": _server(2, 4)}
    client = _client([half, half, whole], route_wait=0.2)  # the first read, one again at once, then after a pause
    assert [span.peer_id for span in asyncio.run(client.route("m", 4))] == ["a", "b"]
    assert [missing for missing, _ in client.waits] == [(2, 3), ()]
    assert 0 < client.waits[0][1] <= 0.2

    client = _client([whole], route_wait=5.0)  # found at once: nothing to tell
    asyncio.run(client.route("m", 4))
    assert client.waits == []

    client = _client([{}], route_wait=0.1)  # gives up: the wait still ends before the error
    with pytest.raises(ModelNotServedError):
        asyncio.run(client.route("m", 4, 1, 3))
    assert client.waits[0][0] == (1, 2) and client.waits[-1] == ((), 0.0)

    client = _client([half], route_wait=0.0)  # no waiting allowed: no wait to tell
    with pytest.raises(NoRouteError):
        asyncio.run(client.route("m", 4))
    assert client.waits == []


def test_a_route_wait_takes_the_spinner_line_and_gives_it_back():
    from rich.console import Console

    from petals_cli.commands._progress import Feedback

    screen = io.StringIO()
    feedback = Feedback(Console(file=screen, force_terminal=True, width=120))
    feedback.say("Measuring through the swarm…")
    feedback.route_wait((4, 5), 9.6)
    assert "Waiting for servers of blocks 4:6 (10s left)…" in screen.getvalue()
    written = len(screen.getvalue())
    feedback.route_wait((), 0.0)
    assert "Measuring through the swarm…" in screen.getvalue()[written:]
    feedback.clear()

    feedback = Feedback(Console(file=io.StringIO(), force_terminal=True))
    feedback.route_wait((1,), 3.0)
    feedback.route_wait((), 0.0)  # nothing was shown before the wait: the line goes away
    assert feedback._live is None

    silent = Feedback()  # not a terminal
    silent.say("Loading…")
    silent.route_wait((1,), 3.0)
    silent.weights(1, 2)
    assert not silent.enabled and silent._live is None
