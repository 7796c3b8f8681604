"""The swarm as the web pages show it: read in the background at a fixed period, never on a page load.

``SwarmMonitor`` owns one reading loop on the web server's event loop. Each reading is a ``SwarmStatus`` from a
``StatusFeed`` (which never raises for network trouble: a failed reading is a status with an ``error``). The pages
only read ``view()``: the last good reading, with the latest failure beside it, so a swarm that stops answering
keeps its last known map on screen, marked stale. With ``idle_after`` set (`petals api`, whose page is a side
feature), the loop starts on the first visit and ends after that many seconds without one, so an API server nobody
looks at does not ping the swarm; `petals swarm web` reads from start to exit. This module knows no HTML.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from petals_cli.swarm import SwarmStatus

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MonitorView:
    """What a page shows: ``status`` is the last good reading (None before the first); ``error`` is the latest
    reading's failure, if it failed (then ``status`` is older than ``checked_at``)."""

    status: SwarmStatus | None
    error: str
    checked_at: float  # Unix time of the latest reading attempt that finished (0: none yet)
    period: float

    @property
    def stale(self) -> bool:
        return bool(self.error) and self.status is not None

    def state_json(self) -> dict:
        """`swarm status --json`'s document of the last good reading; ``error`` set when the latest one failed."""
        status = self.status or SwarmStatus(taken_at=0.0, error="the swarm has not been read yet")
        if self.error:
            status = dataclasses.replace(status, error=self.error)
        return status.to_json()


class SwarmMonitor:
    """Calls ``read`` every ``period`` seconds in a task of the running event loop and keeps what it returned."""

    def __init__(
        self,
        read: Callable[[], Awaitable[SwarmStatus]],
        *,
        period: float,
        idle_after: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.read, self.period, self.idle_after, self.clock = read, period, idle_after, clock
        self._good: SwarmStatus | None = None
        self._error = ""
        self._checked_at = 0.0
        self._visited_at = clock()
        self._task: asyncio.Task | None = None

    def view(self) -> MonitorView:
        return MonitorView(self._good, self._error, self._checked_at, self.period)

    def visit(self) -> None:
        """A page was served: keep reading (start again if the loop ended for lack of visitors)."""
        self._visited_at = self.clock()
        self.start()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="petals-swarm-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while self.idle_after is None or self.clock() - self._visited_at < self.idle_after:
            try:
                status = await self.read()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a feed reports its failures as statuses; anything else is shown too
                logger.exception("reading the swarm failed")
                status = SwarmStatus(taken_at=self.clock(), error=f"{type(error).__name__}: {error}")
            self._checked_at = self.clock()
            if status.error:
                self._error = status.error
            else:
                self._good, self._error = status, ""
            await asyncio.sleep(self.period)
