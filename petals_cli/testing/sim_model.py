"""The swarm simulator's data: what to simulate (``ServerSpec``, ``ClientSpec``, ``Scenario``, ``Policy``), a
simulated server's state (``SimServer``, its waiting ``Job``s) and what a run gathered (``Generation``, ``SimRun``).
The event loop is ``simswarm.Sim``; clients and sessions are ``sim_clients``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from petals_cli.config import ServerConfig
from petals_cli.routing import RouteSpan
from petals_cli.testing.paced import DeviceModel
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot

PREFIX = "sim-model"
VERSION = "sim"
DETECT_SECONDS = 0.05  # beyond one round trip: how long a client takes to see that a server's stream broke
PLACED_KEPT = 60.0  # as client/swarm.py: seconds a placement is remembered
SESSIONS_PER_PEER = ServerConfig.max_sessions_per_peer  # `petals serve --max-sessions-per-peer`'s default
BACKGROUND_SLICE = 0.01  # seconds of CPU per slice of background work


# --- what to simulate -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: str
    device: DeviceModel
    blocks: int  # how many blocks it holds (placed by the swarm, as `--blocks N`)
    region: str = "local"
    start_at: float = 0.0  # when `petals serve` starts
    stop_at: float | None = None  # when it stops (announcing OFFLINE) or crashes (saying nothing)
    crash: bool = True
    cache_tokens: int = 16384
    load_seconds: float = 1.0  # loading its blocks (at start and when it moves)
    fixed_span: tuple[int, int] | None = None  # `--blocks START:END`: placed by hand, never moves
    tamper: float = 0.0  # a liar: each step it computes is wrong with this probability (testing/tamper.py's)


@dataclass(frozen=True)
class ClientSpec:
    name: str
    region: str = "local"
    sessions: int = 1  # sessions generating back to back from ``start_at`` (the scale benchmark's clients)
    start_at: float = 0.0
    arrivals_per_s: float = 0.0  # or: generations arriving at this Poisson rate, each its own session
    think_s: float = 0.0  # a session's pause between its generations (exponential with this mean; 0: none)
    ramp_s: float = 0.0  # its sessions start at random over this many seconds (0: all at ``start_at``)


@dataclass(frozen=True)
class Scenario:
    num_blocks: int
    servers: tuple[ServerSpec, ...]
    clients: tuple[ClientSpec, ...]
    duration: float
    rtt: dict[tuple[str, str], float] = field(default_factory=dict)  # (region, region) -> seconds; default 0
    prompt_tokens: int = 8
    new_tokens: int = 32
    hop_seconds: float = 0.0  # fixed cost of one RPC hop (serialising, the daemons, the event loops)
    client_seconds: float = 0.0  # the client's own work per token (head, sampling, the next step's start)
    call_seconds: float = 0.0  # a server's own work per compute call beyond its device model
    step_bytes: int = 0  # bytes of one token's hidden states between hops
    uplink_bps: float = 0.0  # each server's and client's uplink (0: no bandwidth limit)
    announce_period: float = 30.0
    record_ttl: float = 75.0  # announcer.expiration: 2.5 announce periods
    snapshot_refresh: float = 5.0
    balance_period: float = 60.0
    balance_quality: float = 0.15
    max_start_delay: float = 1.0
    check_rate: float = 0.0  # verification: the fraction of steps re-run on another replica
    live_every: float = 0.0  # >0: servers' live figures are read at most this often, shared by every client
    # One machine running the whole swarm (the scale benchmark): its cores shared by every process's own work.
    cores: int = 0  # 0: every process has its own machine
    client_cpu_s: float = 0.0  # per token, a client process's own work (and its daemon's)
    server_cpu_s: float = 0.0  # per token of a step a server receives, its own work (and its daemon's)
    background_cpu: float = 0.0  # cores' worth of other processes' work

    def round_trip(self, a: str, b: str) -> float:
        if a == b:
            return self.rtt.get((a, b), 0.0)
        return self.rtt.get((a, b), self.rtt.get((b, a), 0.0))


RouteRule = Callable[..., list[RouteSpan]]


@dataclass(frozen=True)
class Policy:
    """A client's and a server's rules. ``route`` has ``routing.inference_route``'s keyword arguments;
    ``move`` returns the span a server moves to now (or None) given (server, snapshot, simulated now)."""

    name: str
    route: RouteRule
    live_load: bool = True  # pings read the servers' live load (ours); else routes see announced figures only
    move_check_steps: int = 0  # mid-session: every N steps, leave a span whose server got much slower
    ban_seconds: float = 1.0  # BanList's base
    move: Callable[[SimServer, SwarmSnapshot, float], tuple[int, int] | None] | None = None
    announce_period: float = 0.0  # servers re-announce this often (0: the scenario's)


# --- the simulated swarm --------------------------------------------------------------------------------------


class Job:
    """One step of one session waiting at a server, shaped for ``engine.plan`` (batchable, group_key, peer)."""

    __slots__ = ("peer", "blocks", "tokens", "batchable", "group_key", "on_done", "sent")

    def __init__(self, peer: str, blocks: tuple[int, int], tokens: int, on_done: Callable[[], None]):
        self.peer, self.blocks, self.tokens, self.on_done = peer, blocks, tokens, on_done
        self.batchable = tokens == 1
        self.group_key = blocks


class SimServer:
    def __init__(self, spec: ServerSpec, number: int):
        self.spec, self.name, self.peer_id = spec, spec.name, f"sim-{number:05d}-{spec.name}"
        self.device = spec.device
        self.throughput = spec.device.inference_rps()
        self.span: tuple[int, int] = (0, 0)
        self.state = ServerState.OFFLINE
        self.alive = False
        self.waiting: list[Job] = []
        self.busy = False
        self.round: list[list[Job]] = []
        self.open: dict[tuple[str, int], int] = {}  # (client, session) -> cache tokens reserved
        self.per_client: dict[str, int] = {}  # client -> its sessions open here (the server caps them)
        self.cache_left = spec.cache_tokens
        self.step_seconds = 0.0
        self.last_batch = 0
        self.claimed_at = 0.0
        self.moving_to: tuple[int, ...] = ()
        self.last_move = -math.inf
        self.pending: tuple[int, int] | None = None
        self.busy_seconds = 0.0
        self.steps = 0
        self.calls = 0
        self.largest_batch = 0
        self.pings: dict[str, float] = {}
        self._live: tuple[float, ServerInfo] | None = None

    def info(self) -> ServerInfo:
        return ServerInfo(
            state=self.state,
            start_block=self.span[0],
            end_block=self.span[1],
            version=VERSION,
            cache_tokens_left=self.cache_left,
            throughput=self.throughput,
            inference_rps=self.throughput,
            forward_rps=self.throughput,
            pings=dict(self.pings),
            batch_size=self.last_batch,
            queue_length=len(self.waiting),
            sessions=len(self.open),
            step_seconds=round(self.step_seconds, 6),
            batch_capacity=self.device.batch_capacity,
            claimed_at=self.claimed_at,
            moving_to=self.moving_to,
            sessions_per_peer=SESSIONS_PER_PEER,
        )

    def live(self, now: float, every: float) -> ServerInfo:
        """What an rpc_info answers now (shared for ``every`` seconds when the scenario says so)."""
        if every <= 0 or self._live is None or now - self._live[0] >= every:
            self._live = (now, self.info())
        return self._live[1]


@dataclass
class Generation:
    client: str
    session: int
    started: float
    route: list[tuple[str, int, int]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    failovers: int = 0
    moves: int = 0
    error: str = ""


@dataclass
class SimRun:
    """What a simulation gathered (``sim_report`` makes figures of it)."""

    scenario: Scenario
    policy: str
    seed: int
    generations: list[Generation] = field(default_factory=list)
    decisions: list[float] = field(default_factory=list)  # wall seconds of each route decision (the real code)
    spans: list[tuple[float, dict[str, tuple[int, int, str]]]] = field(default_factory=list)  # coverage samples
    moves: list[tuple[float, str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    utilisation: dict[str, float] = field(default_factory=dict)  # server -> busy fraction while alive
    devices: dict[str, DeviceModel] = field(default_factory=dict)
    stopped: dict[str, float] = field(default_factory=dict)  # server -> when it left or crashed
    checks: int = 0
    refusals: int = 0  # sessions a server refused for want of cache room
    liars: list[tuple[int, int | None]] = field(default_factory=list)  # per session and liar: steps served, caught at
    steps: int = 0  # steps the servers computed, and in how many calls (the rest were batched together)
    calls: int = 0
    wall_seconds: float = 0.0
    events: int = 0
