"""An in-process fake swarm for unit tests of the client's session logic: servers, their sessions, and a connection.

``FakeServer`` answers ``rpc_inference`` streams message for message as a real server does (an acknowledgement,
then one ``transport.step_response`` or ``transport.error_response`` per step, pushes to the next server's session
included), but its "blocks" are a few lines of arithmetic whose outputs depend on every token a session cached, so
a cache rebuilt wrongly shows in the outputs. Each session records every step it received, so tests can check what
a client replayed. Faults are set on the server: ``fail_at_step``, ``dead``, ``tamper_from``, ``accept_pushes``,
``own_session_ids``. ``FakeConnection`` is what ``InferenceSession`` needs of a ``SwarmClient``: an event loop
thread with ``run``, the config, stubs, liveness, a greedy route and bans (recorded for tests to read).

Owns nothing of the client; imports the wire (``transport``, ``step``, ``wire``) the way the real server does, and
never the real server (its compute would need a model).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Collection, Coroutine
from typing import Any, TypeVar

import torch
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.config import ClientConfig
from petals_cli.errors import InvalidRequestError, NoRouteError, PetalsError, ServerError
from petals_cli.routing import RouteSpan
from petals_cli.step import Step
from petals_cli.wire import SpanRequest, StepResponse

T = TypeVar("T")
TAMPER = 1.0  # added to a tampering server's outputs: far beyond float64's tolerance in ``verify.compare``
PUSH_WAIT = 0.2  # seconds a pushed step waits for its session to open (the real server waits 1s)


def block_constant(block: int) -> float:
    """The factor that makes each fake block compute something of its own."""
    return 1 + 0.01 * (block + 1)


def run_blocks(inputs: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Outputs of blocks [start, end) for a session's whole input [batch, tokens, hidden]: each block maps token t
    to ``input_t * block_constant(block) + 0.001 * (input_0 + ... + input_t)``, so every output depends on all
    earlier tokens (a causal cache) and a token missing or wrong in a cache changes every later output."""
    hidden = inputs
    for block in range(start, end):
        hidden = hidden * block_constant(block) + 0.001 * hidden.cumsum(dim=1)
    return hidden


@dataclasses.dataclass(frozen=True)
class Received:
    """One step a fake session received: from the client's stream, or pushed by the previous server."""

    position: int
    tokens: int
    rewind: bool
    inputs: torch.Tensor
    pushed: bool


class FakeSession:
    """One inference session on a fake server: blocks [start, end), the inputs it caches, and what it received."""

    def __init__(self, session_id: str, request: SpanRequest):
        self.session_id, self.start, self.end = session_id, request.start_block, request.end_block
        self.cache: torch.Tensor | None = None  # inputs of every cached token [batch, tokens, hidden]
        self.received: list[Received] = []
        self.inbox: asyncio.Queue = asyncio.Queue()  # the client's messages and pushed steps, in arrival order
        self.closed = False

    @property
    def tokens(self) -> int:
        return 0 if self.cache is None else self.cache.shape[1]

    def apply(self, step: Step) -> torch.Tensor:
        """Move the cache past ``step`` (dropping what it held from ``step.position`` with ``rewind``); its outputs."""
        if step.position > self.tokens or (step.position < self.tokens and not step.rewind):
            raise InvalidRequestError(
                f"step at position {step.position}, session is at {self.tokens} (rewind={step.rewind})"
            )
        kept = self.cache[:, : step.position] if self.cache is not None else step.hidden[:, :0]
        self.cache = torch.cat([kept, step.hidden], dim=1)
        return run_blocks(self.cache, self.start, self.end)[:, step.position :]


