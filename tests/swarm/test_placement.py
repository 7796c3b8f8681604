"""Servers that choose their own blocks: placement on an empty swarm, filling gaps, moving after a death."""

import signal

import pytest

from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.testing import make_tiny_model
from petals_cli.wire import ServerState
from tests.conftest import Swarm
from tests.swarm.checks import eventually

pytestmark = pytest.mark.slow
NUM_LAYERS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-placement", "llama", num_layers=NUM_LAYERS)


@pytest.fixture
def swarm(model, tmp_path, monkeypatch):
    monkeypatch.setenv("PETALS_PLACEMENT_DELAY", "0")
    monkeypatch.setenv("PETALS_ANNOUNCE_PERIOD", "2")  # dead servers' records expire within ~10 s
    monkeypatch.setenv("PETALS_BALANCE_PERIOD", "1")
    swarm = Swarm(model=model, workdir=tmp_path)
    yield swarm
    swarm.stop()


def spans(swarm) -> dict[str, tuple[int, int, ServerState]]:
    client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        snapshot = client.run(client.snapshot("tiny-placement", NUM_LAYERS, max_age=0))
    finally:
        client.close()
    return {peer: (info.start_block, info.end_block, info.state) for peer, info in snapshot.servers.items()}


def peer_of(server):
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


def test_num_blocks_servers_tile_an_empty_swarm_and_auto_fills_a_killed_servers_gap(swarm, monkeypatch):
    monkeypatch.setenv("PETALS_ANNOUNCE_PERIOD", "30")  # a killed server's records outlive this test
    first = swarm.start("3")
    second = swarm.start("auto", "--num-blocks", "3")
    found = spans(swarm)
    assert {found[peer_of(first)][:2], found[peer_of(second)][:2]} == {(0, 3), (3, 6)}
    # Leave a gap at 0:3 by killing the first server: its record still says online, but it does not answer,
    # so a newcomer placed automatically fills the gap instead of doubling the live server's blocks.
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    third = swarm.start("2")
    assert spans(swarm)[peer_of(third)][:2] in {(0, 2), (1, 3)}
    assert "leaving out 1 announced server(s) that do not answer" in third.log_file.read_text()


def test_blocks_auto_takes_what_fits_in_memory(swarm):
    server = swarm.start("auto")
    assert spans(swarm)[peer_of(server)][:2] == (0, NUM_LAYERS)  # a tiny model fits whole in RAM


def test_a_rebalancing_server_moves_to_cover_a_dead_servers_blocks(swarm):
    left = swarm.start("0:3")
    right = swarm.start("3:6")
    mover = swarm.start("3")
    start, end, _ = spans(swarm)[peer_of(mover)]
    victim = left if start >= 3 else right  # the fixed server whose blocks the mover does not hold
    gap = (0, 3) if victim is left else (3, 6)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    assert eventually(lambda: spans(swarm).get(peer_of(mover), (None, None, None))[:2] == gap, 40.0, 0.5)
    assert spans(swarm)[peer_of(mover)][2] == ServerState.ONLINE
