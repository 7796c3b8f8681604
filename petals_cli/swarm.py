"""What the swarm looks like right now: models, block coverage and servers, as plain dataclasses.

``swarm_status`` reads the DHT model index and each model's block records through a ``SwarmClient``, pings
the servers it finds (their answers carry their live load: sessions, queue, recent step time, which replace the
DHT's older figures), counts the reports against each server in this machine's evidence log
(``petals_cli.evidence``), and aggregates everything into a ``SwarmStatus`` (``to_json`` is the documented
``petals swarm status --json`` schema). ``StatusFeed`` turns that into a live stream for ``swarm top``: it
owns its client, yields a status every ``interval`` seconds, and reports failures as a status with an
``error`` instead of raising. Rendering belongs to the CLI and the TUI; this module only reads. Every string
another peer announced reaches them one line long, bounded, with control characters made visible
(``textsafe.shown``); it may still look like markup, which each renderer escapes.
Heavy modules (hivemind, the client) are imported inside functions so the TUI can load these types cheaply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from petals_cli.errors import ModelNotServedError, SwarmUnreachableError
from petals_cli.multiaddrs import is_relayed, relay_of
from petals_cli.routing import with_live_load
from petals_cli.textsafe import shown
from petals_cli.wire import ModelIndexEntry, ServerInfo, ServerState, SwarmSnapshot, model_prefix_for

SCHEMA_VERSION = 1
DIRECT, RELAYED, UNKNOWN = "direct", "relayed", "unknown"
UNREACHABLE = "unreachable"  # a server state that only readers assign: its records say online, it did not answer
# A status pings its servers this many at a time, for this long in all: at 1,000 announced servers that had died,
# pinging all at once waited for 1,000 timeouts together. Servers not asked in time show as announced (no rtt).
STATUS_PINGS_AT_ONCE = 1024
STATUS_PING_SECONDS = 3.0
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerStatus:
    """One server of one model, as announced, plus what this client measured itself."""

    peer_id: str
    public_name: str
    start_block: int
    end_block: int
    state: str  # "online", "joining", "offline", or "unreachable" (announced online, did not answer this reader)
    throughput: float
    inference_rps: float
    forward_rps: float
    cache_tokens_left: int
    dtype: str
    quantization: str
    version: str
    protocol: int
    adapters: tuple[str, ...]
    connection: str  # how this client reaches it: "direct", "relayed" or "unknown" (not connected)
    pings: dict[str, float]  # peer id of a server holding its next block -> round trip it published, seconds
    rtt: float | None  # this client's own round trip to it, seconds; None when not measured
    batch_size: int = 0  # sessions in its last step, as announced (more than 1: batched)
    queue_length: int = 0  # steps waiting for its compute thread, as announced
    largest_batch: int = 0
    sessions: int = 0  # inference sessions open on it (live: read from its answer to this client's ping)
    step_seconds: float = 0.0  # its recent one-token step time through its span under its load (live)
    batch_capacity: int = 0  # the most sessions one of its steps runs together (0: not announced)
    flagged: int = 0  # validly signed reports of tampering against it in this machine's evidence log
    relays: tuple[str, ...] = ()  # behind a NAT: peer ids of the relays it announces it is dialled through

    @property
    def short_id(self) -> str:
        return short_peer_id(self.peer_id)

    @property
    def precision(self) -> str:
        """Its dtype, with the quantisation when it has one: "float16" or "float16/nf4"."""
        return self.dtype if self.quantization == "none" else f"{self.dtype}/{self.quantization}"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adapters"], out["relays"] = list(self.adapters), list(self.relays)
        return out


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """One model of the model index: which blocks are covered, and by whom."""

    prefix: str
    model: str
    family: str
    num_blocks: int
    coverage: tuple[int, ...]  # per block: how many ONLINE servers that answered hold it
    servers: tuple[ServerStatus, ...]

    @property
    def missing_blocks(self) -> tuple[int, ...]:
        return tuple(index for index, count in enumerate(self.coverage) if count == 0)

    @property
    def healthy(self) -> bool:
        return self.num_blocks > 0 and not self.missing_blocks

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "model": self.model,
            "family": self.family,
            "num_blocks": self.num_blocks,
            "healthy": self.healthy,
            "missing_blocks": list(self.missing_blocks),
            "coverage": list(self.coverage),
            "servers": [server.to_json() for server in self.servers],
        }


@dataclasses.dataclass(frozen=True)
class SwarmStatus:
    """Every model in the swarm at ``taken_at`` (Unix time); ``error`` is set when the swarm could not be read."""

    models: tuple[ModelStatus, ...] = ()
    taken_at: float = 0.0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "taken_at": self.taken_at,
            "error": self.error or None,
            "models": [model.to_json() for model in self.models],
        }


def short_peer_id(peer_id: str) -> str:
    return f"…{peer_id[-8:]}" if len(peer_id) > 8 else peer_id


def block_ranges(indices: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """Sorted block indices as [start, end) ranges: (2, 3, 4, 7) -> [(2, 5), (7, 8)]."""
    ranges: list[tuple[int, int]] = []
    for index in sorted(indices):
        if ranges and ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], index + 1)
        else:
            ranges.append((index, index + 1))
    return ranges


def format_ranges(indices: tuple[int, ...] | list[int]) -> str:
    return ", ".join(f"{start}:{end}" for start, end in block_ranges(indices))


def connection_kind(addresses: list[str] | None, relay_addresses: tuple[str, ...] = ()) -> str:
    """Direct or relayed, from the multiaddrs of this client's connections to a peer; when not connected, relayed
    if the peer announces relayed addresses (nobody can dial it otherwise), else unknown."""
    if not addresses:
        return UNKNOWN if not relay_addresses else RELAYED
    return RELAYED if all(is_relayed(address) for address in addresses) else DIRECT


def model_status(
    entry: ModelIndexEntry,
    snapshot: SwarmSnapshot,
    *,
    rtts: dict[str, float] | None = None,
    connections: dict[str, list[str]] | None = None,
    unreachable: set[str] | frozenset[str] = frozenset(),
    flagged: dict[str, int] | None = None,
) -> ModelStatus:
    """Pure aggregation of one model's snapshot (and this client's measurements) into a ``ModelStatus``.
    Servers in ``unreachable`` (announced online, but they did not answer) are shown so and cover no blocks;
    ``flagged`` counts the reports of tampering against each peer."""
    rtts, connections, flagged = rtts or {}, connections or {}, flagged or {}
    servers = tuple(
        _server_status(peer, info, rtts.get(peer), connections.get(peer), peer in unreachable, flagged.get(peer, 0))
        for peer, info in sorted(snapshot.servers.items(), key=lambda item: (item[1].start_block, item[0]))
    )
    return ModelStatus(
        prefix=shown(snapshot.prefix),
        model=shown(entry.model),
        family=shown(entry.family),
        num_blocks=snapshot.num_blocks,
        coverage=tuple(snapshot.without(unreachable).block_coverage()),
        servers=servers,
    )


def _server_status(
    peer: str, info: ServerInfo, rtt: float | None, addresses: list[str] | None, unreachable: bool, flagged: int
) -> ServerStatus:
    state = info.state.name.lower()
    return ServerStatus(
        peer_id=peer,
        public_name=shown(info.public_name),
        start_block=info.start_block,
        end_block=info.end_block,
        state=UNREACHABLE if unreachable and info.state == ServerState.ONLINE else state,
        throughput=info.throughput,
        inference_rps=info.inference_rps,
        forward_rps=info.forward_rps,
        cache_tokens_left=info.cache_tokens_left,
        dtype=shown(info.dtype),
        quantization=shown(info.quantization),
        version=shown(info.version),
        protocol=info.protocol,
        adapters=tuple(shown(adapter) for adapter in info.adapters),
        connection=connection_kind(addresses, info.relay_addresses),
        pings={shown(str(key)): float(value) for key, value in info.pings.items() if isinstance(value, (int, float))},
        rtt=rtt,
        batch_size=info.batch_size,
        queue_length=info.queue_length,
        largest_batch=info.largest_batch,
        sessions=info.sessions,
        step_seconds=info.step_seconds,
        batch_capacity=info.batch_capacity,
        flagged=flagged,
        relays=tuple(dict.fromkeys(shown(relay_of(address)) for address in info.relay_addresses)),
    )


async def collect_status(client, model_prefix: str | None = None) -> SwarmStatus:
    """Read the swarm through ``client`` (runs on the client's event loop). ``model_prefix`` may also be a model
    path or repo id; a model that is not in the index raises ``ModelNotServedError``."""
    from petals_cli.dht import fetch_model_index, fetch_snapshot

    index = await fetch_model_index(client.node)
    if model_prefix is not None:
        prefix = model_prefix if model_prefix in index else model_prefix_for(model_prefix)
        if prefix not in index:
            raise ModelNotServedError(f"no server in the swarm announces model {model_prefix!r}")
        index = {prefix: index[prefix]}
    snapshots = await asyncio.gather(*(fetch_snapshot(client.node, p, e.num_blocks) for p, e in index.items()))
    peers = {
        peer for snapshot in snapshots for peer, info in snapshot.servers.items() if info.state != ServerState.OFFLINE
    }
    answered = await ping_within(client.is_alive, peers, at_once=STATUS_PINGS_AT_ONCE, seconds=STATUS_PING_SECONDS)
    if len(answered) < len(peers):
        logger.info(
            "asked %d of %d servers within %gs; the others show as announced",
            len(answered),
            len(peers),
            STATUS_PING_SECONDS,
        )
    rtts = {peer: client.rtts[peer] for peer, alive in answered.items() if alive and peer in client.rtts}
    live = {peer: client.live[peer][1] for peer, alive in answered.items() if alive and peer in client.live}
    snapshots = [with_live_load(snapshot, live) for snapshot in snapshots]  # load as the pings just read it
    silent = {peer for peer, alive in answered.items() if not alive}
    connections: dict[str, list[str]] = {}
    for peer_info in await client.p2p.list_peers():
        connections.setdefault(peer_info.peer_id.to_base58(), []).extend(str(addr) for addr in peer_info.addrs)
    if not index and not connections:
        raise SwarmUnreachableError("no swarm peer is connected, so the DHT cannot be read")
    flags = await asyncio.to_thread(read_flags, [snapshot.prefix for snapshot in snapshots])
    models = tuple(
        model_status(
            index[snapshot.prefix],
            snapshot,
            rtts=rtts,
            connections=connections,
            unreachable=silent,
            flagged=flags.get(snapshot.prefix),
        )
        for snapshot in snapshots
    )
    return SwarmStatus(models=models, taken_at=time.time())


async def ping_within(
    ping: Callable[[str], Awaitable[bool]], peers: Collection[str], *, at_once: int, seconds: float
) -> dict[str, bool]:
    """``ping`` each of ``peers`` (in a random order), ``at_once`` at a time, for ``seconds`` in all: peer -> whether
    it answered, for those whose ping ended in time (a ping cut short by the deadline leaves its peer out)."""
    answered: dict[str, bool] = {}
    queue = iter(random.sample(list(peers), len(peers)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker() -> None:
        # the deadline is checked here too: a hivemind call can swallow the cancellation meant to stop its worker
        for peer in queue:
            if loop.time() >= deadline:
                return
            answered[peer] = await ping(peer)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(at_once, len(peers)))]
    if workers:
        _, late = await asyncio.wait(workers, timeout=seconds)
        for task in late:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return answered


def read_flags(prefixes: list[str]) -> dict[str, dict[str, int]]:
    """Model prefix -> peer id -> signed reports against it in the evidence log; none when the log is unreadable
    (the status still shows the swarm)."""
    from petals_cli import evidence

    try:
        by_model = evidence.flagged_by_model()  # one read of the log, whatever the number of models
        return {prefix: by_model.get(prefix, {}) for prefix in prefixes}
    except OSError as error:
        logger.warning("cannot read the evidence log %s: %s", evidence.default_log_path(), error)
        return {}


def swarm_status(client, model_prefix: str | None = None, *, timeout: float = 30.0) -> SwarmStatus:
    """The sync facade of ``collect_status``."""
    return client.run(collect_status(client, model_prefix), timeout=timeout)


def read_swarm_status(config, model_prefix: str | None = None) -> SwarmStatus:
    """Join the swarm with ``config`` (a ``ClientConfig``), read its status once, and leave."""
    from petals_cli.client import SwarmClient

    client = SwarmClient(config)
    try:
        return swarm_status(client, model_prefix)
    finally:
        client.close()


class StatusFeed:
    """A live stream of ``SwarmStatus`` for ``swarm top``; never raises for network trouble.

    ``stream()`` yields a status at once and then every ``interval`` seconds; each call starts a new stream
    (that is how the TUI refreshes now) over the same client. The client is created on first use, in a thread,
    and re-created after the swarm turns out unreachable. ``close()`` releases it. Given an open ``client`` (one
    that `petals api` already has), the feed reads through it and never closes or replaces it.
    """

    def __init__(
        self,
        config,
        *,
        model_prefix: str | None = None,
        interval: float = 2.0,
        timeout: float = 30.0,
        client_factory: Callable[[Any], Any] | None = None,
        client=None,
    ):
        self.config, self.model_prefix, self.interval, self.timeout = config, model_prefix, interval, timeout
        self._client_factory = client_factory
        self._client, self._shared = client, client is not None
        self._lock = threading.Lock()
        self._closed = False

    async def stream(self) -> AsyncIterator[SwarmStatus]:
        while True:
            yield await self.read()
            await asyncio.sleep(self.interval)

    async def read(self) -> SwarmStatus:
        try:
            client = await asyncio.to_thread(self._connected_client)
            future = asyncio.run_coroutine_threadsafe(collect_status(client, self.model_prefix), client.loop)
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # reported to the user in the status; the next read tries again
            if isinstance(error, SwarmUnreachableError | TimeoutError):
                self._drop_client()
            return SwarmStatus(taken_at=time.time(), error=self._describe(error))

    def _connected_client(self):
        with self._lock:
            if self._closed:
                raise SwarmUnreachableError("the status feed is closed")
            if self._client is None:
                if self._client_factory is None:
                    from petals_cli.client import SwarmClient

                    self._client_factory = SwarmClient
                self._client = self._client_factory(self.config)
            return self._client

    def _drop_client(self) -> None:
        if self._shared:
            return
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            threading.Thread(target=client.close, name="petals-feed-close", daemon=True).start()

    def _describe(self, error: Exception) -> str:
        if isinstance(error, TimeoutError):
            return f"swarm unreachable: no answer within {self.timeout:g}s"
        if isinstance(error, SwarmUnreachableError):
            return f"swarm unreachable: {error}"
        return str(error) or type(error).__name__

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None and not self._shared:
            client.close()
