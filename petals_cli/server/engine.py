"""The step engine: one compute thread, and the inference steps waiting for it run together.

Server sessions submit each validated inference step as a ``StepJob`` and await its output. The engine owns the
compute thread. Whenever it is free it takes every step waiting at that moment and ``plan`` (pure) groups them:
one-token steps of different sessions over the same blocks and adapter form one batch (decoding reads every weight
once per step, so a batch of eight costs far less than eight steps), bounded in size and filled round-robin across
peers so that no peer's sessions crowd out another's; every other step runs alone, and so does every step of a
session that brought its own LoRA weights. Steps that arrive while a batch computes wait for the next one. While
other sessions are open on the server, a long step (a prompt) is computed in chunks of ``PREFILL_CHUNK`` tokens
with the waiting one-token steps of other sessions run between them, so one user's prompt does not stall
everyone's decoding for its whole length (alone, it runs whole). Forward and backward requests (training) run on
the same thread through ``run``, each after the inference steps waiting then.

A batch that fails fails every step in it: their caches may be half-extended, so each of those sessions ends and
its client fails over (replaying its history elsewhere), exactly as after a failed step of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

MAX_BATCH = 8  # sessions per batched step
PREFILL_CHUNK = 128  # tokens of a long prompt computed at once; other sessions' steps run between the chunks
# The compute thread is stalled (hung, not slow) once one call has run STALL_FACTOR times longer than the server's
# measured speed allows for its tokens, and at least STALL_FLOOR seconds: its clients then fail over at once.
STALL_FACTOR = 10.0
STALL_FLOOR = 1.0
STEP_SMOOTHING = 0.3  # weight of the newest one-token batch in ``EngineStats.step_seconds`` (a moving average)


@dataclasses.dataclass(eq=False)
class StepJob:
    """One validated inference step of one session, waiting for the compute thread."""

    session: str  # the server session's id
    peer: str
    blocks: tuple[int, int]
    adapter: str
    hidden: torch.Tensor  # [batch, new tokens, hidden]
    cache: Any
    attention_mask: torch.Tensor | None = None  # [batch, cached + new tokens], when the session has padding
    position_ids: torch.Tensor | None = None  # [batch, new tokens]
    prompts: torch.Tensor | None = None
    lora: Any = None  # the LoRA weights the session's client sent (adapters.RequestLora): it never joins a batch
    batchable: bool = False  # a one-token step whose cache and model allow batching with others
    chunkable: bool = False  # a long step (a prompt) that may be computed in chunks, in order, through the cache
    future: asyncio.Future | None = None
    span: Any = None  # the blocks (SpanRunner) its session was opened on: its cache belongs to them

    def chunks(self, size: int) -> list[StepJob]:
        """This step as consecutive steps of at most ``size`` tokens (the same session, cache and outcome)."""
        new = self.hidden.shape[1]
        cached = 0 if self.attention_mask is None else self.attention_mask.shape[1] - new
        parts = []
        for begin in range(0, new, size):
            end = min(begin + size, new)
            mask = None if self.attention_mask is None else self.attention_mask[:, : cached + end]
            positions = None if self.position_ids is None else self.position_ids[:, begin:end]
            parts.append(dataclasses.replace(self, hidden=self.hidden[:, begin:end], attention_mask=mask,
                                             position_ids=positions, future=None))  # fmt: skip
        return parts

    @property
    def group_key(self) -> tuple:
        # a client's LoRA and the span compare by identity: one session's weights; the blocks a cache belongs to
        return (self.blocks, self.adapter, self.lora, id(self.span))


def plan(jobs: list[StepJob], max_batch: int = MAX_BATCH) -> tuple[list[list[StepJob]], list[StepJob]]:
    """Group waiting steps (in arrival order) into what runs now, and what waits for the next round.

    Batchable steps with the same blocks and adapter share batches of at most ``max_batch``; a batch takes one
    step of each peer in turn, so a peer with many sessions fills only what others leave. Steps that did not fit
    wait (they are the oldest next round). Other steps run alone, in order. Pure: no clocks, no I/O.
    """
    groups: list[list[StepJob]] = []
    waiting: list[StepJob] = []
    batches: dict[tuple, list[StepJob]] = {}  # blocks and adapter -> its batchable steps, in arrival order
    for job in jobs:
        if not job.batchable:
            groups.append([job])
        elif job.group_key in batches:
            batches[job.group_key].append(job)
        else:
            batches[job.group_key] = [job]
            groups.append(batches[job.group_key])  # the batch keeps the place of its first step
    for batch in batches.values():
        chosen = _round_robin(batch)[:max_batch]
        waiting.extend(job for job in batch if job not in chosen)  # identity: StepJob compares by identity
        batch[:] = chosen
    return groups, waiting


def _round_robin(jobs: list[StepJob]) -> list[StepJob]:
    """Jobs reordered as each peer's first, then each peer's second, ... (peers in order of their first job)."""
    rank: dict[str, int] = {}
    keyed = []
    for arrival, job in enumerate(jobs):
        rank[job.peer] = rank.get(job.peer, -1) + 1
        keyed.append((rank[job.peer], arrival, job))
    return [job for _, _, job in sorted(keyed, key=lambda item: item[:2])]


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    batches: int = 0  # batched forwards run (two or more sessions)
    batched_steps: int = 0  # steps that ran in such a batch
    largest_batch: int = 0
    last_batch: int = 0
    step_seconds: float = 0.0  # recent seconds per call of one-token steps (a batch), exponentially weighted


def _tokens_of(args: tuple) -> int:
    """Tokens a compute call works on: its steps' (a group of jobs), or its hidden states' (forward, backward)."""
    for arg in args:
        if isinstance(arg, list) and arg and isinstance(arg[0], StepJob):
            return sum(job.hidden.shape[0] * job.hidden.shape[1] for job in arg)
        if isinstance(arg, torch.Tensor) and arg.dim() == 3:
            return arg.shape[0] * arg.shape[1]
    return 1


class StepEngine:
    """Owns the compute thread; ``submit`` runs an inference step (batched with others when it can)."""

    def __init__(
        self,
        run_group: Callable[[list[StepJob]], list[torch.Tensor]],
        *,
        max_batch: int = MAX_BATCH,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        self._run_group = run_group  # on the compute thread: the outputs of a group's steps, in order
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="petals-compute")
        self._waiting: list[StepJob] = []
        self._calls: list[tuple[Callable, tuple, asyncio.Future]] = []  # forward/backward: after waiting steps
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._busy: tuple[float, int] | None = None  # the running call's start (time.monotonic()) and tokens
        self.stats = EngineStats()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def stalled(self, seconds_per_token: float) -> bool:
        """The call on the compute thread has run far longer than ``seconds_per_token`` (the server's measured
        speed through all its blocks) allows for its tokens; False while the speed is unknown (0)."""
        busy = self._busy
        if busy is None or seconds_per_token <= 0:
            return False
        started, tokens = busy
        return time.monotonic() - started > max(STALL_FLOOR, STALL_FACTOR * tokens * seconds_per_token)

    async def run(self, function, *args):
        """Run ``function(*args)`` on the compute thread (forward and backward requests): after the inference
        steps waiting at that moment, so that training never holds up interactive sessions for long."""
        future = self._start().create_future()
        self._calls.append((function, args, future))
        self._wake.set()
        return await future

    async def submit(self, job: StepJob) -> torch.Tensor:
        job.future = self._start().create_future()
        self._waiting.append(job)
        self._wake.set()
        return await job.future  # cancelled by a deadline: the engine skips the step if it has not started

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._serve())
        return asyncio.get_running_loop()

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting or self._calls:
                await self._run_waiting_steps()
                if self._calls:  # one forward/backward, then the steps that came meanwhile
                    function, args, future = self._calls.pop(0)
                    if not future.done():
                        await self._settle(future, self._on_thread(function, *args))

    async def _run_waiting_steps(self, *, decodes_only: bool = False) -> None:
        jobs = [job for job in self._waiting if not job.future.done()]
        if decodes_only:  # between the chunks of a prompt: only the one-token steps that are waiting
            jobs, self._waiting = [job for job in jobs if job.batchable], [job for job in jobs if not job.batchable]
        else:
            self._waiting = []
        groups, leftover = plan(jobs, self.max_batch)
        self._waiting = leftover + self._waiting
        groups.sort(key=lambda group: not group[0].batchable)  # one-token steps first: they are short
        for group in groups:
            group = [job for job in group if not job.future.done()]
            if len(group) == 1 and group[0].chunkable and group[0].hidden.shape[1] > self.prefill_chunk:
                await self._compute_in_chunks(group[0])
            elif group:
                await self._compute_group(group)

    async def _compute_in_chunks(self, job: StepJob) -> None:
        outputs = []
        for index, chunk in enumerate(job.chunks(self.prefill_chunk)):
            if index:
                await self._run_waiting_steps(decodes_only=True)
            if job.future.done():  # its deadline passed: the session ends, the rest is not computed
                return
            try:
                outputs.append((await self._on_thread(self._run_group, [chunk]))[0])
            except Exception as exc:  # noqa: BLE001 (the step reports it; its session ends)
                job.future.set_exception(exc)
                return
        self._count([job])
        job.future.set_result(torch.cat(outputs, dim=1))

    async def _on_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, self._timed, function, args)

    def _timed(self, function, args):
        """On the compute thread: ``function(*args)``, known as busy meanwhile (see ``stalled``)."""
        self._busy = (time.monotonic(), _tokens_of(args))
        try:
            return function(*args)
        finally:
            self._busy = None

    @staticmethod
    async def _settle(future: asyncio.Future, awaitable) -> None:
        try:
            result = await awaitable
        except Exception as exc:  # noqa: BLE001 (handed to the caller)
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    def _count(self, group: list[StepJob]) -> None:
        self.stats.steps += len(group)
        self.stats.last_batch = len(group)
        self.stats.largest_batch = max(self.stats.largest_batch, len(group))
        if len(group) > 1:
            self.stats.batches += 1
            self.stats.batched_steps += len(group)

    def _time_decode(self, seconds: float) -> None:
        """Routing reads this as the server's step time under its current load (prompts are left out)."""
        previous = self.stats.step_seconds
        self.stats.step_seconds = seconds if previous == 0 else previous + STEP_SMOOTHING * (seconds - previous)

    async def _compute_group(self, group: list[StepJob]) -> None:
        started = time.monotonic()
        try:
            outputs = await self._on_thread(self._run_group, group)
        except Exception as exc:  # noqa: BLE001 (every step of the group reports it; the handler describes it)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self._count(group)
        if all(job.hidden.shape[1] == 1 for job in group):
            self._time_decode(time.monotonic() - started)
        for job, output in zip(group, outputs, strict=True):
            if not job.future.done():
                job.future.set_result(output)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._compute.shutdown(wait=False, cancel_futures=True)
