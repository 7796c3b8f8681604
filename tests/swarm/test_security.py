"""Issue 8 over real servers: per-peer session caps under a flood, forged DHT records, and private swarms.

Two module swarms of one server each (a tiny 2-layer llama): a public one (3 sessions per peer) and a private
one started with --swarm-key. Every client is a real SwarmClient with its own libp2p daemon and peer id.
"""

import asyncio
import subprocess

import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from petals_cli import daemon, security, transport
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.dht import announce_server, fetch_snapshot, start_dht
from petals_cli.errors import PeerLimitError, SwarmKeyError
from petals_cli.testing import make_tiny_model
from petals_cli.wire import PROTOCOL_VERSION, ServerInfo, ServerState, SpanRequest, servers_key
from tests.conftest import Swarm, petals_command
from tests.swarm.checks import eventually
from tests.swarm.raw import call_stream, forward, open_session, peer_id_of

pytestmark = pytest.mark.slow
NUM_LAYERS = 2
HIDDEN_SIZE = 64
PER_PEER = 3


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("security") / "tiny-public", "llama", num_layers=NUM_LAYERS)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        server = swarm.start(":", "--max-sessions-per-peer", str(PER_PEER), "--cache-tokens", "1000")
        client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
        try:
            yield swarm, server, client
        finally:
            client.close()
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("private")
    model = make_tiny_model(workdir / "tiny-private", "llama", num_layers=NUM_LAYERS)
    key = workdir / "swarm.key"
    key.write_text(security.SwarmKey.generate())
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        server = swarm.start(":", "--swarm-key", str(key))
        yield swarm, server, key
    finally:
        swarm.stop()


def test_a_flood_of_sessions_from_one_peer_is_capped_while_another_peer_gets_service(public):
    swarm, server, flooder = public
    peer, stub = peer_id_of(server), flooder.stub(peer_id_of(server))
    held = [flooder.run(open_session(stub, "tiny-public", NUM_LAYERS, 10), timeout=30) for _ in range(PER_PEER)]
    try:
        for _ in range(20):
            with pytest.raises(PeerLimitError, match="limit 3"):
                flooder.run(open_session(stub, "tiny-public", NUM_LAYERS, 10), timeout=30)
        other = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
        try:
            hidden = torch.randn(1, 5, HIDDEN_SIZE)
            session = other.run(open_session(other.stub(peer), "tiny-public", NUM_LAYERS, 10), timeout=30)
            output = other.run(session.step(hidden), timeout=30)
            other.run(session.end(), timeout=30)
            reference = other.run(forward(other.stub(peer), "tiny-public", NUM_LAYERS, hidden), timeout=30)
            torch.testing.assert_close(output, reference, atol=1e-4 + 1e-5 * reference.abs().max().item(), rtol=0)
        finally:
            other.close()
    finally:
        for session in held:
            flooder.run(session.end(), timeout=30)
    # The cap counts open sessions: once they end, the flooder is served again.
    assert eventually(lambda: _can_open(flooder, stub))
    assert server.process.poll() is None


def _can_open(client, stub) -> bool:
    try:
        client.run(client.run(open_session(stub, "tiny-public", NUM_LAYERS, 10), timeout=30).end(), timeout=30)
    except PeerLimitError:
        return False
    return True


def _forgeries(identity, key: str, victim: str, value, expiration: float) -> list[bytes]:
    """Two values for a record under ``victim``'s subkey: unsigned, and one the attacker signed for itself."""
    serializer = DHTProtocol.serializer
    own = DHTRecord(
        DHTID.generate(source=key).to_bytes(), serializer.dumps(identity.peer_id), serializer.dumps(value), expiration
    )
    return [own.value, security.PeerRecordValidator(identity).sign_value(own)]


