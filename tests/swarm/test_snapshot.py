"""What clients and servers learn about each other: published pings, and info answered while busy."""

import os
import threading
from pathlib import Path

import pytest
import torch
from hivemind.proto import runtime_pb2

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm
from tests.swarm.checks import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-snapshot", "llama", num_layers=4)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start("2:4")
        swarm.start("0:2")  # announces after 2:4 is up, so its first announce carries a ping to it
        yield swarm
    finally:
        swarm.stop()


def peer_of(server):
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


def test_servers_publish_pings_to_the_servers_of_their_next_block(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(swarm.model), initial_peers=swarm.initial_peers)
    try:
        client = model.petals_client
        snapshot = client.run(client.snapshot(model.petals_prefix, 4))
        first, second = peer_of(swarm.servers[1]), peer_of(swarm.servers[0])
        assert set(snapshot.servers[first].pings) == {second}
        assert 0 < snapshot.servers[first].pings[second] < 5
        assert snapshot.servers[second].pings == {}  # it holds the last block: nothing comes after it
        assert eventually(lambda: set(client.rtts) >= {first, second})  # the background refresh pings both
    finally:
        model.close()


def cpu_seconds(server) -> float:
    """CPU time the server process has used so far, all its threads together (Linux /proc)."""
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, counted in clock ticks


def test_a_busy_server_still_answers_info(swarm):
    last = swarm.servers[0]  # blocks 2:4: the forward's last hop, so the worker runs until this server answers
    model = AutoDistributedModelForCausalLM.from_pretrained(str(swarm.model), initial_peers=swarm.initial_peers)
    try:
        hidden = torch.randn(8, 2048, 64)
        worker = threading.Thread(target=lambda: model.remote_blocks(hidden))
        client = model.petals_client
        stub = client.stub(peer_of(last))
        idle = cpu_seconds(last)
        worker.start()
        # The forward is computing there once the server has used 0.05 s of CPU (idle, it uses a few milliseconds
        # a second; this forward takes it about 0.4 s). The deadline only bounds a hang.
        assert eventually(lambda: cpu_seconds(last) - idle >= 0.05 or not worker.is_alive(), timeout=60, interval=0.01)
        assert worker.is_alive(), "the forward finished too fast to test anything"
        info = client.run(stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=30))
        answered_at = cpu_seconds(last)
        worker.join(120)
        assert info.serialized_info
        # Answered during the forward, not after it: the server went on computing after answering. A server that
        # computed on its event loop would answer only at the end (then this is a clock tick at most).
        assert cpu_seconds(last) - answered_at >= 0.05, "info was answered only once the forward had ended"
    finally:
        model.close()
