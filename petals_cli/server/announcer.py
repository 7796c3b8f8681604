"""A server's records in the DHT: announced every period and sooner when its free cache moves, re-joined when lost.

Records are re-announced every ``announce_period`` seconds, and sooner (at most once per ``REANNOUNCE_INTERVAL``)
when the cache tokens left have moved by more than ``REANNOUNCE_FRACTION`` of the budget since the last announce,
so that clients route new sessions by a current figure. The live load in the record (sessions, queue, recent step
time) triggers no announce of its own: clients read it fresh in the ``rpc_info`` answer to the pings they send every
snapshot refresh anyway, so that a busy swarm does not flood the DHT. Before announcing, an online server measures
its round trips to the servers holding its next block (published in its record for routing). Knows nothing about
compute or sessions: what to announce comes from the server's ``info()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from petals_cli.config import ServerConfig
from petals_cli.dht import announce_model, announce_server, fetch_snapshot, ping_server, rejoin
from petals_cli.server.cache import CacheBudget
from petals_cli.wire import ModelIndexEntry, ServerInfo, ServerState

logger = logging.getLogger(__name__)
# seconds between prompt re-announces when the budget moves: clients read every server's free cache live, in the
# answers to their pings, every snapshot refresh (5 s); at 1 s, 40 busy servers stored 40 records a second
REANNOUNCE_INTERVAL = 5.0
REANNOUNCE_FRACTION = 0.1  # of the cache budget: a smaller move waits for the periodic announce
MAX_PINGED = 8  # next-block servers pinged per announce
PING_TIMEOUT = 2.0


class Announcer:
    def __init__(
        self, config: ServerConfig, prefix: str, entry: ModelIndexEntry, budget: CacheBudget, swarm_key, wake
    ):
        self.config, self.prefix, self.entry, self.budget = config, prefix, entry, budget
        self.swarm_key = swarm_key
        self.wake: asyncio.Event = wake  # set on stop and whenever the budget changes: the loop re-checks
        self.pings: dict[str, float] = {}  # peer id of a server holding our next block -> round trip, seconds
        self._announced_at = float("-inf")  # event-loop time of the last announce
        self._announced_tokens_left = budget.total_tokens
        self._pinged_at = float("-inf")
        self._failed = False

    @property
    def expiration(self) -> float:
        return max(self.config.announce_period * 2.5, 10.0)

    async def announce(self, node, p2p, info: Callable[[], ServerInfo]) -> None:
        peer_id = p2p.peer_id.to_base58()
        now = asyncio.get_running_loop().time()
        current = info()
        if current.state == ServerState.ONLINE and now - self._pinged_at >= self.config.announce_period:
            self._pinged_at = now
            try:
                await self._ping_next_servers(node, p2p, current.end_block)
            except Exception:  # pings are advisory: never let them stop an announce
                logger.debug("pinging the next servers failed", exc_info=True)
            current = info()
        self._announced_at = asyncio.get_running_loop().time()
        self._announced_tokens_left = current.cache_tokens_left
        ok = await announce_server(node, self.prefix, peer_id, current, expiration=self.expiration)
        if current.state == ServerState.ONLINE:
            ok = await announce_model(node, self.prefix, peer_id, self.entry, expiration=self.expiration) and ok
        self._failed = not ok
        if not ok:
            logger.warning("some DHT records were not stored; will retry at the next announce")

    def announce_soon(self) -> None:
        """Announce at the loop's next turn rather than at the period's end (the record changed)."""
        self._announced_at = float("-inf")
        self.wake.set()

    async def until_stopped(self, node, p2p, info: Callable[[], ServerInfo], stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = self._announced_at + self.config.announce_period
            moved = abs(self.budget.tokens_left - self._announced_tokens_left)
            if moved > REANNOUNCE_FRACTION * self.budget.total_tokens:
                due = min(due, self._announced_at + REANNOUNCE_INTERVAL)
            if loop.time() < due:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=due - loop.time())
                continue
            try:
                await self.announce(node, p2p, info)
            except Exception:  # the DHT is unreachable: keep serving, retry at the next period
                logger.warning("announcing failed; serving on and retrying", exc_info=True)
                self._announced_at, self._failed = loop.time(), True
            # A node whose peers all left stores records only in itself, which nobody reads: find the swarm again.
            # Pinged every period anyway, a restarted bootstrap peer (which knows nobody) learns of this server,
            # so that clients joining through it find the swarm.
            alone = not node.protocol.routing_table.uid_to_peer_id
            if await rejoin(node, self.config.initial_peers) and (self._failed or alone):
                logger.info("reconnected to the swarm's DHT; announcing again")
                self._announced_at = float("-inf")

    async def _ping_next_servers(self, node, p2p, end: int) -> None:
        """Round trips to the servers holding block ``end`` (where this server's output goes next)."""
        if end >= self.entry.num_blocks:
            return
        snapshot = await fetch_snapshot(node, self.prefix, self.entry.num_blocks, first_found=True)  # advisory
        own = p2p.peer_id.to_base58()
        holders = snapshot.online().items()
        peers = [peer for peer, info in holders if peer != own and info.start_block <= end < info.end_block]
        peers = peers[:MAX_PINGED]
        rtts = await asyncio.gather(*(ping_server(p2p, peer, self.swarm_key, timeout=PING_TIMEOUT) for peer in peers))
        # unreachable servers are simply left out of the published pings
        self.pings = {peer: round(rtt, 6) for peer, rtt in zip(peers, rtts, strict=True) if rtt is not None}
