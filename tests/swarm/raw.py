"""Raw RPCs for the security and fuzz tests: sessions and forward calls driven message by message, and streams
driven frame by frame (``RawStream``: what a client that ignores the protocol's pace can send)."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest, StepRequest


def peer_id_of(server) -> str:
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


@dataclass
class RawSession:
    outbox: asyncio.Queue
    responses: AsyncIterator[runtime_pb2.ExpertResponse]
    position: int = 0

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        response = await self.send(
            transport.step_request([hidden], transport.pack(StepRequest(position=self.position)))
        )
        self.position = transport.check_response(response).position
        return transport.deserialize(response.tensors[0])

    async def send(self, message: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        self.outbox.put_nowait(message)
        return await self.receive()

    async def receive(self) -> runtime_pb2.ExpertResponse:
        return await anext(self.responses)

    async def end(self) -> None:
        """End the request stream politely and wait for the server to end its side."""
        self.outbox.put_nowait(None)
        async for _ in self.responses:
            pass

    async def abort(self) -> None:
        """Drop the stream without ending it, as a crashing client would."""
        await self.responses.aclose()


async def open_raw(stub, opening: runtime_pb2.ExpertRequest) -> tuple[RawSession, runtime_pb2.ExpertResponse]:
    """Send an opening message; return the stream and the server's first answer (ack or typed refusal)."""
    outbox = asyncio.Queue()

    async def requests():
        while (message := await outbox.get()) is not None:
            yield message

    outbox.put_nowait(opening)
    session = RawSession(outbox, await stub.rpc_inference(requests()))
    try:
        return session, await session.receive()
    except BaseException:
        await session.abort()
        raise


async def open_session(stub, prefix: str, end_block: int, max_length: int, batch_size: int = 1) -> RawSession:
    """A session on blocks [0, end_block), acknowledged (a typed refusal is raised)."""
    request = SpanRequest(
        protocol=PROTOCOL_VERSION,
        prefix=prefix,
        start_block=0,
        end_block=end_block,
        max_length=max_length,
        batch_size=batch_size,
    )
    session, answer = await open_raw(stub, runtime_pb2.ExpertRequest(metadata=transport.pack(request)))
    try:
        transport.check_response(answer)
    except BaseException:
        await session.abort()
        raise
    return session


async def call_stream(stub, method: str, messages, count: int = 1) -> tuple[list[torch.Tensor], bytes]:
    """A forward or backward: its first ``count`` tensors and metadata, or its refusal (the client closes)."""

    async def requests():
        for message in messages:
            yield message

    return await transport.read_answer(await getattr(stub, method)(requests()), count)


async def forward(stub, prefix: str, end_block: int, hidden: torch.Tensor) -> torch.Tensor:
    request = SpanRequest(protocol=PROTOCOL_VERSION, prefix=prefix, start_block=0, end_block=end_block)
    outputs, metadata = await call_stream(
        stub, "rpc_forward", transport.request_messages([hidden], transport.pack(request))
    )
    transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
    return outputs[0]


@dataclass
class RawStream:
    """One RPC stream written and read frame by frame, below hivemind's client (which writes and reads for you)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, client, peer_id: str, method: str) -> "RawStream":
        name = transport.BlocksService._get_handle_name(None, method)
        _, reader, writer = await client.p2p.call_binary_stream_handler(transport.peer_id_from_string(peer_id), name)
        return cls(reader, writer)

    async def send(self, message: runtime_pb2.ExpertRequest) -> None:
        await P2P.send_protobuf(message, self.writer)

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def end(self) -> None:
        """The end of the request stream (hivemind's error frame)."""
        await P2P.send_protobuf(P2P.END_OF_STREAM, self.writer)

    async def receive(self) -> runtime_pb2.ExpertResponse | None:
        """The server's next answer; None when it closed the stream."""
        try:
            response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self.reader)
        except asyncio.IncompleteReadError:
            return None
        if error is not None:
            raise P2PHandlerError(error.message)
        return response

    def close(self) -> None:
        self.writer.close()