class FakeServer:
    """A server holding blocks [start, end) of the fake model; faults are switched on by setting attributes."""

    def __init__(self, peer_id: str, start: int, end: int):
        self.peer_id, self.start, self.end = peer_id, start, end
        self.swarm: FakeSwarm | None = None  # set by ``FakeSwarm.add``; pushes look the next server up there
        self.sessions: dict[str, FakeSession] = {}  # open sessions by id
        self.opened: list[FakeSession] = []  # every session ever opened here, in order
        self.steps = 0  # steps applied (or failed) here, of all sessions
        self.fail_at_step: int | None = None  # this step (counting from 1, all sessions) answers a ServerError
        self.dead = False  # no new stream; open streams break at their next message; liveness checks fail
        self.tamper_from: int | None = None  # outputs of positions from here on are wrong (a lying server)
        self.accept_pushes = True  # False: every step pushed here is refused (the pusher answers pushed=False)
        self.own_session_ids = False  # sessions get this server's ids, not the client's: pushes find none
        self._opened = asyncio.Condition()

    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        """A session's stream as the real server answers it: its acknowledgement, then one answer per step."""
        opening = await anext(requests, None)
        if opening is None:
            return
        try:
            request = SpanRequest.from_wire(transport.unpack(opening.metadata))
            if not self.start <= request.start_block < request.end_block <= self.end:
                raise InvalidRequestError(f"blocks {request.start_block}:{request.end_block} are not served here")
        except PetalsError as error:
            yield transport.error_response(error)
            return
        session_id = f"own-{len(self.opened)}" if self.own_session_ids else request.session_id
        session = FakeSession(session_id, request)
        async with self._opened:
            self.sessions[session_id] = session
            self.opened.append(session)
            self._opened.notify_all()
        yield runtime_pb2.ExpertResponse(metadata=transport.pack(StepResponse(position=0, session_id=session_id)))
        reader = asyncio.create_task(_read_into(requests, session.inbox))
        try:
            while (item := await session.inbox.get()) is not None:
                if self.dead:
                    raise ConnectionError(f"{self.peer_id} is down")
                response, broken = await self._step(session, item)
                yield response
                if broken:  # a failed step ends its session, as on a real server
                    return
        finally:
            reader.cancel()
            session.closed = True
            self.sessions.pop(session_id, None)

    async def _step(self, session: FakeSession, item) -> tuple[runtime_pb2.ExpertResponse, bool]:
        """Apply a client's message or a pushed ``Step``; its answer, and whether the session broke."""
        self.steps += 1
        try:
            step = item if isinstance(item, Step) else Step.from_message(item)
            session.received.append(
                Received(step.position, step.tokens, step.rewind, step.hidden.clone(), isinstance(item, Step))
            )
            if self.steps == self.fail_at_step:
                raise ServerError(f"{self.peer_id} failed at its step {self.steps} (on purpose)")
            output = session.apply(step)
        except ServerError as error:
            return transport.error_response(error), True
        except PetalsError as error:
            return transport.error_response(error), False
        if self.tamper_from is not None:
            positions = torch.arange(step.position, step.position + step.tokens)
            output = output + TAMPER * (positions >= self.tamper_from).to(output.dtype)[None, :, None]
        pushed = bool(step.next_hops) and await self.swarm.deliver(step.pushed_on(output), step.next_hops[0][0])
        return transport.step_response(output, StepResponse(position=session.tokens, pushed=pushed)), False

    async def accept(self, step: Step) -> bool:
        """A step pushed here: queued into its session's inbox (False when refused, as ``rpc_push`` refuses)."""
        if self.dead or not self.accept_pushes:
            return False
        try:  # the session may not have read its opening yet (the real server waits for it too)
            async with self._opened:
                await asyncio.wait_for(self._opened.wait_for(lambda: step.session_id in self.sessions), PUSH_WAIT)
        except TimeoutError:
            return False
        self.sessions[step.session_id].inbox.put_nowait(step)
        return True


async def _read_into(requests: AsyncIterator, inbox: asyncio.Queue) -> None:
    try:
        async for message in requests:
            await inbox.put(message)
    except Exception:  # noqa: BLE001 (a broken stream ends the session like a closed one)
        pass
    await inbox.put(None)


