"""RPC names and message packing over hivemind's P2P, shared by client and server.

``BlocksService`` declares the RPCs (``rpc_inference``, ``rpc_forward``, ``rpc_backward``, ``rpc_push``,
``rpc_info``; a server pushes a step's output to the next server's session with ``rpc_push``, or
``rpc_push_stream`` when the step is too large for a unary call):
the server registers its handler object under these names, the client calls them through
``BlocksService.get_stub``. Messages are hivemind's ``ExpertRequest``/``ExpertResponse`` protobufs:
tensors serialised by hivemind, metadata a msgpack dict of one ``wire`` record. Large tensors travel as
several stream messages (``split_for_streaming``). Errors come back as typed metadata, never as asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable, Sequence
from typing import AsyncIterator  # noqa: UP035 (hivemind recognises streaming RPCs only by typing's hint)

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from petals_cli.errors import InvalidRequestError, PetalsError, RequestTooLargeError, error_from_wire
from petals_cli.wire import StepResponse

STREAM_CHUNK_BYTES = 2**20
NONE = runtime_pb2.CompressionType.NONE
_CODECS = set(runtime_pb2.CompressionType.values())
# what tensors of this protocol are (hidden states, masks, positions, prompts, LoRA weights), as hivemind names them
ACCEPTED_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}
)


class BlocksService(ServicerBase):
    """The RPC surface of a petals server; the server passes its handler as ``wrapper``."""

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError


def pack(record) -> bytes:
    return msgpack.packb(record.to_wire(), use_bin_type=True)


def unpack(data: bytes):
    """Decode metadata bytes into a plain dict; anything else is an InvalidRequestError."""
    if not data:
        return {}
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise InvalidRequestError(f"metadata is not valid msgpack ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise InvalidRequestError("metadata must be a mapping")
    return value


def serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(tensor.detach(), NONE)


def deserialize(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """A tensor another peer sent. Only what this protocol sends is decoded: no compression (a codec named by the
    sender would run its decoder, natively and on attacker-sized buffers) and plain numeric dtypes."""
    if proto.compression != NONE:
        codec = runtime_pb2.CompressionType.Name(proto.compression) if proto.compression in _CODECS else "unknown"
        raise InvalidRequestError(f"tensor compression {codec} is not used by this protocol (only NONE)")
    if proto.dtype not in ACCEPTED_DTYPES:
        raise InvalidRequestError(f"tensor dtype {proto.dtype[:32]!r} is not accepted")
    try:
        return deserialize_torch_tensor(proto)
    except Exception as exc:  # bad dtype names, sizes that do not match the buffer, ...
        raise InvalidRequestError(f"malformed tensor ({exc.__class__.__name__}: {exc})") from None


def request_messages(tensors: Sequence[torch.Tensor], metadata: bytes) -> list[runtime_pb2.ExpertRequest]:
    """One or more stream messages carrying ``tensors``; metadata rides on the first."""
    parts = []
    for tensor in tensors:
        proto = serialize(tensor)
        parts.extend(
            split_for_streaming(proto, STREAM_CHUNK_BYTES) if proto.ByteSize() > STREAM_CHUNK_BYTES else [proto]
        )
    if not parts:
        return [runtime_pb2.ExpertRequest(metadata=metadata)]
    return [
        runtime_pb2.ExpertRequest(tensors=[part], metadata=metadata if index == 0 else b"")
        for index, part in enumerate(parts)
    ]


async def collect_tensors(messages: AsyncIterator, max_bytes: int | None = None) -> tuple[list[torch.Tensor], bytes]:
    """Reassemble tensors sent by ``request_messages``; returns (tensors, first message's metadata).

    With ``max_bytes``, a stream whose tensor and metadata bytes exceed it is refused as soon as they do,
    before the rest is read or anything is decoded.
    """
    from hivemind.utils.streaming import combine_from_streaming

    metadata, chunks, expected, tensors, received = None, [], 0, [], 0
    async for message in messages:
        if metadata is None:
            metadata = message.metadata
        received += len(message.metadata) + sum(len(part.buffer) for part in message.tensors)
        if max_bytes is not None and received > max_bytes:
            raise RequestTooLargeError(f"request exceeds this server's limit of {max_bytes} bytes")
        for part in message.tensors:
            if not chunks:
                expected = max(part.chunks, 1)  # the first chunk of a tensor says how many follow
            chunks.append(part)
            if len(chunks) == expected:
                tensors.append(deserialize(combine_from_streaming(chunks) if expected > 1 else chunks[0]))
                chunks = []
    if chunks:
        raise InvalidRequestError("stream ended in the middle of a tensor")
    return tensors, metadata or b""


def step_request(tensors: Sequence[torch.Tensor], metadata: bytes) -> runtime_pb2.ExpertRequest:
    """One inference step is always one stream message, whatever its size (streams have no message cap)."""
    return runtime_pb2.ExpertRequest(tensors=[serialize(tensor) for tensor in tensors], metadata=metadata)


def step_response(tensor: torch.Tensor, meta: StepResponse) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=[serialize(tensor)], metadata=pack(meta))


def error_response(error: PetalsError) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=pack(StepResponse(error_code=error.code, error_message=error.message)))


def check_response(response: runtime_pb2.ExpertResponse) -> StepResponse:
    """Parse a response's metadata; raise the typed error a server sent."""
    meta = StepResponse.from_wire(unpack(response.metadata))
    if meta.error_code:
        raise error_from_wire(meta.error_code, meta.error_message)
    return meta


async def drain(requests: AsyncIterator, seconds: float) -> None:
    """Read and drop what is left of a refused request stream, for at most ``seconds`` (at once when it was read
    to its end already). Answering before the client has finished sending would close the stream under it, which
    resets it, and the client would lose the refusal."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass


def response_messages(tensors: Iterable[torch.Tensor], meta: StepResponse) -> list[runtime_pb2.ExpertResponse]:
    requests = request_messages(list(tensors), pack(meta))
    return [runtime_pb2.ExpertResponse(tensors=message.tensors, metadata=message.metadata) for message in requests]


async def create_p2p(
    host: str = "127.0.0.1",
    port: int = 0,
    initial_peers: Sequence[str] = (),
    *,
    announce_host: str | None = None,
    identity_path: str | None = None,
    client_mode: bool = False,
    fresh_identity: bool = False,
) -> P2P:
    """Start a libp2p daemon. Loopback hosts never probe the network (no NAT mapping, relays or auto-NAT)."""
    local = _is_loopback(host)
    kwargs = dict(
        initial_peers=list(initial_peers),
        host_maddrs=[f"/ip{_ip_version(host)}/{host}/tcp/{port}"] if not client_mode else [],
        announce_maddrs=[f"/ip{_ip_version(announce_host)}/{announce_host}/tcp/{port}"] if announce_host else None,
        identity_path=identity_path,
        check_if_identity_free=not fresh_identity,  # a key made just now is nobody else's: skip the slow check
        nat_port_map=not local,
        auto_nat=not local,
        use_relay=not local,
        use_auto_relay=False,
        dht_mode="client" if client_mode else "server",
        no_listen=client_mode,
    )
    if local:
        kwargs["force_reachability"] = "public"
    return await P2P.create(**kwargs)


def local_host_for(peers: Sequence[str]) -> str:
    """Loopback when every peer is on this machine (so nothing probes the network), else all interfaces."""
    loopback = ("/ip4/127.", "/ip6/::1/", "/dns/localhost/", "/dns4/localhost/")
    return "127.0.0.1" if peers and all(peer.startswith(loopback) for peer in peers) else "0.0.0.0"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _ip_version(host: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 4


def peer_id_from_string(text: str) -> PeerID:
    return PeerID.from_base58(text)