def test_a_forged_record_for_another_servers_peer_id_is_rejected_by_readers(public):
    swarm, server, reader = public
    victim = peer_id_of(server)

    async def attack():
        identity = security.Identity.load_or_create(None)
        p2p = await daemon.create_p2p(
            initial_peers=swarm.initial_peers, identity_path=identity.path, fresh_identity=True
        )
        identity.discard_file()
        node = await start_dht(p2p, swarm.initial_peers, client_mode=False, identity=identity)
        # A bare hivemind node (no validator): it stores whatever it is told, like a malicious peer would.
        bare_p2p = await daemon.create_p2p(initial_peers=swarm.initial_peers)
        bare = await DHTNode.create(p2p=bare_p2p, initial_peers=swarm.initial_peers, num_workers=2)
        try:
            own = ServerInfo(ServerState.ONLINE, 0, NUM_LAYERS, "0", public_name="attacker-own")
            assert await announce_server(node, "tiny-public", identity.peer_id, own, expiration=60)
            key, expiration = servers_key("tiny-public"), get_dht_time() + 60
            forged = ServerInfo(ServerState.OFFLINE, 0, NUM_LAYERS, "0", public_name="forged").to_wire()
            values = _forgeries(identity, key, victim, forged, expiration)
            # Straight to the server, whatever other nodes the DHT would pick as replicas.
            refused = await bare.protocol.call_store(
                transport.peer_id_from_string(victim),
                [DHTID.generate(source=key)] * 2,
                values,
                expiration,
                [victim] * 2,
            )
            # The bare node keeps a copy for itself (and any other validator-less node), for readers to find.
            await bare.store(key, forged, expiration, subkey=victim)
            return identity.peer_id, refused
        finally:
            await bare.shutdown()
            await bare_p2p.shutdown()
            await node.shutdown()
            await p2p.shutdown()

    attacker, refused = reader.run(attack(), timeout=60)
    assert refused == [False, False]  # the server answered and refused to store both
    snapshot = reader.run(fetch_snapshot(reader.node, "tiny-public", NUM_LAYERS), timeout=30)
    assert snapshot.servers[attacker].public_name == "attacker-own"  # a correctly signed record gets through
    assert snapshot.servers[victim].public_name != "forged"
    assert snapshot.servers[victim].state == ServerState.ONLINE
    assert server.process.poll() is None


def test_a_client_with_a_swarm_key_is_told_the_swarm_is_public(public, tmp_path):
    swarm, _, _ = public
    key = tmp_path / "swarm.key"
    key.write_text(security.SwarmKey.generate())
    with pytest.raises(SwarmKeyError, match="public swarm"):
        SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers), swarm_key=str(key)))


def test_insiders_of_a_private_swarm_work_normally(private):
    swarm, server, key = private
    insider = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers), swarm_key=str(key)))
    try:
        snapshot = insider.run(fetch_snapshot(insider.node, "tiny-private", NUM_LAYERS), timeout=30)
        assert peer_id_of(server) in snapshot.online()
        route = insider.run(insider.route("tiny-private", NUM_LAYERS), timeout=30)
        stub = insider.stub(route[0].peer_id)
        hidden = torch.randn(1, 6, HIDDEN_SIZE)
        session = insider.run(open_session(stub, "tiny-private", NUM_LAYERS, 8), timeout=30)
        outputs = [insider.run(session.step(hidden[:, :4]), timeout=30), insider.run(session.step(hidden[:, 4:]), 30)]
        insider.run(session.end(), timeout=30)
        reference = insider.run(forward(stub, "tiny-private", NUM_LAYERS, hidden), timeout=30)
        tolerance = 1e-4 + 1e-5 * reference.abs().max().item()
        torch.testing.assert_close(torch.cat(outputs, dim=1), reference, atol=tolerance, rtol=0)
    finally:
        insider.close()


def test_outsiders_cannot_join_a_private_swarm_or_call_its_servers(private, tmp_path):
    swarm, server, _ = private
    with pytest.raises(SwarmKeyError, match="has no swarm key"):
        SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    wrong = tmp_path / "wrong.key"
    wrong.write_text(security.SwarmKey.generate())
    with pytest.raises(SwarmKeyError, match="another swarm key"):
        SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers), swarm_key=str(wrong)))

    async def call_directly():
        p2p = await daemon.create_p2p(initial_peers=swarm.initial_peers, client_mode=True)
        try:
            answers = []
            for key in (None, security.SwarmKey.from_file(str(wrong))):
                stub = security.blocks_stub(p2p, peer_id_of(server), key)
                request = SpanRequest(protocol=PROTOCOL_VERSION, prefix="tiny-private", start_block=0, end_block=2)
                messages = transport.request_messages([torch.randn(1, 3, HIDDEN_SIZE)], transport.pack(request))
                outputs, metadata = await call_stream(stub, "rpc_forward", messages)
                try:
                    transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
                except SwarmKeyError as error:
                    answers.append((outputs, str(error)))
                with pytest.raises(P2PHandlerError, match="private swarm"):
                    await stub.rpc_info(runtime_pb2.ExpertUID(uid=""))
            return answers
        finally:
            await p2p.shutdown()

    answers = asyncio.run(call_directly())
    assert [outputs for outputs, _ in answers] == [[], []]
    assert all("pass its --swarm-key" in message for _, message in answers)

    result = subprocess.run(
        petals_command("swarm", "status", "--initial-peers", *swarm.initial_peers),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 11, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "private swarm" in error_lines[0] and "--swarm-key" in error_lines[0]
    assert server.process.poll() is None
