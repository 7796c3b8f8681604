"""RPC names and message packing over hivemind's P2P, shared by client and server.

``BlocksService`` declares the RPCs (``rpc_inference``, ``rpc_forward``, ``rpc_backward``, ``rpc_push``,
``rpc_info``; a server pushes a step's output to the next server's session with ``rpc_push``, or
``rpc_push_stream`` when the step is too large for a unary call):
the server registers its handler object under these names, the client calls them through
``BlocksService.get_stub``. Messages are hivemind's ``ExpertRequest``/``ExpertResponse`` protobufs:
tensors serialised by hivemind, metadata a msgpack dict of one ``wire`` record. Large tensors travel as
several stream messages (``split_for_streaming``). Errors come back as typed metadata, never as asserts.

A server's streaming RPCs run through ``serve_stream`` rather than hivemind's own stream loop, which reads a
client's messages ahead into a queue of 5 and, once that queue is full, waits for room without watching the
handler: a handler that returned without reading the rest (a refusal, a timeout) then never closed its stream,
and a client that had sent six messages ahead waited for ever. Here a stream ends when its handler does, after
reading what the client still sends for at most ``REST_SECONDS``. Large messages and tensors are parsed and
decoded on a thread (``off_loop``), so that one large request does not stall every other session's handler.

The RPCs with one answer (``ONE_ANSWER``: forward, backward, a pushed stream) are closed by the client, once it
has read the answer (``read_answer``); the server waits for that, for at most ``LINGER_SECONDS``. A server that
closed first lost an answer now and then (1 to 6 of 30,000 refused empty pushes, 16 at a time): libp2p's daemon
closes the server's side of the stream and resets it, and a reset that reaches the client's daemon before it has
passed the answer on drops the answer. Closed by the client after its read, nothing is left to drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator  # noqa: UP035 (hivemind recognises streaming RPCs only by typing's hint)

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from petals_cli import hivemind_fix  # noqa: F401 (patches hivemind's daemon reader on import)
from petals_cli.errors import InvalidRequestError, PetalsError, RequestTooLargeError, error_from_wire
from petals_cli.wire import StepResponse

logger = logging.getLogger(__name__)
STREAM_CHUNK_BYTES = 2**20
OFF_LOOP_BYTES = 2**20  # messages and tensors this large are parsed, decoded and checked on a thread
PREFETCH = 5  # a stream's messages read ahead of its handler (as hivemind does)
REST_SECONDS = 10.0  # after its answer, how long a server reads (and drops) what a client still sends
LINGER_SECONDS = 2.0  # after a one-answer RPC's answer, how long a server waits for the client to close the stream
ONE_ANSWER = frozenset({"rpc_forward", "rpc_backward", "rpc_push_stream"})  # RPCs whose client closes the stream
FRAME_OVERHEAD = 1 << 20  # a stream frame's bytes beyond its tensors' (metadata, shapes): within this of the limit
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
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:  # one answer, on a stream so that the pusher closes it
        raise NotImplementedError
        yield

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def add_p2p_handlers(
        self,
        p2p: P2P,
        wrapper=None,
        *,
        namespace: str | None = None,
        balanced: bool = False,
        max_frame_bytes: int | None = None,
    ) -> None:
        """Register the RPCs of ``wrapper`` as hivemind does, except that streaming RPCs run in ``serve_stream``
        (whose frames may be ``max_frame_bytes`` long at most: a longer one closes the stream before it is read)."""
        self._collect_rpc_handlers()
        servicer = self if wrapper is None else wrapper
        for rpc in self._rpc_handlers:
            name, method = self._get_handle_name(namespace, rpc.method_name), getattr(servicer, rpc.method_name)
            if rpc.stream_input:
                types = (rpc.request_type, rpc.stream_output)
                linger = LINGER_SECONDS if rpc.method_name in ONE_ANSWER else 0.0
                serve = functools.partial(
                    serve_stream, p2p, name, method, *types, max_frame_bytes=max_frame_bytes, linger=linger
                )
                await p2p.add_binary_stream_handler(name, serve, balanced=balanced)
            else:
                await p2p.add_protobuf_handler(
                    name, method, rpc.request_type, stream_output=rpc.stream_output, balanced=balanced
                )


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


async def collect_tensors(
    messages: AsyncIterator, max_bytes: int | None = None, count: int | None = None
) -> tuple[list[torch.Tensor], bytes]:
    """Reassemble tensors sent by ``request_messages``; returns (tensors, first message's metadata).

    With ``max_bytes``, a stream whose tensor and metadata bytes exceed it is refused as soon as they do,
    before the rest is read or anything is decoded. With ``count`` (an answer's), reading stops once that many
    tensors are whole, or at a message with no tensors (a refusal, or an answer that has none). Large tensors are
    decoded off the event loop.
    """
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
                size = sum(len(chunk.buffer) for chunk in chunks)
                tensors.append(await off_loop(size, _combined, chunks))
                chunks = []
        if count is not None and not chunks and (not message.tensors or len(tensors) >= count):
            break
    if chunks:
        raise InvalidRequestError("stream ended in the middle of a tensor")
    return tensors, metadata or b""


async def read_answer(responses: AsyncIterator, count: int = 0) -> tuple[list[torch.Tensor], bytes]:
    """The answer of a one-answer RPC (``ONE_ANSWER``): its ``count`` tensors and metadata (``collect_tensors``), or
    its refusal; then this side closes the stream, which the server waits for before closing its own. A stream
    closed with no answer at all gives ``([], b"")``."""
    try:
        return await collect_tensors(responses, count=count)
    finally:
        await responses.aclose()  # hivemind's reader closes its end of the stream


def _combined(chunks: list[runtime_pb2.Tensor]) -> torch.Tensor:
    return deserialize(combine_from_streaming(chunks) if len(chunks) > 1 else chunks[0])


async def off_loop(size: int, function: Callable, *args):
    """``function(*args)``: here when ``size`` (the bytes it works on) is small, else on a decoding thread, so that
    parsing, decoding or checking one large message does not stall the event loop every other request waits on."""
    if size < OFF_LOOP_BYTES:
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(_decoding_threads(), function, *args)


@functools.cache
def _decoding_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="petals-decode")


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


# --- serving streams ------------------------------------------------------------------------------------------


async def serve_stream(
    p2p: P2P,
    name: str,
    handler: Callable,
    message_type: type,
    stream_output: bool,
    info: StreamInfo,
    reader,
    writer,
    *,
    max_frame_bytes: int | None = None,
    linger: float = 0.0,
) -> None:
    """Serve one RPC stream (hivemind's framing: a marker byte, a length, a protobuf; an error frame ends the
    requests). The stream closes as soon as ``handler`` has answered and either the client's messages have been
    read to their end or ``REST_SECONDS`` have passed: closing a stream with messages still on their way resets it
    and the client would lose its answer, but a client that goes on sending must see its writes fail, not block.
    With ``linger`` (a one-answer RPC), it then waits that long at most for the client, who has the answer, to close
    the stream first. A client that leaves, or sends what is not a frame (or a frame over ``max_frame_bytes``, before
    it is read), ends the stream and cancels the handler."""
    context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id)
    requests = _Requests()
    with contextlib.closing(writer):
        receiving = asyncio.create_task(requests.receive(reader, message_type, name, max_frame_bytes))
        answering = asyncio.create_task(_answer(handler(requests.messages(), context), stream_output, writer))
        try:
            await asyncio.wait({receiving, answering}, return_when=asyncio.FIRST_COMPLETED)
            if answering.done() and not requests.ended:
                await requests.drop_rest(receiving)
            if answering.done() and linger:  # `receiving` ends when the client closes the stream
                await asyncio.wait({receiving}, timeout=linger)
        finally:
            receiving.cancel()
            answering.cancel()


class _Requests:
    """The client's messages on one stream, read ahead of its handler (at most ``PREFETCH``)."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue(PREFETCH)
        self.ended = False  # the stream's end was read

    async def messages(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (message := await self.inbox.get()) is not None:
            yield message
        self.ended = True

    async def drop_rest(self, receiving: asyncio.Task) -> None:
        """Read and drop messages up to the end of stream, until the client leaves, or for ``REST_SECONDS``."""

        async def drop():
            async for _ in self.messages():
                pass

        dropping = asyncio.create_task(drop())
        try:
            await asyncio.wait({dropping, receiving}, timeout=REST_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropping.cancel()

    async def receive(
        self, reader: asyncio.StreamReader, message_type: type, name: str, max_frame_bytes: int | None
    ) -> None:
        """Queue the client's messages up to its end of stream; return when the client leaves after it."""
        try:
            while (message := await _receive_frame(reader, message_type, max_frame_bytes)) is not None:
                await self.inbox.put(message)
            await self.inbox.put(None)
            await reader.read(1)  # nothing follows the end: an EOF means the client left
        except asyncio.IncompleteReadError:
            pass  # the client left or reset the stream
        except Exception as exc:  # noqa: BLE001 (not a frame: nothing to answer a peer that does not speak it)
            logger.info("%s stream closed: %s: %s", name, exc.__class__.__name__, str(exc)[:200])


async def _receive_frame(reader: asyncio.StreamReader, message_type: type, max_frame_bytes: int | None = None):
    """The next message of a request stream, or None at its end (hivemind ends streams with an error frame)."""
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise ValueError(f"not a stream frame (marker {marker!r})")
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if max_frame_bytes is not None and length > max_frame_bytes:  # refused before its bytes are buffered
        raise ValueError(f"a frame of {length} bytes exceeds this server's limit of {max_frame_bytes}")
    data = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:
        return None
    return await off_loop(len(data), message_type.FromString, data)


async def _answer(output, stream_output: bool, writer: asyncio.StreamWriter) -> None:
    """Send the handler's answers; an exception in the handler becomes hivemind's error frame."""
    try:
        responses = output if stream_output else _one(await output)
        async for response in responses:
            try:
                await P2P.send_protobuf(response, writer)
            except Exception:  # noqa: BLE001 (the client left or the connection broke: no one to answer)
                return
    except Exception as exc:  # noqa: BLE001 (a handler's bug must not take the stream loop with it)
        logger.warning("RPC handler failed", exc_info=True)
        with contextlib.suppress(Exception):
            await P2P.send_protobuf(RPCError(message=str(exc)), writer)
    finally:
        if stream_output:
            await output.aclose()  # a handler's cleanup (its session's cache) runs now, not when it is collected


async def _one(item):
    yield item


def response_messages(tensors: Iterable[torch.Tensor], meta: StepResponse) -> list[runtime_pb2.ExpertResponse]:
    requests = request_messages(list(tensors), pack(meta))
    return [runtime_pb2.ExpertResponse(tensors=message.tensors, metadata=message.metadata) for message in requests]


def peer_id_from_string(text: str) -> PeerID:
    return PeerID.from_base58(text)
