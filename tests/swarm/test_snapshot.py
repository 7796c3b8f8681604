"""What clients and servers learn about each other: published pings, and info answered while busy."""

import os
import threading
from pathlib import Path

import pytest
import torch
from hivemind.proto import runtime_pb2

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_tiny_model
from petals_cli.wire import ServerInfo, ServerState
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


def test_each_server_keeps_one_record_under_its_models_server_key_and_none_per_block(swarm):
    from petals_cli.wire import block_uid, servers_key

    model = AutoDistributedModelForCausalLM.from_pretrained(str(swarm.model), initial_peers=swarm.initial_peers)
    try:
        client, prefix = model.petals_client, model.petals_prefix
        node = client.node
        found = client.run(node.get(servers_key(prefix), latest=True), timeout=30)
        records = {peer: ServerInfo.from_wire(item.value) for peer, item in found.value.items()}
        assert {peer: (info.start_block, info.end_block) for peer, info in records.items()} == {
            peer_of(swarm.servers[0]): (2, 4),
            peer_of(swarm.servers[1]): (0, 2),
        }
        per_block = client.run(node.get_many([block_uid(prefix, index) for index in range(4)]), timeout=30)
        assert all(entry is None for entry in per_block.values())
    finally:
        model.close()


def test_a_swarm_of_servers_announcing_per_block_records_is_still_read(swarm):
    """Servers from before the one-record layout stored their record under every block they hold; a model that has
    no server record is read that way."""
    from petals_cli import daemon, security
    from petals_cli.dht import announce_blocks, fetch_snapshot, start_dht

    model = AutoDistributedModelForCausalLM.from_pretrained(str(swarm.model), initial_peers=swarm.initial_peers)
    client = model.petals_client

    async def announce_old_style() -> str:
        identity = security.Identity.load_or_create(None)
        p2p = await daemon.create_p2p(
            initial_peers=swarm.initial_peers, identity_path=identity.path, fresh_identity=True
        )
        identity.discard_file()
        node = await start_dht(p2p, swarm.initial_peers, client_mode=False, identity=identity)
        try:
            info = ServerInfo(ServerState.ONLINE, 1, 3, "0", public_name="older")
            assert await announce_blocks(node, "tiny-older", identity.peer_id, info, expiration=60)
            return identity.peer_id
        finally:
            await node.shutdown()
            await p2p.shutdown()

    try:
        older = client.run(announce_old_style(), timeout=60)
        snapshot = client.run(fetch_snapshot(client.node, "tiny-older", 4), timeout=30)
        assert set(snapshot.servers) == {older}
        assert (snapshot.servers[older].start_block, snapshot.servers[older].end_block) == (1, 3)
        assert snapshot.servers[older].public_name == "older"
    finally:
        model.close()