class _Responses:
    """A stream's answers, read by the client; the server's generator runs in a task of its own, as a real server
    runs beside its client (a pushed step reaches the next session whether or not the client reads it yet)."""

    _END = object()

    def __init__(self, answers):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(answers))

    async def _pump(self, answers) -> None:
        try:
            async for answer in answers:
                self._queue.put_nowait(answer)
        except Exception as exc:  # noqa: BLE001 (handed to the reader, as a broken stream is)
            self._queue.put_nowait(exc)
        self._queue.put_nowait(self._END)

    def __aiter__(self):
        return self

    async def __anext__(self) -> runtime_pb2.ExpertResponse:
        answer = await self._queue.get()
        if answer is self._END:
            self._queue.put_nowait(answer)
            raise StopAsyncIteration
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Stub:
    def __init__(self, swarm: FakeSwarm, peer_id: str):
        self.swarm, self.peer_id = swarm, peer_id

    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> _Responses:
        server = self.swarm.servers.get(self.peer_id)
        if server is None or server.dead:
            raise ConnectionError(f"cannot reach {self.peer_id}")
        return _Responses(server.rpc_inference(requests))


class FakeSwarm:
    """Fake servers by peer id; routes prefer them in the order they were added."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.servers: dict[str, FakeServer] = {}

    def add(self, server: FakeServer) -> FakeServer:
        server.swarm = self
        self.servers[server.peer_id] = server
        return server

    async def deliver(self, step: Step, peer_id: str) -> bool:
        """A server pushes ``step`` to ``peer_id``'s session ``step.session_id``; False when it was refused."""
        server = self.servers.get(peer_id)
        return server is not None and await server.accept(step)

    def connect(self, **config: Any) -> FakeConnection:
        return FakeConnection(self, config)


class FakeConnection:
    """What an ``InferenceSession`` needs of a ``SwarmClient``, over a ``FakeSwarm``; close it after use."""

    def __init__(self, swarm: FakeSwarm, config: dict[str, Any]):
        defaults = dict(request_timeout=5.0, liveness_interval=0.05, liveness_timeout=0.2, route_wait=0.0)
        self.swarm, self.config = swarm, ClientConfig(**{**defaults, **config})
        self.banned: set[str] = set()
        self.bans: list[str] = []  # every ban, in order (a failure each)
        self.banned_forever: list[str] = []  # servers caught computing wrongly
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-client", daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the client's loop; a test that would hang fails after 30s instead."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(30.0 if timeout is None else timeout)
        except BaseException:
            future.cancel()
            raise

    def stub(self, peer_id: str) -> _Stub:
        return _Stub(self.swarm, peer_id)

    async def is_alive(self, peer_id: str) -> bool:
        server = self.swarm.servers.get(peer_id)
        return server is not None and not server.dead

    def silent_since(self, peer_id: str) -> float | None:
        return None  # dead servers are known at once here: nothing is remembered between checks

    async def route(
        self,
        prefix: str,
        num_blocks: int,
        start: int = 0,
        end: int | None = None,
        *,
        cache_tokens_needed: int = 0,
        wait: float | None = None,
        exclude: Collection[str] = (),
        inference: bool = True,
    ) -> list[RouteSpan]:
        """Greedy: from each block on, the first-added usable server holding it, as far as it reaches."""
        end = num_blocks if end is None else end
        usable = [
            server
            for server in self.swarm.servers.values()
            if not server.dead and server.peer_id not in self.banned and server.peer_id not in exclude
        ]
        spans, block = [], start
        while block < end:
            server = next((server for server in usable if server.start <= block < server.end), None)
            if server is None:
                raise NoRouteError(f"no server for block {block}", missing_blocks=tuple(range(block, end)))
            spans.append(RouteSpan(server.peer_id, block, min(server.end, end)))
            block = spans[-1].end
        return spans

    def ban(self, peer_id: str) -> None:
        self.banned.add(peer_id)
        self.bans.append(peer_id)

    def ban_forever(self, peer_id: str) -> None:
        self.banned.add(peer_id)
        self.banned_forever.append(peer_id)

    def succeed(self, peer_id: str) -> None:
        if peer_id not in self.banned_forever:  # as ``BanList.succeed``: an answer clears a failure's ban
            self.banned.discard(peer_id)

    def close(self) -> None:
        async def shutdown():
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._loop.shutdown_asyncgens()

        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
