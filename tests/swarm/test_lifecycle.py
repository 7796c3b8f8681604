"""A sharded checkpoint served in two spans; SIGTERM; then the missing-blocks error of `petals generate`.

The tests in this module share one swarm and run in order: the late-span server is stopped by the
SIGTERM test, which leaves the gap the missing-blocks test needs.
"""

import json
import shutil
import signal
import subprocess

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import AutoDistributedModelForCausalLM, transport
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.errors import BlocksNotHeldError, InvalidRequestError, ProtocolMismatchError
from petals_cli.testing import make_tiny_model
from petals_cli.wire import PROTOCOL_VERSION, ServerState, SpanRequest
from tests.conftest import Swarm, petals_command

pytestmark = pytest.mark.slow
NUM_LAYERS = 6


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model = make_tiny_model(root / "full" / "tiny-sharded", "llama", num_layers=NUM_LAYERS, shards=3)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    first_shard = index["model.layers.0.self_attn.q_proj.weight"]
    late_start = min(
        int(name.split(".")[2])
        for name, file in index.items()
        if name.startswith("model.layers.") and file != first_shard
    )
    # The late-span server gets a copy of the model WITHOUT the first shard: opening it would fail.
    partial = root / "partial" / "tiny-sharded"
    shutil.copytree(model, partial)
    (partial / first_shard).unlink()
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start(f"0:{late_start}")
        late = swarm.start(f"{late_start}:{NUM_LAYERS}", model=partial)
        yield model, swarm, late, late_start
    finally:
        swarm.stop()


def test_late_span_server_never_opens_the_first_shard_and_output_is_exact(sharded):
    model, swarm, late, late_start = sharded
    assert 0 < late_start < NUM_LAYERS
    tokenizer = AutoTokenizer.from_pretrained(model)
    input_ids = tokenizer("Sharded checkpoints load span by span", return_tensors="pt").input_ids
    distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
    try:
        remote = distributed.generate(input_ids, max_new_tokens=12, do_sample=False)
    finally:
        distributed.close()
    local = AutoModelForCausalLM.from_pretrained(model).eval()
    assert remote.tolist() == local.generate(input_ids, max_new_tokens=12, do_sample=False).tolist()
    assert "model-00001" not in late.log()


