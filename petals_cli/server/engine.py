"""The step engine: one compute thread, and the inference steps waiting for it run together.

Handlers submit each validated inference step as a ``StepJob`` and await its output. The engine owns the compute
thread. Whenever it is free it takes every step waiting at that moment and ``plan`` (pure) groups them: one-token
steps of different sessions over the same blocks and adapter form one batch (decoding reads every weight once per
step, so a batch of eight costs little more than one step), bounded in size and filled round-robin across peers
so that no peer's sessions crowd out another's; every other step runs alone. Steps that arrive while a batch
computes wait for the next one. Forward and backward requests (training) run on the same thread through ``run``.

A batch that fails fails every step in it: their caches may be half-extended, so each of those sessions ends and
its client fails over (replaying its history elsewhere), exactly as after a failed step of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

MAX_BATCH = 8  # sessions per batched step


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
    batchable: bool = False  # a one-token step whose cache and model allow batching with others
    future: asyncio.Future | None = None

    @property
    def group_key(self) -> tuple:
        return (self.blocks, self.adapter)


def plan(jobs: list[StepJob], max_batch: int = MAX_BATCH) -> tuple[list[list[StepJob]], list[StepJob]]:
    """Group waiting steps (in arrival order) into what runs now, and what waits for the next round.

    Batchable steps with the same blocks and adapter share batches of at most ``max_batch``; a batch takes one
    step of each peer in turn, so a peer with many sessions fills only what others leave. Steps that did not fit
    wait (they are the oldest next round). Other steps run alone, in order. Pure: no clocks, no I/O.
    """
    groups: list[list[StepJob]] = []
    waiting: list[StepJob] = []
    by_key: dict[tuple, list[StepJob]] = {}
    for job in jobs:
        if job.batchable:
            if job.group_key not in by_key:
                by_key[job.group_key] = []
                groups.append(by_key[job.group_key])  # keeps the position of the key's first step
        else:
            groups.append([job])
    for key, group in by_key.items():
        candidates = [job for job in jobs if job.batchable and job.group_key == key]
        group.extend(_round_robin(candidates)[:max_batch])
        chosen = set(map(id, group))
        waiting.extend(job for job in candidates if id(job) not in chosen)
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


class StepEngine:
    """Owns the compute thread; ``submit`` runs an inference step (batched with others when it can)."""

    def __init__(self, run_group: Callable[[list[StepJob]], list[torch.Tensor]], *, max_batch: int = MAX_BATCH):
        self._run_group = run_group  # on the compute thread: the outputs of a group's steps, in order
        self.max_batch = max_batch
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="petals-compute")
        self._waiting: list[StepJob] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.stats = EngineStats()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    async def run(self, function, *args):
        """Run ``function(*args)`` on the compute thread (forward and backward requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, function, *args)

    async def submit(self, job: StepJob) -> torch.Tensor:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._serve())
        job.future = asyncio.get_running_loop().create_future()
        self._waiting.append(job)
        self._wake.set()
        return await job.future  # cancelled by a deadline: the engine skips the step if it has not started

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                jobs = [job for job in self._waiting if not job.future.done()]
                groups, self._waiting = plan(jobs, self.max_batch)
                for group in groups:
                    group = [job for job in group if not job.future.done()]
                    if group:
                        await self._compute_group(group)

    async def _compute_group(self, group: list[StepJob]) -> None:
        try:
            outputs = await self.run(self._run_group, group)
        except Exception as exc:  # noqa: BLE001 (every step of the group reports it; the handler describes it)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.stats.steps += len(group)
        self.stats.last_batch = len(group)
        self.stats.largest_batch = max(self.stats.largest_batch, len(group))
        if len(group) > 1:
            self.stats.batches += 1
            self.stats.batched_steps += len(group)
        for job, output in zip(group, outputs, strict=True):
            if not job.future.done():
                job.future.set_result(output)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._compute.shutdown(wait=False, cancel_futures=True)
