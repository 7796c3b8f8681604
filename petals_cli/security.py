"""Who may speak for whom: signed DHT records, and the swarm key of private swarms.

Shared by clients, servers and bootstrap peers; imports neither client nor server code.

- ``PeerRecordValidator`` (a hivemind record validator): every DHT record's subkey ends with the peer id of
  its owner, and its value carries the owner's RSA public key and a signature by the key behind the owner's
  libp2p identity. DHT nodes refuse to store, and readers drop, records whose key does not hash to the named
  peer id or whose signature does not verify, so nobody announces blocks in another server's name.
- ``SwarmKey``: the pre-shared secret of a private swarm (``--swarm-key FILE``). hivemind's libp2p daemon has
  no private-network (PSK) transport, so the key guards the two things petals runs over it:
  ``SwarmKeyAuthorizer`` HMACs every DHT request and response (outsiders cannot ping, store or find, so they
  cannot join), and ``GatedStub``/``GatedService`` put an HMAC bound to (caller, callee) peer ids on the
  first message of every RPC (outsiders cannot call servers). Inference steps ride on an admitted stream:
  no per-step cryptography. Peers keep talking plain libp2p, so an outsider still learns that the address
  runs a libp2p daemon, but nothing of the swarm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from petals_cli.errors import ConfigError, SwarmKeyError

SWARM_KEY_MARKER = "petals-swarm-key:"  # starts refusal messages, so the refused side can recognise them
MIN_SECRET_BYTES = 16
MAX_CLOCK_SKEW = 60.0  # seconds between a DHT request's time and the receiver's clock
SIGNED_TAG = "petals-signed/1"
# records whose signature checked out, remembered by a digest of their bytes: a read of the swarm meets each record
# at every DHT node it visits (up to 10), and again at every refresh (5 s) until the server re-announces it (30 s);
# at 1,000 servers that was 10,000 RSA checks a read. Enough for several such swarms.
VERIFIED_KEPT = 65_536


# --- identities and signed records ---------------------------------------------------------------------------


def peer_id_for_public_key(public_key_der: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in DER SubjectPublicKeyInfo form."""
    import base58
    from hivemind.proto import crypto_pb2

    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_key_der).SerializeToString()
    return base58.b58encode(b"\x12\x20" + hashlib.sha256(encoded).digest()).decode()  # multihash sha2-256


@dataclasses.dataclass
class Identity:
    """A peer's RSA key as its libp2p daemon uses it: ``path`` for the daemon, ``private_key`` for signing."""

    path: str
    private_key: Any  # cryptography's RSAPrivateKey
    peer_id: str
    temporary: bool = False

    @classmethod
    def load_or_create(cls, path: str | None) -> Identity:
        """Read a hivemind identity file; create one (at ``path``, or a temporary file) when it is missing."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from hivemind.p2p import P2P
        from hivemind.proto import crypto_pb2

        temporary = not path
        if temporary:
            path = str(Path(tempfile.mkdtemp(prefix="petals-identity-")) / "identity.key")
        if not Path(path).exists():
            P2P.generate_identity(path)
        try:
            protobuf = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
            private_key = serialization.load_der_private_key(protobuf.data, password=None)
        except Exception as exc:  # unreadable, truncated or foreign files
            raise ConfigError(f"--identity {path}: not a libp2p private key file ({exc.__class__.__name__})") from None
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise ConfigError(f"--identity {path}: petals signs records with RSA identities only")
        return cls(path, private_key, peer_id_for_public_key(_public_der(private_key)), temporary)

    def discard_file(self) -> None:
        """Remove a temporary key file once the daemon has read it (the key stays in memory)."""
        if self.temporary:
            Path(self.path).unlink(missing_ok=True)
            Path(self.path).parent.rmdir()


def _public_der(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def record_owner(subkey_bytes: bytes) -> str | None:
    """The peer id a record's subkey names: the subkey itself, or its part after the last ':'."""
    try:
        subkey = msgpack.unpackb(subkey_bytes, raw=False)
    except Exception:  # not msgpack: not one of ours
        return None
    return subkey.rsplit(":", 1)[-1] if isinstance(subkey, str) and subkey else None


