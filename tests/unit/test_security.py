"""Pure parts of issue 8: record signatures, swarm-key tokens and DHT authorization, request checks,
per-peer session caps, and the client's allowed/blocked server filter."""

import asyncio
import dataclasses

import msgpack
import pytest
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.proto import dht_pb2

from petals_cli import routing
from petals_cli.errors import (
    BlocksNotHeldError,
    ConfigError,
    InvalidRequestError,
    NoRouteError,
    PeerLimitError,
    ProtocolMismatchError,
    RequestTooLargeError,
    SwarmKeyError,
)
from petals_cli.security import Identity, PeerRecordValidator, SwarmKey, SwarmKeyAuthorizer
from petals_cli.server import validation
from petals_cli.server.validation import Limits, PeerSessions
from petals_cli.wire import PROTOCOL_VERSION, ServerInfo, ServerState, SwarmSnapshot


@pytest.fixture(scope="module")
def identities():
    made = [Identity.load_or_create(None) for _ in range(2)]
    for identity in made:
        identity.discard_file()
    return made


def record(subkey: str, value: bytes = b"info", key: bytes = b"block-uid-hash") -> DHTRecord:
    return DHTRecord(key, msgpack.packb(subkey), value, 1234.5)


def signed(identity: Identity, subkey: str, value: bytes = b"info") -> DHTRecord:
    plain = record(subkey, value)
    return dataclasses.replace(plain, value=PeerRecordValidator(identity).sign_value(plain))


def test_a_record_signed_by_the_peer_it_names_is_valid_and_strips_back(identities):
    owner, _ = identities
    reader = PeerRecordValidator()
    for subkey in (owner.peer_id, f"tiny-model:{owner.peer_id}"):
        good = signed(owner, subkey)
        assert reader.validate(good)
        assert reader.strip_value(good) == b"info"


def test_forged_tampered_and_unsigned_records_are_rejected(identities):
    owner, forger = identities
    reader = PeerRecordValidator()
    # The forger cannot sign for the owner: its validator leaves the value unsigned ...
    assert not reader.validate(signed(forger, owner.peer_id))
    # ... and a record it signs with its own key but files under the owner's id names the wrong peer.
    own = signed(forger, forger.peer_id)
    assert reader.validate(own)
    assert not reader.validate(dataclasses.replace(own, subkey=msgpack.packb(owner.peer_id)))
    good = signed(owner, owner.peer_id, msgpack.packb({"state": 2}))
    tag, inner, public_key, signature = msgpack.unpackb(good.value)
    tampered = msgpack.packb([tag, msgpack.packb({"state": 0}), public_key, signature])
    assert not reader.validate(dataclasses.replace(good, value=tampered))
    assert not reader.validate(dataclasses.replace(good, expiration_time=good.expiration_time + 1))
    assert not reader.validate(dataclasses.replace(good, key=b"another-block"))
    assert not reader.validate(record(owner.peer_id))  # unsigned
    assert not reader.validate(dataclasses.replace(good, subkey=b"\xc1"))  # not msgpack
    assert not reader.validate(dataclasses.replace(good, value=b"garbage"))


def test_a_record_checked_once_is_remembered_by_its_bytes_and_nothing_else(identities, monkeypatch):
    owner, forger = identities
    reader, checks = PeerRecordValidator(), []
    check = reader._check
    monkeypatch.setattr(reader, "_check", lambda record: checks.append(record) or check(record))
    good = signed(owner, owner.peer_id, msgpack.packb({"state": 2}))
    assert reader.validate(good) and reader.validate(good) and len(checks) == 1  # the second read: no RSA check
    later = dataclasses.replace(good, expiration_time=good.expiration_time + 1)  # same signature, other bytes
    assert not reader.validate(later) and not reader.validate(later) and len(checks) == 3  # failures re-checked
    assert not reader.validate(dataclasses.replace(good, subkey=msgpack.packb(forger.peer_id)))


def test_swarm_key_tokens_bind_caller_and_callee(tmp_path):
    path = tmp_path / "swarm.key"
    path.write_text(SwarmKey.generate() + "\n")
    key, same = SwarmKey.from_file(str(path)), SwarmKey.from_file(str(path))
    other = SwarmKey(b"another secret of enough length")
    token = key.rpc_token(b"alice", b"server")
    assert same.admits(b"alice", b"server", token)
    assert not same.admits(b"mallory", b"server", token)
    assert not same.admits(b"alice", b"other-server", token)
    assert not other.admits(b"alice", b"server", token)
    assert not key.admits(b"alice", b"server", "")
    assert SwarmKey.from_file("") is None
    with pytest.raises(ConfigError):
        SwarmKey(b"short")
    with pytest.raises(ConfigError):
        SwarmKey.from_file(str(tmp_path / "missing.key"))


