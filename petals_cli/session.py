"""Client-side use of remote blocks: inference sessions (server-side caches) and forward/backward.

``InferenceSession`` opens one streaming RPC per span of its route and pushes each step's hidden states
through the chain; servers keep the attention caches. ``RemoteBlocks`` runs blocks without caches and is
differentiable: its backward asks the servers for input gradients. Knows nothing about tokens or heads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.client import SwarmClient
from petals_cli.errors import PetalsError, ServerError, SessionLengthError
from petals_cli.routing import RouteSpan
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest, StepRequest

logger = logging.getLogger(__name__)
_TRANSPORT_ERRORS = (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, asyncio.IncompleteReadError)


@dataclass
class _SpanStream:
    """One open inference stream to one server."""

    span: RouteSpan
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    responses: AsyncIterator | None = None
    acknowledged: bool = False

    async def requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            message = await self.outbox.get()
            if message is None:
                return
            yield message


class InferenceSession:
    """A stateful generation session over a route; ``step`` is the sync entry point."""

    def __init__(self, client: SwarmClient, prefix: str, num_blocks: int, *, max_length: int, batch_size: int = 1):
        self.client, self.prefix, self.num_blocks = client, prefix, num_blocks
        self.max_length, self.batch_size = max_length, batch_size
        self.position = 0
        self._streams: list[_SpanStream] | None = None
        self._closed = False

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send new tokens' hidden states [batch, tokens, hidden] through every block; returns the outputs."""
        if self._closed:
            raise SessionLengthError("this inference session is closed")
        if self.position + hidden.shape[1] > self.max_length:
            raise SessionLengthError(
                f"session max_length is {self.max_length}; this step would reach {self.position + hidden.shape[1]}"
            )
        timeout = self.client.config.request_timeout + self.client.config.route_wait
        output = self.client.run(self._step(hidden.detach().cpu()), timeout=timeout)
        self.position += hidden.shape[1]
        return output

    async def _open(self) -> list[_SpanStream]:
        route = await self.client.route(self.prefix, self.num_blocks)
        streams = []
        for span in route:
            stream = _SpanStream(span)
            request = SpanRequest(
                protocol=PROTOCOL_VERSION,
                prefix=self.prefix,
                start_block=span.start,
                end_block=span.end,
                max_length=self.max_length,
                batch_size=self.batch_size,
            )
            stream.outbox.put_nowait(runtime_pb2.ExpertRequest(metadata=transport.pack(request)))
            stream.responses = await self.client.stub(span.peer_id).rpc_inference(stream.requests())
            streams.append(stream)
        logger.debug("session route: %s", " -> ".join(f"{s.peer_id[-6:]}[{s.start}:{s.end}]" for s in route))
        return streams

    async def _step(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._streams is None:
            self._streams = await self._open()
        for stream in self._streams:
            stream.outbox.put_nowait(
                transport.step_request(hidden, transport.pack(StepRequest(position=self.position)))
            )
            hidden = await self._receive(stream)
        return hidden

    async def _receive(self, stream: _SpanStream) -> torch.Tensor:
        timeout = self.client.config.request_timeout
        try:
            if not stream.acknowledged:
                transport.check_response(await asyncio.wait_for(anext(stream.responses), timeout))
                stream.acknowledged = True
            response = await asyncio.wait_for(anext(stream.responses), timeout)
        except StopAsyncIteration:
            raise ServerError(f"server {stream.span.peer_id[-8:]} closed the session") from None
        except _TRANSPORT_ERRORS as exc:
            raise ServerError(f"server {stream.span.peer_id[-8:]} failed: {exc}") from exc
        transport.check_response(response)
        if len(response.tensors) != 1:
            raise ServerError(f"server {stream.span.peer_id[-8:]} sent {len(response.tensors)} tensors")
        return transport.deserialize(response.tensors[0])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._streams is not None and not self.client.loop.is_closed():
            for stream in self._streams:
                self.client.loop.call_soon_threadsafe(stream.outbox.put_nowait, None)


async def _call_unary(client: SwarmClient, prefix: str, span: RouteSpan, method: str, tensors) -> torch.Tensor:
    request = SpanRequest(protocol=PROTOCOL_VERSION, prefix=prefix, start_block=span.start, end_block=span.end)
    messages = transport.request_messages(tensors, transport.pack(request))

    async def requests():
        for message in messages:
            yield message

    try:
        responses = await getattr(client.stub(span.peer_id), method)(requests())
        outputs, metadata = await asyncio.wait_for(transport.collect_tensors(responses), client.config.request_timeout)
    except PetalsError:
        raise
    except _TRANSPORT_ERRORS as exc:
        raise ServerError(f"server {span.peer_id[-8:]} failed: {exc}") from exc
    transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
    if len(outputs) != 1:
        raise ServerError(f"server {span.peer_id[-8:]} sent {len(outputs)} tensors")
    return outputs[0]


class RemoteBlocks(torch.autograd.Function):
    """Differentiable run of all remote blocks: forward RPCs, then backward RPCs in reverse."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, client: SwarmClient, prefix: str, num_blocks: int) -> torch.Tensor:
        async def run():
            route = await client.route(prefix, num_blocks)
            inputs, current = [], hidden.detach().cpu()
            for span in route:
                inputs.append(current)
                current = await _call_unary(client, prefix, span, "rpc_forward", [current])
            return route, inputs, current

        route, inputs, output = client.run(run())
        ctx.route, ctx.inputs, ctx.client, ctx.prefix = route, inputs, client, prefix
        return output.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        async def run():
            grad = grad_output.detach().cpu()
            for span, inputs in zip(reversed(ctx.route), reversed(ctx.inputs), strict=True):
                grad = await _call_unary(ctx.client, ctx.prefix, span, "rpc_backward", [inputs, grad])
            return grad

        return ctx.client.run(run()).to(grad_output.dtype), None, None, None
