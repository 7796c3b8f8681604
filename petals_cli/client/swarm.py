"""A client's connection to the swarm: its own event loop thread, P2P daemon and DHT node.

The networking core is async; ``SwarmClient.run`` is the one bridge that sync callers (the model,
``generate()``, the CLI) use. The client keeps a snapshot of each model it uses, refreshed in the background
together with round-trip times to its servers, and a ban list of servers that failed; ``routing`` turns
them into routes. Each ping (an info RPC) also reads the server's live load, fresher than its DHT record, and
the client counts the sessions it routed through each server since that reading, so that sessions it starts in a
row do not all go to the server that looked idle a moment ago.
Sessions (``inference``) and remote forward/backward (``autograd``) are built on it; what
verification keeps per client lives in ``checks.Verifier``. Never imports server code.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import threading
import time
from collections.abc import Callable, Collection, Coroutine
from typing import Any, TypeVar

from hivemind.utils import get_dht_time

from petals_cli import daemon, moves, routing, security
from petals_cli.config import ClientConfig
from petals_cli.dht import fetch_snapshot, probe_server, rejoin, start_dht
from petals_cli.errors import NoRouteError, SwarmUnreachableError
from petals_cli.routing import BanList, RouteSpan
from petals_cli.wire import ServerInfo, SwarmSnapshot

logger = logging.getLogger(__name__)
T = TypeVar("T")
START_RETRY = 1.0  # seconds between tries to join a swarm whose initial peers do not answer
START_GRACE = 10.0  # beyond connect_timeout, for the last try to finish and say why it failed
LIVENESS_RTT_FACTOR = 3.0  # a liveness check waits at least this many typical round trips (see liveness_timeout)
PLACEMENTS_KEPT = 60.0  # seconds a placement is remembered (a server unread for that long is not routed through)
# servers one refresh pings: every one of a swarm this size or smaller; of a larger one, those this client routed
# sessions through, then those it never pinged or pinged longest ago (at 1,000 servers, pinging all of them every
# 5 s kept 1,000 RPCs in flight for each refresh; in turns, each is pinged every len / MAX_PINGS refreshes)
MAX_PINGS = 64


def require_initial_peers(config: ClientConfig) -> None:
    if not config.initial_peers:
        raise SwarmUnreachableError(
            "no initial peers: this client does not know any swarm",
            hint="pass --initial-peers MADDR (or set PETALS_INITIAL_PEERS); "
            "start a swarm with `petals serve MODEL --new-swarm --address-file swarm.addr`",
        )


class SwarmClient:
    """Owns the event loop thread, the P2P daemon and the DHT node of one client process."""

    def __init__(self, config: ClientConfig):
        require_initial_peers(config)
        self.config = config
        self.swarm_key = security.SwarmKey.from_file(config.swarm_key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="petals-client", daemon=True)
        self._thread.start()
        self.p2p = self.node = None
        self.bans = BanList()
        self._rng = random.Random()
        self.rtts: dict[str, float] = {}
        self.live: dict[str, tuple[float, ServerInfo]] = {}  # peer -> (when its info RPC was sent, what it answered)
        self._placed: dict[str, list[float]] = {}  # peer -> when this client routed a session through it (monotonic)
        self._silent: dict[str, float] = {}  # peer -> when its latest liveness check failed (unanswered since)
        self._pinged_at: dict[str, float] = {}  # peer -> when this client last sent it a liveness check (monotonic)
        self._snapshots: dict[str, tuple[float, SwarmSnapshot]] = {}
        self._reading: dict[str, asyncio.Future] = {}  # prefix -> the read (and pings) under way
        self._refreshers: dict[str, asyncio.Task] = {}
        # Told while route() waits for servers: (blocks still missing, seconds left), then ((), 0.0) when the wait
        # ends either way. Called on the client's loop thread; the CLI turns it into a spinner.
        self.on_route_wait: Callable[[tuple[int, ...], float], None] | None = None
        try:
            self.run(self._start(), timeout=config.connect_timeout + START_GRACE)
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        """Join the swarm, retrying for ``connect_timeout`` seconds while no initial peer answers (a bootstrap peer
        restarting, a network coming back), and saying so once."""
        deadline = time.monotonic() + self.config.connect_timeout
        peers, told = " ".join(self.config.initial_peers), False
        while True:
            try:
                return await self._join()
            except SwarmUnreachableError as error:
                seconds_left = deadline - time.monotonic()
                if seconds_left <= 0:
                    raise
                if not told:
                    logger.warning(
                        "waiting for the swarm: no initial peer answers (%s); retrying for %.0fs more "
                        "(PETALS_CONNECT_TIMEOUT sets how long)",
                        peers,
                        seconds_left,
                    )
                    told = True
                logger.debug("joining failed: %s", error)
                await asyncio.sleep(min(START_RETRY, seconds_left))

    async def _join(self) -> None:
        self.p2p = self.node = None
        try:
            p2p = await daemon.create_p2p(
                host=daemon.local_host_for(self.config.initial_peers),
                initial_peers=self.config.initial_peers,
                client_mode=True,
            )
        except Exception as exc:  # bad multiaddrs and unreachable peers both surface here
            peers = " ".join(self.config.initial_peers)
            raise SwarmUnreachableError(f"cannot reach initial peers {peers} ({exc})") from exc
        try:
            node = await start_dht(p2p, self.config.initial_peers, client_mode=True, swarm_key=self.swarm_key)
        except BaseException:
            await p2p.shutdown()
            raise
        self.p2p, self.node = p2p, node

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

    async def snapshot(self, prefix: str, num_blocks: int, *, max_age: float | None = None) -> SwarmSnapshot:
        """The swarm as last read (at most ``max_age`` seconds ago); starts background refreshing.

        By default a snapshot may be two refresh periods old: the background refresh keeps it younger, and reading
        the swarm here instead (DHT round trips, then pings that wait ``liveness_timeout`` for each dead server
        still announced) would stall the caller, typically a failover, for a second on a WAN."""
        max_age = 2 * self.config.snapshot_refresh if max_age is None else max_age
        read_at, snapshot = self._snapshots.get(prefix, (float("-inf"), None))
        if snapshot is None or time.monotonic() - read_at > max_age:
            snapshot = await self._fresh_snapshot(prefix, num_blocks)
        if prefix not in self._refreshers:
            self._refreshers[prefix] = asyncio.create_task(self._refresh_forever(prefix, num_blocks))
        return snapshot

    async def _refresh_forever(self, prefix: str, num_blocks: int) -> None:
        while True:
            try:
                await asyncio.sleep(self.config.snapshot_refresh)
                lost = not self.node.protocol.routing_table.uid_to_peer_id  # every DHT peer is gone (a partition)
                if lost and await rejoin(self.node, self.config.initial_peers):
                    logger.info("reconnected to the swarm's DHT through its initial peers")
                await self._fresh_snapshot(prefix, num_blocks)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed refresh keeps the old snapshot; the next one may work
                logger.debug("snapshot refresh failed", exc_info=True)
                await asyncio.sleep(self.config.snapshot_refresh)

    async def _fresh_snapshot(self, prefix: str, num_blocks: int) -> SwarmSnapshot:
        """Read the swarm and ping its servers (round trips for routing, and no route through a dead server). Whoever
        asks while a read of the same model is under way shares it: one client's 25 sessions waiting for a route,
        each re-reading every half second, pinged 40 servers 50 times a second on a machine already saturated."""
        task = self._reading.get(prefix)
        if task is None or task.done():
            task = self._reading[prefix] = asyncio.ensure_future(self._read_and_ping(prefix, num_blocks))
        return await asyncio.shield(task)

    async def _read_and_ping(self, prefix: str, num_blocks: int) -> SwarmSnapshot:
        snapshot = await self._read_snapshot(prefix, num_blocks)
        await self._ping_all(snapshot)
        return snapshot

    async def _read_snapshot(self, prefix: str, num_blocks: int) -> SwarmSnapshot:
        """Read the swarm now, keeping each server of the last snapshot that this read missed until its record
        expires (``SwarmSnapshot.merged_with``): on an overloaded machine or link, DHT lookups time out and come
        back with some servers or none (seen in the 40-server benchmark: hundreds of generations failed with "no
        server announces any block" or with blocks missing). The servers kept are pinged like any others, so dead
        ones are still left out."""
        _, last = self._snapshots.get(prefix, (float("-inf"), None))
        snapshot = (await fetch_snapshot(self.node, prefix, num_blocks)).merged_with(last, get_dht_time())
        self._snapshots[prefix] = (time.monotonic(), snapshot)
        return snapshot

    async def _ping(self, peer_id: str) -> bool:
        """Time an info RPC to ``peer_id``; False when it fails or takes longer than ``liveness_timeout``."""
        return self._record(peer_id, await self._rtt(peer_id))

    def liveness_timeout(self, peer_id: str) -> float:
        """How long a liveness check of ``peer_id`` waits: ``liveness_timeout``, or ``LIVENESS_RTT_FACTOR`` times
        the round trips this client measures (that server's, or the median of all, whichever is longer) when those
        are longer. On a quiet network a hung server is found within a second; on a saturated machine or link,
        where every round trip grows, a busy server is not taken for a dead one. (The 40-server benchmark, its 2
        cores at a load average of 60, had 1,489 failovers in 214 generations, nearly all failed checks of live
        servers, each replaying its session's history elsewhere.)"""
        rtts = list(self.rtts.values())
        typical = max(self.rtts.get(peer_id, 0.0), statistics.median(rtts) if rtts else 0.0)
        return max(self.config.liveness_timeout, LIVENESS_RTT_FACTOR * typical)

    async def _rtt(self, peer_id: str) -> float | None:
        sent = self._pinged_at[peer_id] = time.monotonic()
        timeout = self.liveness_timeout(peer_id)
        probe = await probe_server(self.p2p, peer_id, self.swarm_key, timeout=timeout)
        if probe is None:
            return None
        rtt, info = probe
        if info is not None:
            self.live[peer_id] = (sent, info)
        return rtt

    def placed(self) -> dict[str, int]:
        """Sessions this client routed through each server after it last read that server's load (counted by the
        server from then on). A session routed just before a reading but opened after it is missed until the
        next reading: an undercount for one refresh period, never a double count."""
        now, counts = time.monotonic(), {}
        for peer, times in list(self._placed.items()):
            read_at = self.live.get(peer, (float("-inf"), None))[0]
            times[:] = [moment for moment in times if moment > max(read_at, now - PLACEMENTS_KEPT)]
            if times:
                counts[peer] = len(times)
            else:
                del self._placed[peer]
        return counts

    def _place(self, route: list[RouteSpan]) -> None:
        now = time.monotonic()
        for span in route:
            self._placed.setdefault(span.peer_id, []).append(now)

    def _record(self, peer_id: str, rtt: float | None) -> bool:
        if rtt is None:  # dead, frozen or unreachable: no route through it until it answers again
            self.rtts[peer_id] = max(self.rtts.get(peer_id, 0.0), self.config.liveness_timeout)
            self._silent[peer_id] = time.monotonic()
            return False
        self._silent.pop(peer_id, None)
        self.rtts[peer_id] = rtt if peer_id not in self.rtts else 0.7 * self.rtts[peer_id] + 0.3 * rtt
        return True

    async def _ping_all(self, snapshot: SwarmSnapshot) -> None:
        """Ping the online servers of ``snapshot`` (all of them, up to ``MAX_PINGS``: see ``_to_ping``); ban those
        that do not answer (announced, most likely dead, their records not yet expired). When none of several
        answers, this client is the likely cause (its own link down, or its process starved of CPU past the timeout:
        seen in the soak with 30 processes on 2 cores, which banned the whole swarm at once), so nobody is banned or
        silenced for it."""
        peers = self._to_ping(list(snapshot.online()))
        rtts = await asyncio.gather(*(self._rtt(peer) for peer in peers))
        if len(peers) > 1 and all(rtt is None for rtt in rtts):
            logger.debug("none of %d servers answered a liveness check; blaming this client, not them", len(peers))
            return
        for peer, rtt in zip(peers, rtts, strict=True):
            if not self._record(peer, rtt) and peer not in self.bans.banned(time.monotonic()):
                self.ban(peer)

    def _to_ping(self, online: list[str]) -> list[str]:
        """Which of ``online`` one refresh pings: all of them, up to ``MAX_PINGS``; beyond, first the servers this
        client placed sessions on lately, then those never pinged or pinged longest ago (in a random order, so
        that clients spread their first pings over the swarm)."""
        if len(online) <= MAX_PINGS:
            return online
        return routing.servers_to_ping(online, self._placed, self._pinged_at, self._rng, MAX_PINGS)

    async def is_alive(self, peer_id: str) -> bool:
        return await self._ping(peer_id)

    def silent_since(self, peer_id: str) -> float | None:
        return self._silent.get(peer_id)

    async def route(
        self,
        prefix: str,
        num_blocks: int,
        start: int = 0,
        end: int | None = None,
        *,
        inference: bool = True,
        cache_tokens_needed: int = 0,
        wait: float | None = None,
        exclude: Collection[str] = (),
    ) -> list[RouteSpan]:
        """A route over [start, end) avoiding ``exclude``; waits up to ``wait`` (default ``route_wait``) seconds for
        missing blocks or bans to clear, then raises NoRouteError. A wait is reported to ``on_route_wait``."""
        deadline = time.monotonic() + (self.config.route_wait if wait is None else wait)
        max_age, waited = None, False
        while True:
            snapshot = await self.snapshot(prefix, num_blocks, max_age=max_age)
            banned = self._avoided(snapshot, exclude)
            try:
                if inference:
                    spans = routing.inference_route(
                        self._with_live_load(snapshot),
                        start,
                        end,
                        rtts=self.rtts,
                        banned=banned,
                        cache_tokens_needed=cache_tokens_needed,
                        adapter=self.config.active_adapter,
                        push=self.config.push,
                        rule=self.config.routing,
                        placed=self.placed(),
                        rng=self._rng,
                    )
                    self._place(spans)
                else:
                    spans = routing.training_route(
                        snapshot,
                        start,
                        end,
                        rtts=self.rtts,
                        banned=banned,
                        rng=self._rng,
                        adapter=self.config.active_adapter,
                    )
            except NoRouteError as error:
                if max_age != 0.0:  # servers may have joined since the last read: look again right away
                    max_age = 0.0
                    continue
                seconds_left = deadline - time.monotonic()
                if self.on_route_wait is not None and (waited or seconds_left > 0):
                    missing = error.missing_blocks or tuple(range(start, num_blocks if end is None else end))
                    self.on_route_wait(missing if seconds_left > 0 else (), max(0.0, seconds_left))
                    waited = seconds_left > 0
                if seconds_left <= 0:
                    raise
                await asyncio.sleep(min(0.5, seconds_left))
                continue
            if waited:
                self.on_route_wait((), 0.0)
            return spans

    async def faster_elsewhere(
        self, prefix: str, num_blocks: int, span: RouteSpan, *, cache_tokens_needed: int
    ) -> tuple[float, float] | None:
        """(expected seconds of a session's next step on ``span``'s server, on the best other route for those blocks)
        when the other route is expected to be more than ``moves.MOVE_FACTOR`` times and ``MOVE_MIN_GAIN`` seconds
        faster, by the servers' live load; None otherwise, when no other route exists, or when nothing is known of the
        server yet."""
        snapshot = await self.snapshot(prefix, num_blocks)
        if span.peer_id not in self.live:
            return None
        move = moves.faster_route(
            self._with_live_load(snapshot),
            span,
            rtts=self.rtts,
            banned=self._avoided(snapshot, (span.peer_id,)),
            cache_tokens_needed=cache_tokens_needed,
            adapter=self.config.active_adapter,
            placed=self.placed(),
        )
        return (move.staying, move.elsewhere) if move is not None else None

    def _avoided(self, snapshot: SwarmSnapshot, exclude: Collection[str] = ()) -> set[str]:
        """Servers no route may use now: banned, untrusted, silent, and ``exclude``."""
        untrusted = routing.untrusted(snapshot, self.config.allowed_servers, self.config.blocked_servers)
        return self.bans.banned(time.monotonic()) | untrusted | set(exclude) | self._silent.keys()

    def _with_live_load(self, snapshot: SwarmSnapshot) -> SwarmSnapshot:
        return routing.with_live_load(snapshot, {peer: info for peer, (_, info) in self.live.items()})

    def ban(self, peer_id: str) -> None:
        seconds = self.bans.ban(peer_id, time.monotonic())
        logger.debug("server %s failed; avoiding it for %.0fs", peer_id[-8:], seconds)  # the failover said why

    def ban_forever(self, peer_id: str) -> None:
        """Never route through ``peer_id`` again in this run (it was caught computing wrongly)."""
        self.bans.ban_forever(peer_id)

    def succeed(self, peer_id: str) -> None:
        self._silent.pop(peer_id, None)
        if peer_id in self.bans.failures:
            self.bans.succeed(peer_id)

    def stub(self, peer_id: str):
        return security.blocks_stub(self.p2p, peer_id, self.swarm_key)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown():
            for task in self._refreshers.values():
                task.cancel()
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
