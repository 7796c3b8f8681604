"""Peers find the swarm again by themselves: after a bootstrap peer restarts, and after every link dropped.

The bootstrap peer restarts with its identity at the same port (the address everyone configured), knowing nobody.
Servers ping their initial peers every announce period, so the restarted bootstrap learns of them and clients that
join through it see the whole swarm; a client started while it is down waits, saying so; a client whose DHT lost
every peer pings its initial peers again and routes through servers that joined meanwhile.
"""

import logging
import os
import signal
import subprocess
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.config import ClientConfig
from petals_cli.testing import make_tiny_model
from petals_cli.wire import ServerState
from tests.conftest import ServerProcess, Swarm, petals_command
from tests.swarm.checks import eventually
from tests.swarm.test_degradation import free_port, start_bootstrap

pytestmark = pytest.mark.slow
INPUT_IDS = torch.tensor([[1, 40, 41, 42, 43]])


@pytest.fixture
def model_path(tmp_path):
    return make_tiny_model(tmp_path / "tiny-reconnect", "llama", num_layers=2)


@pytest.fixture
def expected(model_path):
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return local.generate(INPUT_IDS, max_new_tokens=8, do_sample=False).tolist()


class Bootstrap:
    """`petals swarm bootstrap` at a fixed port and identity: the same address across restarts."""

    def __init__(self, workdir):
        self.workdir, self.port = workdir, free_port()
        self.process, self.address = start_bootstrap(workdir, self.port)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart(self) -> None:
        self.process, address = start_bootstrap(self.workdir, self.port)
        assert address == self.address


@pytest.fixture
def swarm(model_path, tmp_path):
    bootstrap = Bootstrap(tmp_path)
    swarm = Swarm(model=model_path, workdir=tmp_path)
    yield swarm, bootstrap
    swarm.stop()
    bootstrap.kill()


def start_server(swarm: Swarm, bootstrap: Bootstrap, blocks: str) -> ServerProcess:
    """A server that joins through the bootstrap peer only, announcing every second."""
    index = len(swarm.servers)
    address_file, log_file = swarm.workdir / f"server{index}.addr", swarm.workdir / f"server{index}.log"
    command = petals_command(
        "serve", str(swarm.model), "--blocks", blocks, "--initial-peers", bootstrap.address,
        "--address-file", str(address_file),
    )  # fmt: skip
    with open(log_file, "wb") as log:
        env = {**os.environ, "PETALS_ANNOUNCE_PERIOD": "1"}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(blocks, process, address_file, log_file)
    swarm.servers.append(server)
    swarm.wait_ready(server)
    return server


def connect(model_path, bootstrap: Bootstrap, **config):
    config = ClientConfig(initial_peers=(bootstrap.address,), snapshot_refresh=1.0, **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(model_path), config=config)


def online(model) -> set[str]:
    client = model.petals_client
    snapshot = client.run(client.snapshot(model.petals_prefix, model.petals_num_blocks, max_age=0), timeout=30)
    return {peer for peer, info in snapshot.servers.items() if info.state == ServerState.ONLINE}


def peer_of(server) -> str:
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


def test_a_restarted_bootstrap_learns_the_swarm_and_a_client_started_meanwhile_waits_for_it(
    swarm, model_path, expected, caplog
):
    swarm, bootstrap = swarm
    servers = [start_server(swarm, bootstrap, "0:1"), start_server(swarm, bootstrap, "1:2")]
    bootstrap.kill()  # the servers still know each other: neither is alone
    joined, errors = [], []

    def join():
        try:
            joined.append(connect(model_path, bootstrap, connect_timeout=60.0))
        except Exception as exc:  # reported below
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="petals_cli.client.swarm"):
        thread = threading.Thread(target=join)
        thread.start()
        assert eventually(lambda: "waiting for the swarm" in caplog.text, timeout=30)
        bootstrap.restart()  # knows nobody: the servers' periodic pings must tell it of them
        thread.join(90)
    assert not errors and joined
    model = joined[0]
    try:
        assert eventually(lambda: online(model) == {peer_of(server) for server in servers}, timeout=30)
        assert model.generate(INPUT_IDS, max_new_tokens=8, do_sample=False).tolist() == expected
    finally:
        model.close()


def test_a_client_that_lost_every_peer_finds_the_swarm_again_through_its_initial_peers(
    swarm, model_path, expected, caplog
):
    swarm, bootstrap = swarm
    start_server(swarm, bootstrap, "0:2")
    model = connect(model_path, bootstrap)
    try:
        assert model.generate(INPUT_IDS, max_new_tokens=8, do_sample=False).tolist() == expected
        swarm.stop()  # every peer this client knew is gone...
        bootstrap.kill()
        client = model.petals_client
        assert eventually(lambda: not client.node.protocol.routing_table.uid_to_peer_id, timeout=60)
        with caplog.at_level(logging.INFO, logger="petals_cli.client.swarm"):
            bootstrap.restart()  # ...then the network comes back, with a new server
            newcomer = start_server(swarm, bootstrap, "0:2")
            assert eventually(lambda: peer_of(newcomer) in online(model), timeout=60)
        assert "reconnected to the swarm's DHT" in caplog.text
        assert model.generate(INPUT_IDS, max_new_tokens=8, do_sample=False).tolist() == expected
    finally:
        model.close()
