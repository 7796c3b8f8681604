"""A client's connection to the swarm: its own event loop thread, P2P daemon and DHT node.

The networking core is async; ``SwarmClient.run`` is the one bridge that sync callers (the model,
``generate()``, the CLI) use. Snapshots are read here and handed to ``routing``; sessions and remote
forward/backward live in ``session.py``. Never imports server code.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from petals_cli import transport
from petals_cli.config import ClientConfig
from petals_cli.dht import fetch_snapshot, start_dht
from petals_cli.errors import NoRouteError, SwarmUnreachableError
from petals_cli.routing import RouteSpan, fewest_hops_route
from petals_cli.wire import SwarmSnapshot

logger = logging.getLogger(__name__)
T = TypeVar("T")


class SwarmClient:
    """Owns the event loop thread, the P2P daemon and the DHT node of one client process."""

    def __init__(self, config: ClientConfig):
        if not config.initial_peers:
            raise SwarmUnreachableError(
                "no initial peers: this client does not know any swarm",
                hint="pass --initial-peers MADDR (or set PETALS_INITIAL_PEERS); "
                "start a swarm with `petals serve MODEL --new-swarm --address-file swarm.addr`",
            )
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="petals-client", daemon=True)
        self._thread.start()
        self.p2p = self.node = None
        try:
            self.run(self._start(), timeout=config.connect_timeout)
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        try:
            self.p2p = await transport.create_p2p(
                host=transport.local_host_for(self.config.initial_peers),
                initial_peers=self.config.initial_peers,
                client_mode=True,
            )
        except Exception as exc:  # bad multiaddrs and unreachable peers both surface here
            raise SwarmUnreachableError(
                f"cannot reach initial peers {' '.join(self.config.initial_peers)} ({exc})"
            ) from exc
        self.node = await start_dht(self.p2p, self.config.initial_peers, client_mode=True)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the client's loop and wait for its result (the sync facade)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise
        except BaseException:
            future.cancel()
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def snapshot(self, prefix: str, num_blocks: int) -> SwarmSnapshot:
        return await fetch_snapshot(self.node, prefix, num_blocks)

    async def route(self, prefix: str, num_blocks: int, start: int = 0, end: int | None = None) -> list[RouteSpan]:
        """A route over [start, end); waits up to ``route_wait`` seconds for missing blocks to appear."""
        deadline = time.monotonic() + self.config.route_wait
        while True:
            snapshot = await self.snapshot(prefix, num_blocks)
            try:
                return fewest_hops_route(snapshot, start, end)
            except NoRouteError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def stub(self, peer_id: str):
        return transport.BlocksService.get_stub(self.p2p, transport.peer_id_from_string(peer_id))

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown():
            if self.node is not None:
                await self.node.shutdown()
            if self.p2p is not None:
                await self.p2p.shutdown()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            except Exception:  # shutting down: nothing useful to do with a failure here
                logger.debug("client shutdown failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()