def test_large_steps_cross_the_wire_whole(sharded):
    """Tensors over the 1 MiB stream chunk: forward splits them, an inference step sends one message."""
    model, swarm, late, late_start = sharded
    distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
    try:
        hidden = torch.randn(4, 1100, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            via_forward = distributed.remote_blocks(hidden)
            with distributed.inference_session(max_length=1100, batch_size=4) as session:
                via_session = session.step(hidden)
    finally:
        distributed.close()
    assert via_forward.shape == hidden.shape
    torch.testing.assert_close(via_session, via_forward, atol=1e-4, rtol=0)


async def _raw_forward(client, peer_id, request: SpanRequest, tensors):
    async def requests():
        for message in transport.request_messages(tensors, transport.pack(request)):
            yield message

    outputs, metadata = await transport.read_answer(await client.stub(peer_id).rpc_forward(requests()), 1)
    transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
    return outputs


def test_info_rpc_and_typed_errors_for_bad_requests(sharded):
    model, swarm, late, late_start = sharded
    peer_id = swarm.servers[0].addresses()[0].rsplit("/p2p/", 1)[1]
    client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        stub = client.stub(peer_id)
        info = client.run(stub.rpc_info(runtime_pb2.ExpertUID(uid="")))
        record = msgpack.unpackb(info.serialized_info)
        assert (record["start_block"], record["end_block"], record["state"]) == (0, late_start, ServerState.ONLINE)
        hidden = torch.zeros(1, 2, 64)
        good = dict(prefix="tiny-sharded", start_block=0, end_block=late_start)
        with pytest.raises(ProtocolMismatchError, match="protocol"):
            client.run(_raw_forward(client, peer_id, SpanRequest(protocol=PROTOCOL_VERSION + 1, **good), [hidden]))
        bad_requests = [
            (SpanRequest(protocol=PROTOCOL_VERSION, **good), [torch.zeros(1, 2, 7)]),  # wrong hidden size
            (SpanRequest(protocol=PROTOCOL_VERSION, **good), [torch.zeros(1, 2, 64, dtype=torch.long)]),
            (SpanRequest(protocol=PROTOCOL_VERSION, **{**good, "prefix": "other"}), [hidden]),
        ]
        for request, tensors in bad_requests:
            with pytest.raises(InvalidRequestError):
                client.run(_raw_forward(client, peer_id, request, tensors))
        # blocks it does not hold: a ServerError (a client's stale record of it), which clients fail over on
        not_held = SpanRequest(protocol=PROTOCOL_VERSION, **{**good, "end_block": NUM_LAYERS})
        with pytest.raises(BlocksNotHeldError, match=f"not within this server's 0:{late_start}"):
            client.run(_raw_forward(client, peer_id, not_held, [hidden]))
        # The server is still healthy after all of that.
        outputs = client.run(_raw_forward(client, peer_id, SpanRequest(protocol=PROTOCOL_VERSION, **good), [hidden]))
        assert outputs[0].shape == hidden.shape
    finally:
        client.close()


def test_a_refusal_on_the_first_message_reaches_a_client_still_sending(sharded):
    """The server refuses a malformed first tensor before reading the rest: it must read the rest anyway,
    since closing the stream under a sending client resets it and the refusal is lost on the way."""
    model, swarm, late, late_start = sharded
    peer_id = swarm.servers[0].addresses()[0].rsplit("/p2p/", 1)[1]
    request = SpanRequest(protocol=PROTOCOL_VERSION, prefix="tiny-sharded", start_block=0, end_block=late_start)
    malformed = runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[3, 6], dtype="int64")  # 4 bytes for 18 values
    filler = transport.request_messages([torch.zeros(1, 256, 64)] * 40, b"")  # 40 more messages

    async def send():
        yield runtime_pb2.ExpertRequest(tensors=[malformed], metadata=transport.pack(request))
        for message in filler:
            yield message

    client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        for _ in range(10):
            _, metadata = client.run(transport.read_answer(client.run(client.stub(peer_id).rpc_forward(send())), 1))
            with pytest.raises(InvalidRequestError, match="malformed tensor"):
                transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
    finally:
        client.close()


def test_sigterm_exits_cleanly_and_blocks_are_no_longer_online(sharded):
    model, swarm, late, late_start = sharded
    peer_id = late.addresses()[0].rsplit("/p2p/", 1)[1]
    late.process.send_signal(signal.SIGTERM)
    assert late.process.wait(10) == 0  # promptly: no waiting out session or DHT timeouts
    assert not late.address_file.exists()
    client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        snapshot = client.run(client.snapshot("tiny-sharded", NUM_LAYERS))
    finally:
        client.close()
    assert peer_id not in snapshot.online()
    if peer_id in snapshot.servers:
        assert snapshot.servers[peer_id].state == ServerState.OFFLINE
    assert snapshot.block_coverage()[late_start:] == [0] * (NUM_LAYERS - late_start)


def test_generate_names_the_missing_blocks_in_one_line(sharded):
    model, swarm, late, late_start = sharded
    command = petals_command(
        "generate", str(model), "--prompt", "hello", "--route-wait", "1", "--initial-peers", *swarm.initial_peers
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)  # the timeout only bounds a hang
    assert result.returncode == 5  # NoRouteError's exit code
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    # It gave up because those blocks have no live server: not a full or unreachable swarm, nor a crash.
    assert errors[0].startswith(f"error: no live server holds blocks {late_start}:{NUM_LAYERS} of tiny-sharded")
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr
