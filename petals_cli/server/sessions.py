"""A server's inference sessions: each one's cache, position and padding mask, and the registry that opens them.

``ServerSession.apply(step, run)`` is the one place a step meets a session's state: it checks the step against
the session (position, length), grows the padding mask and derives positions (``step.py``, as the client does),
hands the step to ``run`` (the engine, behind the handler's deadline) as a ``StepJob`` and moves the session
forward only when that succeeded. A step with ``rewind`` may start before the session's end: once it has passed
every check, the cache is cut back to its position right before it runs. A step that failed after compute began
leaves the session ``broken``: some blocks may have extended the cache, so it ends after reporting the failure and
its client replays elsewhere.

``ServerSessions`` opens sessions under the hard limits, the per-peer limit and the ``CacheBudget`` (reserved
before the cache exists), and returns their tokens when they close. Knows nothing about the RPC protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import torch

from petals_cli.errors import InvalidRequestError, SessionLengthError
from petals_cli.families import kv_cache
from petals_cli.server import validation
from petals_cli.server.cache import CacheBudget
from petals_cli.server.engine import StepJob
from petals_cli.server.validation import Limits, PeerSessions
from petals_cli.step import Step, extend_mask, positions_from_mask
from petals_cli.wire import SpanRequest

logger = logging.getLogger(__name__)
INBOX_SIZE = 4  # messages waiting for a session (an honest client has one step in flight, plus a push)


@dataclasses.dataclass(eq=False)
class ServerSession:
    id: str
    request: SpanRequest
    cache: object
    peer: str = ""
    position: int = 0
    attention_mask: torch.Tensor | None = None  # [batch, position], once a step has sent padding
    broken: bool = False  # a step failed half-way; the session ends after reporting it
    batchable: bool = False  # its cache and model let its one-token steps join batches
    last_step: Step | None = None  # the step applied last (see ``repeats``)
    lora: Any = None  # the LoRA weights its client sent when opening it (adapters.RequestLora), for every step
    span: Any = None  # the blocks (SpanRunner) it was opened on; after a move the server computes with others
    # its client's messages and steps pushed to it; bounded, so a client that sends without waiting is held back
    inbox: asyncio.Queue = dataclasses.field(default_factory=lambda: asyncio.Queue(INBOX_SIZE))

    def job(self, step: Step, *, others_open: bool) -> StepJob:
        """``step`` (checked by ``validation.check_step``) as the engine's job for this session's state, rewound to
        the step's position; changes nothing (``apply`` cuts the cache back)."""
        start, tokens = self._start_of(step), step.tokens
        if start + tokens > self.request.max_length:
            raise SessionLengthError(
                f"step would reach {start + tokens} tokens, max_length is {self.request.max_length}"
            )
        earlier = None if self.attention_mask is None else self.attention_mask[:, :start]
        mask = extend_mask(earlier, start, step.attention_mask, step.hidden.shape[0], tokens)
        positions = step.position_ids
        if mask is not None and positions is None:
            positions = positions_from_mask(mask, tokens)
        prompts = step.prompts  # only the part of the prefix this step covers
        if prompts is not None:
            prompts = prompts[:, step.position :] if step.position < prompts.shape[1] else None
        job = StepJob(
            self.id,
            self.peer,
            (self.request.start_block, self.request.end_block),
            self.request.adapter,
            step.hidden,
            self.cache,
            attention_mask=mask,
            position_ids=positions,
            prompts=prompts,
            lora=self.lora,
            span=self.span,
        )
        if prompts is None and self.batchable:
            job.batchable = tokens == 1 and self.lora is None  # one session's own weights: never in a batch
            job.chunkable = tokens > 1 and others_open  # alone on the server, a prompt runs whole
        return job

    def repeats(self, step: Step) -> bool:
        """``step`` is a second copy of the step applied last: its previous server pushed it, the push seemed to
        fail (it took too long), and the client relayed the same step itself; or the other way round. The step was
        answered once, as the client expects; the copy changes nothing and gets no answer."""
        last = self.last_step
        return (
            last is not None
            and not step.rewind
            and step.position == last.position
            and step.position + step.tokens == self.position
            and torch.equal(step.hidden, last.hidden)
        )

    def _start_of(self, step: Step) -> int:
        """The position ``step`` starts at: the session's end, or with ``rewind`` any earlier one its cache can
        return to."""
        start = step.position
        if start == self.position:
            return start
        if not (step.rewind and 0 <= start < self.position):
            allowed = f"0..{self.position} with rewind" if step.rewind else f"{self.position} without rewind"
            raise InvalidRequestError(
                f"step at position {start}, session is at {self.position} (a step may start at {allowed})"
            )
        if not kv_cache.can_rewind(self.cache, start):
            raise InvalidRequestError(
                f"this model's cache cannot be rewound from position {self.position} to {start}",
                hint="replay the session's tokens from its start instead (a sliding window may have dropped them)",
            )
        return start

    async def apply(
        self, step: Step, run: Callable[[StepJob], Awaitable[torch.Tensor]], *, others_open: bool
    ) -> torch.Tensor:
        """Run ``step`` through ``run`` and move the session past it; a refusal before compute changes nothing."""
        job = self.job(step, others_open=others_open)
        try:
            if step.position < self.position:
                kv_cache.rewind(self.cache, step.position)
            output = await run(job)
        except BaseException:  # compute may have begun (a failure, the deadline): the cache state is unknown
            self.broken = True
            raise
        self.position = step.position + step.tokens
        self.attention_mask = job.attention_mask
        self.last_step = step
        return output


class ServerSessions:
    """The open sessions of one server, within its limits and cache budget."""

    def __init__(self, budget: CacheBudget, limits: Limits, *, alloc_timeout: float):
        self.budget, self.limits, self.alloc_timeout = budget, limits, alloc_timeout
        self.peers = PeerSessions(limits.max_sessions_per_peer)
        self._open: dict[str, ServerSession] = {}
        self._opened = asyncio.Event()  # set (and replaced) whenever a session opens

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[ServerSession]:
        return iter(list(self._open.values()))

    async def find(self, session_id: str, wait: float) -> ServerSession | None:
        """The open session ``session_id``, waiting up to ``wait`` seconds for it to open (a client opens a route's
        sessions at once, so a step pushed from the previous server may arrive before the opening message)."""
        if not _is_session_id(session_id):
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while session_id not in self._open and loop.time() < deadline:
            opened = self._opened
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), deadline - loop.time())
        return self._open.get(session_id)

    async def open(
        self, request: SpanRequest, peer: str, make_cache: Callable[[], object], lora: Any = None
    ) -> ServerSession:
        # Hard limits first, so an absurd request never reaches the budget or allocates anything.
        tokens = validation.check_session_size(request, self.limits)
        session_id = request.session_id or uuid.uuid4().hex
        if not _is_session_id(session_id):
            raise InvalidRequestError("session_id must be 32 lowercase hex digits")
        if session_id in self._open:
            raise InvalidRequestError("this session_id is in use")
        self.peers.acquire(peer)
        try:
            await self.budget.allocate(session_id, tokens, timeout=self.alloc_timeout)
            cache = make_cache()
        except BaseException:
            self.budget.release(session_id)
            self.peers.release(peer)
            raise
        session = ServerSession(id=session_id, request=request, cache=cache, peer=peer, lora=lora)
        self._open[session_id] = session
        self._opened.set()  # wakes pushes that arrived before their session
        self._opened = asyncio.Event()
        logger.info(
            "session %s opened: blocks %d:%d, %d tokens reserved, %d left (peer %s)",
            session_id[:8], request.start_block, request.end_block, tokens, self.budget.tokens_left, peer[-8:],
        )  # fmt: skip
        return session

    def close(self, session: ServerSession, ending: str) -> None:
        if self._open.pop(session.id, None) is not None:
            self.peers.release(session.peer)
        self.budget.release(session.id)
        logger.info(
            "session %s %s at %d tokens, %d left (peer %s)",
            session.id[:8], ending, session.position, self.budget.tokens_left, session.peer[-8:],
        )  # fmt: skip


def _is_session_id(text: str) -> bool:
    return len(text) == 32 and set(text) <= set("0123456789abcdef")