def test_dht_messages_are_authorized_only_with_the_same_swarm_key():
    async def exchange(caller: SwarmKeyAuthorizer, callee: SwarmKeyAuthorizer) -> bool:
        request = dht_pb2.PingRequest(validate=True)
        await caller.sign_request(request, None)
        if not await callee.validate_request(request):
            return False
        response = dht_pb2.PingResponse(dht_time=1.0)
        await callee.sign_response(response, request)
        return await caller.validate_response(response, request)

    key = SwarmKey(b"a shared secret for the swarm")
    insider, other_insider = SwarmKeyAuthorizer(key), SwarmKeyAuthorizer(SwarmKey(b"a shared secret for the swarm"))
    assert asyncio.run(exchange(insider, other_insider))
    assert asyncio.run(exchange(SwarmKeyAuthorizer(None), SwarmKeyAuthorizer(None)))
    for caller, callee, reason in [
        (SwarmKeyAuthorizer(None), insider, "has no swarm key"),
        (SwarmKeyAuthorizer(SwarmKey(b"a guessed secret, not the one")), insider, "another swarm key"),
        (insider, SwarmKeyAuthorizer(None), "public swarm"),
    ]:
        with pytest.raises(SwarmKeyError, match=reason):
            asyncio.run(exchange(caller, callee))

    async def replay() -> bool:
        request = dht_pb2.PingRequest()
        await insider.sign_request(request, None)
        assert await other_insider.validate_request(request)
        return await other_insider.validate_request(request)

    assert not asyncio.run(replay())


def test_span_requests_and_hidden_states_are_checked():
    def span(**fields):
        base = dict(protocol=PROTOCOL_VERSION, prefix="tiny", start_block=0, end_block=2, max_length=8)
        return validation.check_span_request({**base, **fields}, "tiny", (0, 2))

    assert span(unknown_field=1).end_block == 2
    for fields, error in [
        (dict(protocol=PROTOCOL_VERSION + 1), ProtocolMismatchError),
        (dict(prefix="other"), InvalidRequestError),
        (dict(prefix="x" * 10_000), InvalidRequestError),
        (dict(start_block=-1), InvalidRequestError),
        (dict(end_block=3), BlocksNotHeldError),  # a ServerError: the client's record of this server is stale
        (dict(start_block=1, end_block=1), InvalidRequestError),
        (dict(max_length="8"), InvalidRequestError),
        (dict(start_block=True), InvalidRequestError),
    ]:
        with pytest.raises(error):
            span(**fields)
    limits = Limits(max_session_length=64, max_batch_size=4)
    assert validation.check_session_size(span(max_length=64, batch_size=4), limits) == 256
    for fields in (dict(max_length=65), dict(max_length=0), dict(max_length=-5), dict(batch_size=5)):
        with pytest.raises(InvalidRequestError):
            validation.check_session_size(span(**fields), limits)
    good = torch.zeros(1, 3, 8)
    assert validation.check_hidden(good, 8, 1) is good
    for bad in (
        torch.zeros(3, 8),
        torch.zeros(1, 3, 7),
        torch.zeros(1, 0, 8),
        torch.zeros(1, 3, 8, dtype=torch.int64),
        torch.zeros(2, 3, 8),
        torch.full((1, 3, 8), float("nan")),
        torch.full((1, 3, 8), float("-inf")),
    ):
        with pytest.raises(InvalidRequestError):
            validation.check_hidden(bad, 8, 1)


def test_message_size_and_per_peer_session_caps():
    from hivemind.proto import runtime_pb2

    from petals_cli import transport

    limits = Limits(max_request_bytes=1000)
    validation.check_message_size(transport.step_request([torch.zeros(1, 2, 8)], b""), limits)
    with pytest.raises(RequestTooLargeError):
        validation.check_message_size(transport.step_request([torch.zeros(1, 100, 8)], b""), limits)
    with pytest.raises(RequestTooLargeError):
        validation.check_message_size(runtime_pb2.ExpertRequest(metadata=b"x" * 1001), limits)

    sessions = PeerSessions(limit=2)
    sessions.acquire("alice")
    sessions.acquire("alice")
    with pytest.raises(PeerLimitError):
        sessions.acquire("alice")
    sessions.acquire("bob")
    sessions.release("alice")
    sessions.acquire("alice")
    for _ in range(2):
        sessions.release("alice")
    sessions.release("bob")
    assert not sessions.open


def test_allowed_and_blocked_servers_shape_the_route():
    info = dict(state=ServerState.ONLINE, version="0", cache_tokens_left=100, throughput=10.0)
    snapshot = SwarmSnapshot(
        prefix="tiny",
        num_blocks=4,
        servers={
            "fast": ServerInfo(start_block=0, end_block=4, **{**info, "throughput": 1000.0}),
            "first": ServerInfo(start_block=0, end_block=2, **info),
            "second": ServerInfo(start_block=2, end_block=4, **info),
        },
    )
    assert [span.peer_id for span in routing.inference_route(snapshot)] == ["fast"]
    blocked = routing.untrusted(snapshot, blocked=["fast"])
    assert blocked == {"fast"}
    assert [span.peer_id for span in routing.inference_route(snapshot, banned=blocked)] == ["first", "second"]
    allowed = routing.untrusted(snapshot, allowed=["first", "second"])
    assert [span.peer_id for span in routing.inference_route(snapshot, banned=allowed)] == ["first", "second"]
    with pytest.raises(NoRouteError) as raised:
        routing.inference_route(snapshot, banned=routing.untrusted(snapshot, allowed=["first"]))
    assert raised.value.missing_blocks == (2, 3)
    assert routing.untrusted(snapshot) == set()
