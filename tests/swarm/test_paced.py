"""Paced servers (``petals_cli.testing.paced``): exact outputs, steps no faster than their device model, the
throughput they announce measured under that pacing, batches capped at the device's capacity, and a process that
waits rather than computes. The bounds asserted come from the device model itself: pacing is behaviour, and no
figure of this machine's speed is asserted.
"""

import threading
import time

import msgpack
import psutil
import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.swarm import collect_status
from petals_cli.testing import make_tiny_model, paced
from petals_cli.wire import ServerInfo
from tests.conftest import Swarm

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
PROMPT_IDS = torch.tensor([[1, 57, 210, 33, 98, 402, 17]])
NEW_TOKENS = 12
PACING = ("--overhead-ms", "20", "--block-ms", "15", "--token-ms", "1", "--batch-capacity", "2")
DEVICE, _, _ = paced.parse([*PACING, "--", "model"])  # one one-token step over 4 blocks: 20 + 4 x 16 = 84 ms


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-paced", "llama", num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def expected(model_path):
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    return local.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


@pytest.fixture(scope="module")
def swarm(model_path, tmp_path_factory):
    """One paced server holding every block (started first: an unpaced one started later must not reuse its
    throughput figure)."""
    swarm = Swarm(model=model_path, workdir=tmp_path_factory.mktemp("paced"))
    swarm.start(f"0:{NUM_LAYERS}", paced=PACING)
    yield swarm
    swarm.stop()


def peer_of(server) -> str:
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


def connect(model_path, swarm):
    """A client routed through the paced server only."""
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), allowed_servers=(peer_of(swarm.servers[0]),))
    return AutoDistributedModelForCausalLM.from_pretrained(str(model_path), config=config)


class Clock:
    """A streamer noting when the prompt and each new token arrive."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.monotonic())

    def end(self):
        pass


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system  # this process's own threads: not its libp2p daemon


def test_a_paced_server_is_exact_no_faster_than_its_device_and_mostly_waits(swarm, model_path, expected):
    server = psutil.Process(swarm.servers[0].process.pid)
    model = connect(model_path, swarm)
    try:
        model.generate(PROMPT_IDS, max_new_tokens=2, do_sample=False)  # the first session's set-up
        clock = Clock()
        cpu_before, wall_before = cpu_seconds(server), time.monotonic()
        output = model.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock)
        cpu, wall = cpu_seconds(server) - cpu_before, time.monotonic() - wall_before
    finally:
        model.close()
    assert output.tolist() == expected  # the real blocks were computed

    steps = [later - earlier for earlier, later in zip(clock.times, clock.times[1:], strict=False)]
    assert len(steps) == NEW_TOKENS
    assert steps[0] >= DEVICE.seconds(NUM_LAYERS, PROMPT_IDS.shape[1])  # the prompt, then one-token steps
    assert min(steps[1:]) >= DEVICE.seconds(NUM_LAYERS, 1), steps
    print(f"\npaced steps {[round(step * 1000) for step in steps]} ms; server CPU {cpu:.2f}s over {wall:.2f}s")
    assert cpu < 0.3 * wall  # it waited out the modelled time; computing the tiny blocks is a sliver of it


def announced(swarm) -> dict:
    """Each server's announced figures, as `swarm status` reads them: peer id -> ServerStatus."""
    client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        (model,) = client.run(collect_status(client), timeout=60).models
        return {server.peer_id: server for server in model.servers}
    finally:
        client.close()


def test_the_announced_throughput_is_measured_paced_and_leaves_unpaced_servers_their_own(swarm):
    unpaced = swarm.start(f"0:{NUM_LAYERS}")  # the same model, device and dtype: the same cache key
    try:
        servers = announced(swarm)
        paced_rps = servers[peer_of(swarm.servers[0])].inference_rps
        unpaced_rps = servers[peer_of(unpaced)].inference_rps
    finally:
        unpaced.process.terminate()
        unpaced.process.wait(30)
    predicted = DEVICE.inference_rps()  # one-token steps through one block: 1 / (20 + 15 + 1 ms)
    print(f"\nannounced inference_rps: paced {paced_rps} (model {predicted:.1f}), unpaced {unpaced_rps}")
    assert predicted / 2 < paced_rps <= predicted * 1.001
    assert unpaced_rps > 4 * paced_rps  # measured on its own, not read from the paced server's measurement


def test_sessions_stepped_together_form_batches_no_larger_than_the_devices_capacity(swarm, model_path, expected):
    model = connect(model_path, swarm)
    outputs, errors = [None] * 4, []

    def run(index: int) -> None:
        try:
            outputs[index] = model.generate(PROMPT_IDS, max_new_tokens=6, do_sample=False).tolist()
        except Exception as exc:  # reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(outputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        client, peer = model.petals_client, peer_of(swarm.servers[0])
        answer = client.run(client.stub(peer).rpc_info(runtime_pb2.ExpertUID(uid="")), timeout=10)
    finally:
        model.close()
    assert not errors, errors
    assert outputs == [[expected[0][: PROMPT_IDS.shape[1] + 6]]] * len(outputs)
    info = ServerInfo.from_wire(msgpack.unpackb(answer.serialized_info, raw=False))
    assert info.largest_batch == DEVICE.batch_capacity  # four sessions waiting, batched two at a time