def _signed_payload(record) -> bytes:
    return msgpack.packb([record.key, record.subkey, record.value, record.expiration_time], use_bin_type=True)


def _unwrap(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    try:
        tag, inner, public_key, signature = msgpack.unpackb(value, raw=False)
    except Exception:  # anything that is not our four-part envelope
        return None
    if tag != SIGNED_TAG or not all(isinstance(part, bytes) for part in (inner, public_key, signature)):
        return None
    return inner, public_key, signature


def _make_validator_base():
    from hivemind.dht.validation import RecordValidatorBase

    return RecordValidatorBase


class PeerRecordValidator(_make_validator_base()):
    """Signs this peer's records with its identity; accepts only records signed by the peer their subkey names."""

    def __init__(self, identity: Identity | None = None):
        self.identity = identity
        self._public_der = _public_der(identity.private_key) if identity else b""
        self._verified: dict[bytes, None] = {}  # digests of records that validated, oldest first

    def sign_value(self, record) -> bytes:
        if self.identity is None or record_owner(record.subkey) != self.identity.peer_id:
            return record.value  # not ours to sign: every validator will refuse it
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        signature = self.identity.private_key.sign(_signed_payload(record), padding.PKCS1v15(), hashes.SHA256())
        return msgpack.packb([SIGNED_TAG, record.value, self._public_der, signature], use_bin_type=True)

    def validate(self, record) -> bool:
        # the same bytes (signature, key and expiration included) get the same verdict: only a failure is re-checked
        digest = hashlib.sha256(_signed_payload(record)).digest()
        if digest in self._verified:
            return True
        if not self._check(record):
            return False
        self._verified[digest] = None
        if len(self._verified) > VERIFIED_KEPT:
            del self._verified[next(iter(self._verified))]
        return True

    def _check(self, record) -> bool:
        owner = record_owner(record.subkey)
        unwrapped = _unwrap(record.value)
        if owner is None or unwrapped is None:
            return False
        inner, public_der, signature = unwrapped
        if peer_id_for_public_key(public_der) != owner:
            return False
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            public_key = serialization.load_der_public_key(public_der)
            payload = _signed_payload(dataclasses.replace(record, value=inner))
            public_key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        except Exception:  # a bad key encoding, a non-RSA key or a bad signature
            return False
        return True

    def strip_value(self, record) -> bytes:
        unwrapped = _unwrap(record.value)
        return record.value if unwrapped is None else unwrapped[0]


# --- the swarm key -----------------------------------------------------------------------------------------


class SwarmKey:
    """A private swarm's secret; keys for the DHT and for RPCs are derived from it separately."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"a swarm key needs at least {MIN_SECRET_BYTES} bytes of secret, got {len(secret)}")
        self._dht_key = hmac.new(secret, b"petals dht", hashlib.sha256).digest()
        self._rpc_key = hmac.new(secret, b"petals rpc", hashlib.sha256).digest()
        self.fingerprint = hashlib.sha256(b"petals fingerprint" + secret).hexdigest()[:8]  # safe to log

    @classmethod
    def from_file(cls, path: str) -> SwarmKey | None:
        """The key in ``path`` (surrounding whitespace ignored); None for an empty path (a public swarm)."""
        if not path:
            return None
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"--swarm-key {path}: {exc.strerror or exc}") from None
        return cls(secret)

    @staticmethod
    def generate() -> str:
        """A fresh secret to write into a swarm key file."""
        return secrets.token_hex(32)

    def dht_mac(self, data: bytes) -> bytes:
        return hmac.new(self._dht_key, data, hashlib.sha256).digest()

    def rpc_token(self, caller: bytes, callee: bytes) -> str:
        """The token ``caller`` puts on its RPCs to ``callee`` (raw peer id bytes): useless to anyone else,
        since libp2p authenticates the caller's peer id."""
        return hmac.new(self._rpc_key, b"%s|%s" % (caller, callee), hashlib.sha256).hexdigest()

    def admits(self, caller: bytes, callee: bytes, token: str) -> bool:
        return hmac.compare_digest(self.rpc_token(caller, callee), token)


def refusal(reason: str) -> SwarmKeyError:
    return SwarmKeyError(f"{SWARM_KEY_MARKER} {reason}")


def _make_authorizer_base():
    from hivemind.utils.auth import AuthorizerBase

    return AuthorizerBase


class SwarmKeyAuthorizer(_make_authorizer_base()):
    """HMACs (with a time and a nonce) every DHT request and response with the swarm key.

    Without a key (a public swarm) it signs nothing and refuses signed requests, so a peer holding a key
    learns at once that it is talking to a public swarm. Refusals raise, so their message reaches the caller.
    """

    def __init__(self, key: SwarmKey | None):
        self.key = key
        self._seen_nonces: dict[bytes, float] = {}

    def _mac(self, message) -> bytes:
        signature, message.auth.signature = message.auth.signature, b""
        try:
            return self.key.dht_mac(message.SerializeToString())
        finally:
            message.auth.signature = signature

    async def sign_request(self, request, service_public_key) -> None:
        if self.key is None:
            return
        from hivemind.utils import get_dht_time

        request.auth.time = get_dht_time()
        request.auth.nonce = secrets.token_bytes(8)
        request.auth.signature = self._mac(request)

    async def validate_request(self, request) -> bool:
        if self.key is None:
            if request.auth.signature:
                raise refusal("this peer belongs to a public swarm; the caller uses a swarm key")
            return True
        if not request.auth.signature:
            raise refusal("this peer belongs to a private swarm; the caller has no swarm key")
        if not hmac.compare_digest(request.auth.signature, self._mac(request)):
            raise refusal("this peer belongs to a private swarm with another swarm key")
        from hivemind.utils import get_dht_time

        now = get_dht_time()
        if abs(request.auth.time - now) > MAX_CLOCK_SKEW or request.auth.nonce in self._seen_nonces:
            return False  # a replay, or clocks too far apart
        self._seen_nonces[request.auth.nonce] = now
        if len(self._seen_nonces) > 10_000:
            self._seen_nonces = {n: t for n, t in self._seen_nonces.items() if now - t <= 2 * MAX_CLOCK_SKEW}
        return True

    async def sign_response(self, response, request) -> None:
        if self.key is None:
            return
        response.auth.nonce = request.auth.nonce
        response.auth.signature = self._mac(response)

    async def validate_response(self, response, request) -> bool:
        if self.key is None:
            return not response.auth.signature
        return response.auth.nonce == request.auth.nonce and hmac.compare_digest(
            response.auth.signature, self._mac(response)
        )


async def diagnose_refusal(p2p, initial_peers, authorizer: SwarmKeyAuthorizer, timeout: float = 5.0) -> None:
    """After a failed DHT bootstrap: raise SwarmKeyError when an initial peer refused us for the swarm key."""
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2

    for maddr in initial_peers:
        if "/p2p/" not in maddr:
            continue
        request = dht_pb2.PingRequest()
        await authorizer.sign_request(request, None)
        try:
            peer = PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
            response = await _with_timeout(
                p2p.call_protobuf_handler(peer, "DHTProtocol.rpc_ping", request, dht_pb2.PingResponse), timeout
            )
        except Exception as exc:  # the refusal arrives as a handler error carrying our marker
            text = str(exc)
            if SWARM_KEY_MARKER in text:
                raise SwarmKeyError(
                    f"{maddr.rsplit('/p2p/', 1)[1][-8:]} refused to let this peer join: "
                    f"{text.split(SWARM_KEY_MARKER, 1)[1].strip()}"
                ) from None
            continue
        if not await authorizer.validate_response(response, request):
            raise SwarmKeyError("the swarm answered with another swarm key, or none: check --swarm-key")


async def _with_timeout(awaitable, timeout: float):
    import asyncio

    return await asyncio.wait_for(awaitable, timeout)


# --- RPC gates ----------------------------------------------------------------------------------------------


class GatedStub:
    """A BlocksService stub that puts this caller's token on the first message of every RPC."""

    def __init__(self, stub, token: str):
        self._stub, self._token = stub, token

    async def _stamped(self, requests):
        first = True
        async for message in requests:
            if first:
                message.uid, first = self._token, False
            yield message

    async def rpc_info(self, request, **kwargs):
        request.uid = self._token
        return await self._stub.rpc_info(request, **kwargs)

    async def rpc_inference(self, requests, **kwargs):
        return await self._stub.rpc_inference(self._stamped(requests), **kwargs)

    async def rpc_forward(self, requests, **kwargs):
        return await self._stub.rpc_forward(self._stamped(requests), **kwargs)

    async def rpc_backward(self, requests, **kwargs):
        return await self._stub.rpc_backward(self._stamped(requests), **kwargs)

    async def rpc_push(self, request, **kwargs):
        request.uid = self._token
        return await self._stub.rpc_push(request, **kwargs)

    async def rpc_push_stream(self, requests, **kwargs):
        return await self._stub.rpc_push_stream(self._stamped(requests), **kwargs)


def blocks_stub(p2p, peer_id: str, key: SwarmKey | None):
    """The stub to call ``peer_id``'s BlocksService, gated when this peer holds a swarm key."""
    from petals_cli import transport

    peer = transport.peer_id_from_string(peer_id)
    stub = transport.BlocksService.get_stub(p2p, peer)
    return stub if key is None else GatedStub(stub, key.rpc_token(p2p.peer_id.to_bytes(), peer.to_bytes()))


DRAIN_SECONDS = 2.0


class GatedService:
    """Wraps a BlocksService handler: RPCs whose first message lacks the caller's token are refused unanswered."""

    def __init__(self, handler, key: SwarmKey):
        self.handler, self.key = handler, key
        self.refused = 0

    def _admits(self, context, token: str) -> bool:
        admitted = self.key.admits(context.remote_id.to_bytes(), context.local_id.to_bytes(), token)
        self.refused += not admitted
        return admitted

    async def _gate(self, method: str, requests, context):
        from petals_cli import transport

        first = await anext(requests, None)
        if first is None:
            return
        if not self._admits(context, first.uid):
            if method != "rpc_inference":  # let a forward/backward finish sending, so it reads the refusal
                await transport.drain(requests, DRAIN_SECONDS)
            yield transport.error_response(refusal("this server belongs to a private swarm; pass its --swarm-key"))
            return

        async def replay():
            yield first
            async for message in requests:
                yield message

        async for response in getattr(self.handler, method)(replay(), context):
            yield response

    def rpc_inference(self, requests, context):
        return self._gate("rpc_inference", requests, context)

    def rpc_forward(self, requests, context):
        return self._gate("rpc_forward", requests, context)

    def rpc_backward(self, requests, context):
        return self._gate("rpc_backward", requests, context)

    async def rpc_push(self, request, context):
        if not self._admits(context, request.uid):
            raise refusal("this server belongs to a private swarm; pass its --swarm-key")
        return await self.handler.rpc_push(request, context)

    async def rpc_push_stream(self, requests, context):
        from petals_cli import transport
        from petals_cli.errors import InvalidRequestError

        request = await anext(requests, None)
        if request is None:
            yield transport.error_response(InvalidRequestError("a pushed stream carried no step"))
            return
        yield await self.rpc_push(request, context)

    async def rpc_info(self, request, context):
        if not self._admits(context, request.uid):
            raise refusal("this server belongs to a private swarm; pass its --swarm-key")
        return await self.handler.rpc_info(request, context)
