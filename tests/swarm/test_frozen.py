"""Servers that stop answering without dying: SIGSTOPped processes and hung compute threads.

A frozen server keeps its TCP connections and its libp2p daemon open, so nothing breaks on the client's side: only
the liveness checks notice it. The client must fail over exactly, ``swarm status`` must show it ``unreachable``,
placement must not count it, and after SIGCONT it must serve again with its stale sessions closed. Stalls are
printed (run with ``-s``), never asserted.
"""

import json
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.swarm import collect_status
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm, petals_command
from tests.swarm.checks import eventually

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
BUDGET = 4096
PROMPT_IDS = torch.tensor([[1, 57, 210, 33, 98, 402, 17]])
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-frozen", "llama", num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def expected(model_path):
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return local.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


@pytest.fixture
def swarm(model_path, tmp_path):
    swarm = Swarm(model=model_path, workdir=tmp_path)
    yield swarm
    for server in swarm.servers:  # a stopped process ignores SIGTERM until it runs again
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
    swarm.stop()


def connect(model_path, swarm, **config):
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(model_path), config=config)


def peer_of(server) -> str:
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


def server_of(swarm, peer_id):
    return next(server for server in swarm.servers if peer_of(server) == peer_id)


class Clock:
    """A streamer that times every token and calls ``action(session)`` at token ``at``."""

    def __init__(self, session, at: int, action):
        self.session, self.at, self.action = session, at, action
        self.times, self.count, self.acted_after = [time.perf_counter()], 0, None
        self.peer = ""

    def put(self, value):
        self.count += 1
        if self.count == self.at:
            self.peer = self.action(self.session)
            self.acted_after = len(self.times)
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def stall(self) -> float:
        """The step that met the fault, less the median step."""
        steps = [later - earlier for earlier, later in zip(self.times, self.times[1:], strict=False)]
        return steps[self.acted_after] - sorted(steps)[len(steps) // 2]


def generate_with(model_path, swarm, at: int, action):
    """Greedy generation in a session, ``action(session)`` called at token ``at``: the output, the ``Clock``, the
    peers of the session's last route and its failovers."""
    model = connect(model_path, swarm)
    try:
        with model.inference_session(max_length=PROMPT_IDS.shape[1] + NEW_TOKENS) as session:
            clock = Clock(session, at, action)
            output = model.generate(
                PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False, session=session, streamer=clock
            )
            return output, clock, {span.peer_id for span in session.route}, session.failovers
    finally:
        model.close()


def status(swarm) -> dict:
    command = petals_command("swarm", "status", "--json", "--initial-peers", *swarm.initial_peers)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    (model,) = json.loads(result.stdout)["models"]
    return model


def servers_seen(client: SwarmClient) -> dict:
    """What `swarm status` shows of each server, read in this process."""
    (model,) = client.run(collect_status(client), timeout=60).models
    return {server.peer_id: server for server in model.servers}


def states(swarm) -> dict[str, str]:
    return {server["peer_id"]: server["state"] for server in status(swarm)["servers"]}


def test_a_sigstopped_server_is_failed_over_exactly_shown_unreachable_and_rejoins_after_sigcont(
    swarm, model_path, expected
):
    for blocks in ("0:2", "2:4", "2:4"):
        swarm.start(blocks, "--cache-tokens", str(BUDGET))

    def freeze(session):
        peer = session.route[-1].peer_id
        server_of(swarm, peer).process.send_signal(signal.SIGSTOP)
        return peer

    output, clock, route, failovers = generate_with(model_path, swarm, 8, freeze)
    frozen = clock.peer
    print(f"\nSIGSTOP of the server in use: the step that met it took {clock.stall():.2f}s more than the median")
    assert output.tolist() == expected  # the same tokens as local transformers, across the failover
    assert failovers == 1 and frozen not in route  # the frozen server was left, once, for its replica
    assert states(swarm)[frozen] == "unreachable"  # announced online, does not answer

    server = server_of(swarm, frozen)
    server.process.send_signal(signal.SIGCONT)
    # it answers again, and the session it held when it froze (its client left it) is closed: cache given back
    reader = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        assert eventually(lambda: servers_seen(reader)[frozen].state == "online", timeout=60, interval=0.5)
        assert eventually(lambda: servers_seen(reader)[frozen].cache_tokens_left == BUDGET, timeout=30)
    finally:
        reader.close()
    servers = status(swarm)["servers"]
    assert len(servers) == 3 and {entry["state"] for entry in servers} == {"online"}  # announced once, as before
    assert server.process.poll() is None and "Traceback" not in server.log()
    model = connect(model_path, swarm, allowed_servers=(peer_of(swarm.servers[0]), frozen))
    try:  # and it serves new sessions exactly
        output = model.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        model.close()
    assert output.tolist() == expected


def test_placement_and_clients_leave_out_frozen_servers_but_a_client_hearing_nobody_blames_itself(swarm):
    swarm.start_many("0:2", "2:4", "2:4")
    for server in swarm.servers[1:]:
        server.process.send_signal(signal.SIGSTOP)
    # counted, blocks 2:4 would have two servers and 0:2 one: a newcomer would take 0:2
    newcomer = swarm.start("auto", "--num-blocks", "2")
    assert eventually(lambda: newcomer.log().count("blocks 2:4") > 0, timeout=30), newcomer.log()
    assert "blocks 0:2 of" not in newcomer.log()

    frozen = {peer_of(server) for server in swarm.servers[1:3]}
    client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        snapshot = client.run(client.snapshot("tiny-frozen", NUM_LAYERS, max_age=0), timeout=60)
        assert client.bans.banned(time.monotonic()) == frozen and set(client._silent) == frozen
        # every server silent at once looks, from a client, like its own link or process stalling: nobody more is
        # banned or silenced for it
        for server in (swarm.servers[0], newcomer):
            server.process.send_signal(signal.SIGSTOP)
        client.run(client._ping_all(snapshot), timeout=60)
        assert set(client.bans.failures) == frozen and set(client._silent) == frozen
    finally:
        client.close()


def test_a_server_whose_compute_hangs_is_failed_over_exactly(swarm, model_path, expected):
    swarm.start("0:2")
    # its compute thread takes the prompt and 3 tokens, then hangs on the next while its RPCs keep answering
    swarm.start("2:4", faulty=("--hang-after", "4"))

    def add_replica(session):  # the route is set: a replica to fail over to
        swarm.start("2:4")
        return session.route[-1].peer_id

    output, clock, route, failovers = generate_with(model_path, swarm, 2, add_replica)
    hung = peer_of(swarm.servers[1])
    assert clock.peer == hung  # it was on the route
    assert "compute hangs at call 5" in swarm.servers[1].log()
    assert output.tolist() == expected
    assert failovers == 1 and hung not in route
    assert states(swarm)[hung] == "unreachable"


def test_a_push_acknowledged_too_late_is_relayed_and_the_copy_dropped(swarm, model_path, expected):
    pusher = swarm.start("0:2", "--verbose")
    late = swarm.start("2:4", "--verbose", faulty=("--push-ack-delay", "1.5"))
    model = connect(model_path, swarm)
    try:
        with model.inference_session(max_length=PROMPT_IDS.shape[1] + 6) as session:
            output = model.generate(PROMPT_IDS, max_new_tokens=6, do_sample=False, session=session)
            failovers, relayed = session.failovers, session.relayed_hops
    finally:
        model.close()
    assert output.tolist() == [expected[0][: PROMPT_IDS.shape[1] + 6]]
    assert failovers == 0  # the second copy of the late-pushed step that reached the server was not an error
    assert late.log().count("came twice") == 1
    # the first server gave up on its push once, then left that hop to the client instead of waiting every step
    assert pusher.log().count("failed (TimeoutError") == 1 and relayed >= 6
