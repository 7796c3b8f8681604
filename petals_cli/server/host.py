"""A server's lifecycle: load the span, join the swarm, serve RPCs, announce, and leave cleanly.

One process plus its libp2p daemon: the DHT node and the RPC handlers share the daemon and this process's
event loop; torch runs on the handler's compute thread. On SIGINT/SIGTERM the server announces OFFLINE,
removes its address file and exits. Its DHT records are kept by ``announcer.py``; its RPCs are answered by
``handler.py``; servers placed automatically choose and move their blocks here (``placement``, ``selection``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import signal
import time
from pathlib import Path

from hivemind.p2p import P2PDaemonError

from petals_cli import __version__, compat, daemon, reachability, security, transport
from petals_cli.checkpoint import resolve_model
from petals_cli.config import ServerConfig
from petals_cli.dht import fetch_snapshot, start_dht, unreachable_servers
from petals_cli.errors import ConfigError, SwarmUnreachableError
from petals_cli.families.selfcheck import check_span
from petals_cli.server import reach
from petals_cli.server.adapters import load_adapters
from petals_cli.server.announcer import PING_TIMEOUT, Announcer
from petals_cli.server.blocks import load_span, read_model_config, resolve_dtype
from petals_cli.server.cache import CacheBudget
from petals_cli.server.handler import BlockHandler
from petals_cli.server.placement import blocks_that_fit, choose_initial_span, parse_placement
from petals_cli.server.quant import check_quant
from petals_cli.server.selection import block_throughputs, confirm_move, rebalance
from petals_cli.server.throughput import Throughput, get_throughput, throughput_key
from petals_cli.server.validation import Limits
from petals_cli.wire import ModelIndexEntry, ServerInfo, ServerState, model_prefix_for

logger = logging.getLogger(__name__)
OFFLINE_GRACE = 2.0  # seconds to spend announcing OFFLINE on exit
JOIN_RETRY = 2.0  # seconds between tries to join a swarm whose initial peers do not answer


def run_server(config: ServerConfig) -> None:
    """Blocking entry point for `petals serve`."""
    asyncio.run(Server(config).serve())


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        compat.warn_if_untested()
        self.source = resolve_model(config.model, revision=config.revision or None, token=config.token or None)
        self.model = read_model_config(self.source)
        self.fixed_span, self.placement_count = parse_placement(config.blocks, self.model.num_blocks)
        if config.num_blocks:
            if self.fixed_span is not None:
                raise ConfigError(
                    "--num-blocks places the server itself; it cannot be combined with --blocks START:END"
                )
            self.placement_count = min(config.num_blocks, self.model.num_blocks)
        self.start, self.end = self.fixed_span or (0, 0)
        self.throughput: Throughput | None = None
        self.claimed_at = 0.0  # when placed automatically: the DHT time of its first claim (see placement)
        self.moving_to: tuple[int, ...] = ()  # (start, end) while loading the span it moves to
        self.last_move = -math.inf  # time.monotonic() of its last move
        self.prefix = config.model_prefix or model_prefix_for(config.model)
        self.dtype = resolve_dtype(config.dtype, self.model.config)
        check_quant(config.quant)
        self.state = ServerState.JOINING
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # set on stop and whenever the budget changes: the announce loop re-checks
        self.budget = CacheBudget(config.cache_tokens, on_change=self._wake.set)
        self.swarm_key = security.SwarmKey.from_file(config.swarm_key)
        entry = ModelIndexEntry(model=config.model, num_blocks=self.model.num_blocks, family=self.model.family.name)
        self.announcer = Announcer(config, self.prefix, entry, self.budget, self.swarm_key, self._wake)
        self.adapter_names: tuple[str, ...] = ()
        self.handler: BlockHandler | None = None
        self.relay_addresses: tuple[str, ...] = ()  # behind a NAT: the circuit addresses clients dial

    def info(self) -> ServerInfo:
        return ServerInfo(
            state=self.state,
            start_block=self.start,
            end_block=self.end,
            version=__version__,
            dtype=str(self.dtype).replace("torch.", ""),
            quantization=self.config.quant,
            cache_tokens_left=self.budget.tokens_left,
            public_name=self.config.public_name,
            throughput=self.throughput.effective if self.throughput else 0.0,
            inference_rps=self.throughput.inference_rps if self.throughput else 0.0,
            forward_rps=self.throughput.forward_rps if self.throughput else 0.0,
            pings=dict(self.announcer.pings),
            adapters=self.adapter_names,
            claimed_at=self.claimed_at,
            moving_to=self.moving_to,
            sessions_per_peer=self.config.max_sessions_per_peer,
            relay_addresses=self.relay_addresses,
            **self._engine_figures(),
        )

    def _engine_figures(self) -> dict[str, int | float | bool]:
        if self.handler is None:  # not serving yet
            return {}
        engine = self.handler.engine
        stats = engine.stats
        speeds = (self.throughput.inference_rps, self.throughput.forward_rps) if self.throughput else ()
        seconds_per_token = (self.end - self.start) / min(speeds) if speeds and min(speeds) > 0 else 0.0
        return dict(
            batch_size=stats.last_batch,
            queue_length=engine.queue_length,
            largest_batch=stats.largest_batch,
            compute_stalled=engine.stalled(seconds_per_token),
            sessions=len(self.handler.sessions),
            step_seconds=round(stats.step_seconds, 6),
            batch_capacity=engine.max_batch,
        )

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._request_stop)
        identity = security.Identity.load_or_create(self.config.identity_path or None)
        try:
            p2p, node = await self._join(identity)
        finally:
            identity.discard_file()
        handler, rebalancing, watching = None, None, None
        try:
            if self.fixed_span is None:  # its claim announced it JOINING
                self.start, self.end = await self._choose_blocks(node, p2p)
            else:  # JOINING: servers choosing blocks now see this span taken
                await self.announcer.announce(node, p2p, self.info)
            span, adapters = await self._load(self.start, self.end)
            handler = self.handler = self._make_handler(span, adapters, p2p)
            service = handler if self.swarm_key is None else security.GatedService(handler, self.swarm_key)
            frame = self.config.max_request_mib * 2**20 + transport.FRAME_OVERHEAD
            await transport.BlocksService().add_p2p_handlers(p2p, wrapper=service, max_frame_bytes=frame)
            self.state = ServerState.ONLINE
            await self.announcer.announce(node, p2p, self.info)
            maddrs = await reach.visible_addresses(p2p)
            self._write_address_file(maddrs)
            logger.info("serving blocks %d:%d of %s as %s", self.start, self.end, self.prefix, p2p.peer_id)
            for maddr in maddrs:
                print(maddr, flush=True)
            if self.fixed_span is None and self.config.balance_period > 0:
                rebalancing = asyncio.create_task(self._rebalance_forever(node, p2p, handler))
            if self.relay_addresses:
                watching = asyncio.create_task(reach.watch(p2p, self.relay_addresses, self._relayed_through))
            await self.announcer.until_stopped(node, p2p, self.info, self._stop)
            self.state = ServerState.OFFLINE
            await asyncio.wait_for(self.announcer.announce(node, p2p, self.info), timeout=OFFLINE_GRACE)
        except TimeoutError:
            logger.warning("could not announce OFFLINE in time; records will expire by themselves")
        finally:
            for task in (rebalancing, watching):
                if task is not None:
                    task.cancel()
            self._remove_address_file()
            if handler is not None:
                handler.shutdown()
            await p2p.shutdown()
        logger.info("server stopped")

    def _relayed_through(self, addresses: tuple[str, ...]) -> None:
        self.relay_addresses = addresses
        self.announcer.announce_soon()

    async def _join(self, identity: security.Identity):
        """The libp2p daemon and the DHT node. While no initial peer answers (a bootstrap peer restarting, a network
        coming back) it tries again every few seconds for ``join_timeout`` seconds, saying so once."""
        deadline, told = time.monotonic() + self.config.join_timeout, False
        while True:
            try:
                return await self._join_once(identity)
            except SwarmUnreachableError:
                seconds_left = deadline - time.monotonic()
                if seconds_left <= 0 or self._stop.is_set():
                    raise
                if not told:
                    logger.warning(
                        "waiting for the swarm: no initial peer answers (%s); retrying for %.0fs more "
                        "(PETALS_JOIN_TIMEOUT sets how long)",
                        " ".join(self.config.initial_peers),
                        seconds_left,
                    )
                    told = True
                await asyncio.sleep(min(JOIN_RETRY, seconds_left))

    async def _join_once(self, identity: security.Identity):
        p2p = await self._start_p2p(identity)
        try:
            check = not daemon.is_loopback(self.config.host) and not self.config.announce_host
            p2p, self.relay_addresses = await reach.reach(
                p2p, self.config.initial_peers, lambda relays: self._start_p2p(identity, relays), check=check
            )
            node = await start_dht(
                p2p,
                self.config.initial_peers,
                client_mode=bool(self.relay_addresses),  # nobody could dial it to ask it for records
                swarm_key=self.swarm_key,
                identity=identity,
            )
            if not self.relay_addresses:
                await reachability.serve_dial_back(p2p)
        except BaseException:
            await p2p.shutdown()
            raise
        return p2p, node

    async def _start_p2p(self, identity: security.Identity, relays: list[str] | None = None):
        try:
            return await daemon.create_p2p(
                self.config.host,
                self.config.port,
                self.config.initial_peers,
                announce_host=self.config.announce_host or None,
                identity_path=identity.path,
                fresh_identity=identity.temporary or bool(relays),  # restarted behind relays: still its own key
                relays=relays or (),
            )
        except P2PDaemonError as exc:  # the daemon itself refuses to start when it reaches no bootstrap peer
            if "bootstrap" not in str(exc):
                raise
            peers = " ".join(self.config.initial_peers)
            raise SwarmUnreachableError(f"cannot reach initial peers {peers} ({exc})") from exc

    async def _choose_blocks(self, node, p2p) -> tuple[int, int]:
        length = self.placement_count or blocks_that_fit(
            self.model.config,
            self.model.num_blocks,
            self.dtype,
            self.config.device,
            self.config.cache_tokens,
            self.config.quant,
        )

        async def claim(span: tuple[int, int], claimed_at: float) -> None:
            (self.start, self.end), self.claimed_at = span, claimed_at
            await self.announcer.announce(node, p2p, self.info)

        own = p2p.peer_id.to_base58()
        return await choose_initial_span(
            lambda: self._read_swarm(node, p2p), claim, length, own=own, max_delay=self.config.placement_delay
        )

    def _make_handler(self, span, adapters, p2p) -> BlockHandler:
        limits = Limits(
            max_session_length=self.config.max_session_length,
            max_request_bytes=self.config.max_request_mib * 2**20,
            max_sessions_per_peer=self.config.max_sessions_per_peer,
            step_timeout=self.config.step_timeout,
            max_kept_graph_bytes=self.config.kept_graphs_mib * 2**20,
        )
        return BlockHandler(
            span,
            self.prefix,
            self.budget,
            limits=limits,
            alloc_timeout=self.config.alloc_timeout,
            session_idle_timeout=self.config.session_idle_timeout,
            info=self.info,
            adapters=adapters,
            connect=lambda peer: security.blocks_stub(p2p, peer, self.swarm_key),
        )

    async def _load(self, start: int, end: int):
        """Load blocks [start, end) and their part of the adapters off the event loop, and know (measure once,
        then cache) their speed."""
        started = time.perf_counter()
        span = await asyncio.to_thread(
            load_span,
            self.source,
            self.model,
            start,
            end,
            device=self.config.device,
            dtype=self.dtype,
            quant=self.config.quant,
        )
        error = await asyncio.to_thread(check_span, span, quantized=self.config.quant != "none")
        logger.info("self-check of blocks %d:%d passed (largest relative error %.2g)", start, end, error)
        adapters = await asyncio.to_thread(load_adapters, span, self.config.adapters)
        self.adapter_names = adapters.names
        logger.info("blocks %d:%d of %s loaded in %.1fs", start, end, self.prefix, time.perf_counter() - started)
        if self.throughput is None:
            key = throughput_key(self.prefix, self.config.device, self.dtype, self.config.quant)
            self.throughput = await asyncio.to_thread(get_throughput, span, key, network_rps=self.config.network_rps)
        return span, adapters

    async def _rebalance_forever(self, node, p2p, handler: BlockHandler) -> None:
        """Check every ``balance_period`` (jittered) whether moving would strengthen the swarm's weakest blocks, and
        move when ``selection.confirm_move`` says so."""
        own = p2p.peer_id.to_base58()
        pending: tuple[int, int] | None = None
        told = None
        while True:
            await asyncio.sleep(self.config.balance_period * random.uniform(0.8, 1.2))
            try:
                snapshot = await self._read_swarm(node, p2p)
                decision = rebalance(
                    snapshot,
                    own,
                    (self.start, self.end),
                    self.throughput.effective,
                    balance_quality=self.config.balance_quality,
                )
                if not decision.move:
                    told = self._tell_staying(decision, told)
                since = time.monotonic() - self.last_move
                move, wanted = confirm_move(decision, pending, since, self.config.balance_period)
                if wanted is not None and wanted != pending:
                    logger.info("blocks %d:%d look better for the swarm; checking again before moving", *wanted)
                pending = wanted
                if move:
                    await self._move(node, p2p, handler, decision)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed check is retried at the next period
                self.moving_to = ()
                logger.warning("rebalancing check failed", exc_info=True)

    def _tell_staying(self, decision, told):
        """Say once (per candidate span) that a move would help the swarm too little to be worth it."""
        old, new = decision.weakest_change
        below = old < new <= old * (1 + self.config.balance_quality)  # not a move held back by a gap it would open
        if decision.new_span == (self.start, self.end) or not below or told == decision.new_span:
            return told
        logger.info(
            "staying on blocks %d:%d: moving to %d:%d would strengthen the weakest blocks it changes by %.0f%% only "
            "(less than --balance-quality %.0f%%)",
            self.start,
            self.end,
            *decision.new_span,
            100 * (new / old - 1),
            100 * self.config.balance_quality,
        )
        return decision.new_span

    async def _move(self, node, p2p, handler: BlockHandler, decision) -> None:
        """Announce the move (others now count this server on its new span), load the new blocks while still
        serving the old ones, check that leaving still opens no gap (another server may have left meanwhile), then
        switch and re-announce both spans."""
        new_start, new_end = decision.new_span
        logger.info(
            "moving from blocks %d:%d to %d:%d (weakest blocks it changes: %.1f -> %.1f)",
            self.start,
            self.end,
            new_start,
            new_end,
            *decision.weakest_change,
        )
        self.moving_to = (new_start, new_end)
        await self.announcer.announce(node, p2p, self.info)
        span, adapters = await self._load(new_start, new_end)
        others = block_throughputs(await self._read_swarm(node, p2p))
        orphans = [
            index for index in range(self.start, self.end) if others[index] <= 0 and not new_start <= index < new_end
        ]
        if orphans:
            logger.info("not moving: nobody else holds block %d now (another server left meanwhile)", orphans[0])
            self.moving_to = ()
            await self.announcer.announce(node, p2p, self.info)
            return
        handler.replace_span(span, adapters)
        self.start, self.end, self.moving_to = new_start, new_end, ()
        self.last_move = time.monotonic()
        await self.announcer.announce(node, p2p, self.info)  # its one record: the new span replaces the old

    def _request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _read_swarm(self, node, p2p):
        """The swarm's servers of this model, less those that announce themselves online but do not answer
        (killed ones, until their records expire): placement and rebalancing must not count them."""
        snapshot = await fetch_snapshot(node, self.prefix, self.model.num_blocks)
        own = p2p.peer_id.to_base58()
        silent = await unreachable_servers(p2p, snapshot, self.swarm_key, timeout=PING_TIMEOUT, own=own)
        if silent:
            logger.info("leaving out %d announced server(s) that do not answer", len(silent))
        return snapshot.without(silent | {own})

    def _write_address_file(self, maddrs: list[str]) -> None:
        if not self.config.address_file:
            return
        path = Path(self.config.address_file)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(f"{maddr}\n" for maddr in maddrs))
        os.replace(temporary, path)

    def _remove_address_file(self) -> None:
        if self.config.address_file:
            Path(self.config.address_file).unlink(missing_ok=True)
