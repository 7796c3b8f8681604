"""A discrete-event swarm simulator that makes every decision with the product's own code.

    Sim(scenario, policy, seed).run() -> SimRun        (figures: ``testing/sim_report.py``)

What is simulated: servers (a ``paced.DeviceModel`` each: one batched call over ``blocks`` blocks and ``tokens``
tokens takes ``seconds(blocks, tokens)``; steps wait in a queue and are grouped by ``engine.plan``, the step engine's
own pure planner; attention-cache room by tokens), a network (round trips between regions, the uplink's time per
step's bytes, a fixed cost per RPC hop), a DHT (records that servers announce every period and that expire),
servers joining, leaving and crashing over time, and clients whose sessions generate one token after another.

What is not: the decisions. Each is the call the real client or server makes, on a ``SwarmSnapshot`` built here,
with the simulated time and a seeded ``random.Random`` passed in (those modules are pure for this reason):

- a session's route: the policy's route function (ours: ``routing.inference_route`` with the load rule, the
  client's placements and live load as ``routing.with_live_load`` makes them; its wall time is measured);
- leaving a slow server mid-session: ``routing.staying_seconds``, ``inference_route``, ``route_seconds``,
  ``worth_moving``;
- failed servers: ``routing.BanList``;
- where a server joins: ``placement.choose_initial_span`` itself, run as a coroutine whose sleeps are simulated;
- whether it moves: ``selection.rebalance`` and ``selection.confirm_move`` (or the policy's own rule);
- verification: each step is re-run on another replica with the client's check rate, and
  ``verify.checks_needed`` says how many steps a liar survives.

A policy (``Policy``) bundles the client's and the server's rules, so that other rules (``testing/petals_rules.py``:
the original Petals' published ones) run in the same swarm with the same seed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from petals_cli import routing
from petals_cli.client.swarm import MAX_PINGS
from petals_cli.config import ServerConfig
from petals_cli.errors import NoRouteError, PetalsError
from petals_cli.routing import BanList, RouteSpan
from petals_cli.server import placement
from petals_cli.server.engine import STEP_SMOOTHING, plan
from petals_cli.server.selection import block_throughputs
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


class Sim:
    def __init__(self, scenario: Scenario, policy: Policy, seed: int = 0, sample_every: float = 2.0):
        self.scenario, self.seed, self.policy = scenario, seed, policy
        self.rng = random.Random(seed)
        self.now = 0.0
        self._queue: list = []
        self._order = itertools.count()
        self.servers = {spec.name: SimServer(spec, number) for number, spec in enumerate(scenario.servers)}
        self.by_peer = {server.peer_id: server for server in self.servers.values()}
        self.records: dict[str, tuple[ServerInfo, float]] = {}  # the DHT: peer id -> (record, expires)
        self._snapshot: SwarmSnapshot | None = None
        self.clients = {spec.name: SimClient(self, spec) for spec in scenario.clients}
        self.run_data = SimRun(scenario, self.policy.name, seed)
        self.run_data.devices = {name: server.device for name, server in self.servers.items()}
        self.sample_every = sample_every
        self._started: dict[str, float] = {}
        self.cpu = Cpu(self, scenario.cores)
        self.announce_period = policy.announce_period or scenario.announce_period

    # --- the event loop ---

    def at(self, when: float, action: Callable, *args) -> None:
        heapq.heappush(self._queue, (when, next(self._order), action, args))

    def after(self, delay: float, action: Callable, *args) -> None:
        self.at(self.now + max(0.0, delay), action, *args)

    def run(self) -> SimRun:
        started = time.perf_counter()
        for server in self.servers.values():
            self.at(server.spec.start_at, self._start_server, server)
            if server.spec.stop_at is not None:
                self.at(server.spec.stop_at, self._stop_server, server)
        for client in self.clients.values():
            self.at(client.spec.start_at, client.start)
        self.at(0.0, self._sample)
        if self.scenario.cores and self.scenario.background_cpu > 0:
            self.at(0.0, self._background)
        events = 0
        while self._queue and self._queue[0][0] <= self.scenario.duration:
            when, _, action, args = heapq.heappop(self._queue)
            self.now = when
            action(*args)
            events += 1
        self.now = self.scenario.duration
        for server in self.servers.values():
            alive_for = (self.run_data.stopped.get(server.name, self.now)) - self._started.get(server.name, self.now)
            if alive_for > 0:
                self.run_data.utilisation[server.name] = server.busy_seconds / alive_for
        for client in self.clients.values():
            client.finish()
        self.run_data.steps = sum(server.steps for server in self.servers.values())
        self.run_data.calls = sum(server.calls for server in self.servers.values())
        self.run_data.wall_seconds, self.run_data.events = time.perf_counter() - started, events
        return self.run_data

    def _background(self) -> None:
        """Work of processes outside the model (the bootstrap peer, a monitor): ``background_cpu`` of a core."""
        self.cpu.run(BACKGROUND_SLICE, lambda: None)
        self.after(BACKGROUND_SLICE / self.scenario.background_cpu, self._background)

    def _sample(self) -> None:
        spans = {
            server.name: (*server.span, server.state.name.lower())
            for server in self.servers.values()
            if server.alive and server.state in (ServerState.ONLINE, ServerState.JOINING)
        }
        self.run_data.spans.append((self.now, spans))
        self.after(self.sample_every, self._sample)

    # --- the DHT ---

    def announce(self, server: SimServer) -> None:
        self.records[server.peer_id] = (server.info(), self.now + self.scenario.record_ttl)
        self._snapshot = None

    def snapshot(self) -> SwarmSnapshot:
        """The swarm as a DHT read returns it now: every unexpired record."""
        if self._snapshot is not None and all(expires > self.now for _, expires in self.records.values()):
            return self._snapshot
        self.records = {peer: record for peer, record in self.records.items() if record[1] > self.now}
        self._snapshot = SwarmSnapshot(
            PREFIX,
            self.scenario.num_blocks,
            {peer: info for peer, (info, _) in self.records.items()},
            taken_at=self.now,
            expires={peer: expires for peer, (_, expires) in self.records.items()},
        )
        return self._snapshot

    def answering(self, own: str = "") -> SwarmSnapshot:
        """What a server's ``_read_swarm`` sees: the records less itself and servers that do not answer."""
        snapshot = self.snapshot()
        silent = {peer for peer in snapshot.servers if peer == own or not self.by_peer[peer].alive}
        return snapshot.without(silent) if silent else snapshot

    # --- servers: joining, serving, moving, leaving ---

    def _start_server(self, server: SimServer) -> None:
        server.alive = True
        self._started[server.name] = self.now
        if server.spec.fixed_span is not None:
            self.after(server.spec.load_seconds, self._online, server, server.spec.fixed_span)
            return

        async def read_swarm():
            return self.answering(server.peer_id)

        async def claim(span, claimed_at):
            server.span, server.claimed_at, server.state = span, claimed_at, ServerState.JOINING
            self.announce(server)

        chooser = placement.choose_initial_span(
            read_swarm,
            claim,
            server.spec.blocks,
            own=server.peer_id,
            max_delay=self.scenario.max_start_delay,
            sleep=_SimSleep,
            clock=lambda: self.now,
            dht_time=lambda: self.now,
            delay=self.rng.uniform(0, self.scenario.max_start_delay),
        )
        self._drive(server, chooser)

    def _drive(self, server: SimServer, chooser) -> None:
        """Run ``choose_initial_span`` until its next sleep (scheduled in simulated time) or its end."""
        if not server.alive:
            chooser.close()
            return
        try:
            pause = chooser.send(None)
        except StopIteration as done:
            self.after(server.spec.load_seconds, self._online, server, done.value)
            return
        self.after(pause.seconds, self._drive, server, chooser)

    def _online(self, server: SimServer, span: tuple[int, int]) -> None:
        if not server.alive:
            return
        server.span, server.state, server.claimed_at = span, ServerState.ONLINE, 0.0
        self.announce(server)
        self.after(self.announce_period, self._reannounce, server)
        if server.spec.fixed_span is None and self.policy.move is not None and self.scenario.balance_period > 0:
            self.after(self.scenario.balance_period * self.rng.uniform(0.8, 1.2), self._check_balance, server)

    def _reannounce(self, server: SimServer) -> None:
        if server.alive and server.state == ServerState.ONLINE:
            server.pings = self._pings(server)
            self.announce(server)
            self.after(self.announce_period, self._reannounce, server)

    def _pings(self, server: SimServer) -> dict[str, float]:
        """The round trips to servers holding its next block (announcer._ping_next_servers)."""
        end = server.span[1]
        if end >= self.scenario.num_blocks:
            return {}
        region = server.spec.region
        return {
            peer: self.scenario.round_trip(region, other.spec.region) + 2 * self.scenario.hop_seconds
            for peer, (info, _) in self.records.items()
            if info.start_block <= end < info.end_block and (other := self.by_peer[peer]).alive
        }

    def _check_balance(self, server: SimServer) -> None:
        if not server.alive or server.state != ServerState.ONLINE:
            return
        self.after(self.scenario.balance_period * self.rng.uniform(0.8, 1.2), self._check_balance, server)
        if server.moving_to:
            return
        target = self.policy.move(server, self.answering(server.peer_id), self.now)
        if target is not None and target != server.span:
            server.moving_to = target
            self.announce(server)
            blocks = target[1] - target[0]
            self.after(server.spec.load_seconds * blocks / max(1, server.spec.blocks), self._finish_move, server)

    def _finish_move(self, server: SimServer) -> None:
        """As host._move: after loading, leave only if nobody's block is orphaned by it."""
        if not server.alive:
            return
        target, server.moving_to = tuple(server.moving_to), ()
        others = block_throughputs(self.answering(server.peer_id))
        start, end = server.span
        if any(others[index] <= 0 and not target[0] <= index < target[1] for index in range(start, end)):
            self.announce(server)
            return
        self.run_data.moves.append((self.now, server.name, server.span, target))
        server.span, server.last_move = target, self.now
        self.announce(server)

    def _stop_server(self, server: SimServer) -> None:
        if not server.alive:
            return
        server.alive = False
        self.run_data.stopped[server.name] = self.now
        if server.spec.crash:
            return  # its record stands until it expires; clients find out by failing steps and pings
        server.state = ServerState.OFFLINE
        self.announce(server)

    def kill(self, name: str) -> None:
        self._stop_server(self.servers[name])

    # --- serving steps ---

    def submit(self, server: SimServer, job: Job, on_failed: Callable[[], None]) -> None:
        """A step arrives at ``server``: its own work on the machine's CPU (when shared), then the engine's queue."""
        if self.scenario.cores and server.alive:
            self.cpu.run(self.scenario.server_cpu_s * job.tokens, lambda: self._enqueue(server, job, on_failed))
        else:
            self._enqueue(server, job, on_failed)

    def _enqueue(self, server: SimServer, job: Job, on_failed: Callable[[], None]) -> None:
        if not server.alive:
            self.after(DETECT_SECONDS, on_failed)
            return
        job.sent = on_failed
        server.waiting.append(job)
        if not server.busy:
            self._next_round(server)

    def _next_round(self, server: SimServer) -> None:
        """As the engine's _run_waiting_steps: plan what waits now; one-token batches first."""
        groups, server.waiting = plan(server.waiting, server.device.batch_capacity)
        groups.sort(key=lambda group: not group[0].batchable)
        server.round, server.busy = groups, bool(groups)
        if groups:
            self._run_group(server)

    def _run_group(self, server: SimServer) -> None:
        group = server.round[0]
        blocks = group[0].blocks[1] - group[0].blocks[0]
        seconds = server.device.seconds(blocks, sum(job.tokens for job in group)) + self.scenario.call_seconds
        server.busy_seconds += seconds
        self.after(seconds, self._group_done, server, seconds)

    def _group_done(self, server: SimServer, seconds: float) -> None:
        if not server.alive:
            for group in server.round:
                for job in group:
                    self.after(DETECT_SECONDS, job.sent)
            for job in server.waiting:
                self.after(DETECT_SECONDS, job.sent)
            server.round, server.waiting, server.busy = [], [], False
            return
        group = server.round.pop(0)
        server.steps += len(group)
        server.calls += 1
        server.last_batch = len(group)
        server.largest_batch = max(server.largest_batch, len(group))
        if group[0].batchable:
            previous = server.step_seconds
            server.step_seconds = seconds if previous == 0 else previous + STEP_SMOOTHING * (seconds - previous)
        for job in group:
            job.on_done()
        if server.round:
            self._run_group(server)
        else:
            self._next_round(server)

    def open_session(self, server: SimServer, key: tuple[str, int], tokens: int) -> None:
        if key not in server.open:
            server.open[key] = tokens
            server.cache_left -= tokens
            server.per_client[key[0]] = server.per_client.get(key[0], 0) + 1

    def close_session(self, server: SimServer, key: tuple[str, int]) -> None:
        tokens = server.open.pop(key, None)
        if tokens is not None:
            server.cache_left += tokens
            server.per_client[key[0]] -= 1

    def refuses(self, server: SimServer, client: str, tokens: int) -> bool:
        """Whether ``server`` refuses one more session of ``client``: no cache room, or the client's cap reached."""
        return server.cache_left < tokens or server.per_client.get(client, 0) >= SESSIONS_PER_PEER

    def latency(self, a: str, b: str, tokens: int) -> float:
        """One way from region ``a`` to ``b`` for a step of ``tokens`` tokens."""
        scenario = self.scenario
        wire = scenario.step_bytes * tokens * 8 / scenario.uplink_bps if scenario.uplink_bps > 0 else 0.0
        return scenario.round_trip(a, b) / 2 + scenario.hop_seconds + wire


class Cpu:
    """The cores of one machine shared by every simulated process's own work, first come first served."""

    def __init__(self, sim: Sim, cores: int):
        self.sim, self.free, self.waiting = sim, cores, deque()

    def run(self, seconds: float, then: Callable[[], None]) -> None:
        if seconds <= 0:
            then()
        elif self.free > 0:
            self.free -= 1
            self.sim.after(seconds, self._done, then)
        else:
            self.waiting.append((seconds, then))

    def _done(self, then: Callable[[], None]) -> None:
        if self.waiting:
            seconds, following = self.waiting.popleft()
            self.sim.after(seconds, self._done, following)
        else:
            self.free += 1
        then()


class _SimSleep:
    """What the simulated ``sleep`` hands to ``Sim._drive``: yielded by the coroutine, resumed in simulated time."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __await__(self):
        yield self


class SimClient:
    """One client process: a snapshot refreshed with pings every ``snapshot_refresh``, a ban list, its placements,
    and sessions generating."""

    def __init__(self, sim: Sim, spec: ClientSpec):
        self.sim, self.spec, self.name = sim, spec, spec.name
        self.rng = random.Random(f"{sim.seed}/{spec.name}")
        self.bans = BanList(base_seconds=sim.policy.ban_seconds)
        self.rtts: dict[str, float] = {}
        self.live: dict[str, tuple[float, ServerInfo]] = {}
        self.silent: set[str] = set()
        self.pinged_at: dict[str, float] = {}
        self.placed: dict[str, list[float]] = {}
        self.view: SwarmSnapshot | None = None
        self.sessions = itertools.count()
        self.active: list[Session] = []

    def start(self) -> None:
        self.refresh()
        for _ in range(self.spec.sessions):
            session = Session(self, next(self.sessions), repeat=True)
            self.sim.after(self.rng.uniform(0, self.spec.ramp_s), session.begin)
        if self.spec.arrivals_per_s > 0:
            self._arrive()

    def _arrive(self) -> None:
        Session(self, next(self.sessions), repeat=False).begin()
        self.sim.after(self.rng.expovariate(self.spec.arrivals_per_s), self._arrive)

    def refresh(self, again: bool = True) -> None:
        """Read the DHT and ping its online servers as the client does (``routing.servers_to_ping``: all of them up
        to ``MAX_PINGS``): live load and round trips; no answer: silent and banned."""
        sim = self.sim
        snapshot = sim.snapshot()
        every = sim.scenario.live_every
        for peer in routing.servers_to_ping(list(snapshot.online()), self.placed, self.pinged_at, self.rng, MAX_PINGS):
            self.pinged_at[peer] = sim.now
            server = sim.by_peer[peer]
            if server.alive:
                rtt = sim.scenario.round_trip(self.spec.region, server.spec.region) + 2 * sim.scenario.hop_seconds
                self.rtts[peer] = rtt if peer not in self.rtts else 0.7 * self.rtts[peer] + 0.3 * rtt
                self.silent.discard(peer)
                if sim.policy.live_load:
                    info, yours = server.live(sim.now, every), server.per_client.get(self.name, 0)
                    self.live[peer] = (sim.now, replace(info, your_sessions=yours) if yours else info)
            elif peer not in self.silent:
                self.silent.add(peer)
                self.bans.ban(peer, sim.now)
        live = {peer: info for peer, (_, info) in self.live.items()}
        self.view = routing.with_live_load(snapshot, live) if live else snapshot
        if again:
            self.sim.after(sim.scenario.snapshot_refresh, self.refresh)

    def placed_counts(self) -> dict[str, int]:
        now, counts = self.sim.now, {}
        for peer, times in list(self.placed.items()):
            read_at = self.live.get(peer, (-math.inf, None))[0]
            times[:] = [moment for moment in times if moment > max(read_at, now - PLACED_KEPT)]
            if times:
                counts[peer] = len(times)
            else:
                del self.placed[peer]
        return counts

    def avoided(self, exclude=()) -> set[str]:
        return self.bans.banned(self.sim.now) | self.silent | set(exclude)

    def route(self, start: int, end: int, cache_tokens: int, exclude=()) -> list[RouteSpan]:
        """The policy's route over [start, end), timed (the decision alone, as scale_client times it)."""
        if self.view is None or not self.view.servers:  # nothing read yet: read now, as route() does on a miss
            self.refresh(again=False)
        began = time.perf_counter()
        try:
            spans = self.sim.policy.route(
                self.view,
                start,
                end,
                rtts=self.rtts,
                banned=self.avoided(exclude),
                cache_tokens_needed=cache_tokens,
                placed=self.placed_counts(),
                rng=self.rng,
            )
        finally:
            self.sim.run_data.decisions.append(time.perf_counter() - began)
        for span in spans:
            self.placed.setdefault(span.peer_id, []).append(self.sim.now)
        return spans

    def finish(self) -> None:
        """The end of the simulation: every generation in progress is recorded as far as it got."""
        for session in list(self.active):  # end() removes the session from the list
            session.end("")


class Session:
    """One generation after another (``repeat``) or one: route, prompt, tokens, failover, mid-session moves."""

    def __init__(self, client: SimClient, number: int, *, repeat: bool):
        self.client, self.sim, self.number, self.repeat = client, client.sim, number, repeat
        self.route: list[RouteSpan] = []
        self.record: Generation | None = None
        self.position = 0
        self.steps_to_check = client.sim.policy.move_check_steps
        self.step_id = 0
        self.liars: dict[str, tuple[int, bool]] = {}  # peer -> (steps it served this session, lied since checked)

    @property
    def key(self) -> tuple[str, int]:
        return (self.client.name, self.number)

    @property
    def max_length(self) -> int:
        return self.sim.scenario.prompt_tokens + self.sim.scenario.new_tokens

    def begin(self) -> None:
        self.record = Generation(self.client.name, self.number, self.sim.now)
        self.position = 0
        self.client.active.append(self)
        self._route_then(0, self._send_first)

    def _route_then(self, start: int, then: Callable[[], None], waited: float = 0.0) -> None:
        try:
            spans = self.client.route(start, self.sim.scenario.num_blocks, self.max_length)
        except PetalsError as error:
            if waited >= 60.0:
                self.end(type(error).__name__)
                return
            self.sim.after(0.5, self._route_then, start, then, waited + 0.5)
            return
        full = [span for span in spans if self.sim.refuses(self.sim.by_peer[span.peer_id], self.client.name,
                                                             self.max_length)]  # fmt: skip
        if full:  # the server refuses the session (cache room, its cap per peer): a failed opening, routed around
            for span in full:
                self.client.bans.ban(span.peer_id, self.sim.now)
            self.sim.run_data.refusals += len(full)
            self.sim.after(DETECT_SECONDS, self._route_then, start, then, waited)
            return
        self.route = [span for span in self.route if span.end <= start] + spans
        for span in spans:
            self.sim.open_session(self.sim.by_peer[span.peer_id], self.key, self.max_length)
        self.record.route = [[span.peer_id, span.start, span.end] for span in self.route]
        then()

    def _send_first(self) -> None:
        self._step(self.sim.scenario.prompt_tokens)

    def _step(self, tokens: int, replay_from: int | None = None) -> None:
        """Send a step of ``tokens`` through the route, pushed from server to server; spans from ``replay_from`` on
        first recompute every earlier token (their caches are new)."""
        self.step_id += 1
        self._hop(0, self.client.spec.region, tokens, replay_from, self.step_id)

    def _hop(self, index: int, came_from: str, tokens: int, replay_from: int | None, step_id: int) -> None:
        sim = self.sim
        if step_id != self.step_id:
            return
        if index == len(self.route):
            delay = sim.latency(came_from, self.client.spec.region, tokens) + sim.scenario.client_seconds
            sim.after(delay, self._client_work, tokens, step_id)
            return
        span = self.route[index]
        server = sim.by_peer[span.peer_id]
        work = tokens + (self.position if replay_from is not None and span.start >= replay_from else 0)
        job = Job(
            self.client.name, (span.start, span.end), work, lambda: self._computed(index, tokens, replay_from, step_id)
        )
        arrive = sim.latency(came_from, server.spec.region, work)
        sim.after(arrive, sim.submit, server, job, lambda: self._failed(index, tokens, step_id))

    def _client_work(self, tokens: int, step_id: int) -> None:
        if self.sim.scenario.cores:
            self.sim.cpu.run(self.sim.scenario.client_cpu_s, lambda: self._token(tokens, step_id))
        else:
            self._token(tokens, step_id)

    def _computed(self, index: int, tokens: int, replay_from: int | None, step_id: int) -> None:
        span = self.route[index]
        server = self.sim.by_peer[span.peer_id]
        if server.spec.tamper > 0:  # what a liar served since this session last checked it
            served, wrong = self.liars.get(span.peer_id, (0, False))
            self.liars[span.peer_id] = (served + 1, wrong or self.sim.rng.random() < server.spec.tamper)
        checked = self.sim.scenario.check_rate > 0 and self.client.rng.random() < self.sim.scenario.check_rate
        if checked and self._check(span, tokens):
            self._failed(index, tokens, step_id)  # outvoted: banned for good, its span routed anew
            return
        self._hop(index + 1, server.spec.region, tokens, replay_from, step_id)

    def _check(self, span: RouteSpan, tokens: int) -> bool:
        """Verification: the step re-run on another replica of the span, which catches up on every step since the
        last check (as the client's checks do): True when the server lied in any of them (it is then banned for
        good, as a verdict does). The replica's work is the load the check adds."""
        self.sim.run_data.checks += 1
        served, wrong = self.liars.get(span.peer_id, (0, False))
        try:
            spans = self.client.route(span.start, span.end, self.max_length, exclude=(span.peer_id,))
        except PetalsError:
            return False
        if wrong:
            self.client.bans.ban_forever(span.peer_id)
            self.sim.run_data.liars.append((served, served))
            del self.liars[span.peer_id]
        for replica in spans:
            server = self.sim.by_peer[replica.peer_id]
            self.sim.submit(
                server, Job(self.client.name, (replica.start, replica.end), tokens, lambda: None), lambda: None
            )
        return wrong

    def _failed(self, index: int, tokens: int, step_id: int) -> None:
        if step_id != self.step_id or self.record is None:
            return
        failed = self.route[index]
        self.client.bans.ban(failed.peer_id, self.sim.now)
        self.record.failovers += 1
        self.step_id += 1
        for span in self.route[index:]:
            self.sim.close_session(self.sim.by_peer[span.peer_id], self.key)
        self.route = self.route[:index]
        self._route_then(failed.start, lambda: self._step(tokens, replay_from=failed.start))

    def _token(self, tokens: int, step_id: int) -> None:
        if step_id != self.step_id or self.record is None:
            return
        for span in self.route:
            if span.peer_id in self.client.bans.failures:
                self.client.bans.succeed(span.peer_id)
        self.position += tokens
        self.record.times.append(self.sim.now)
        if len(self.record.times) >= self.sim.scenario.new_tokens:
            self.end("")
            return
        if self.steps_to_check > 0:
            self.steps_to_check -= 1
            if self.steps_to_check == 0:
                self.steps_to_check = self.sim.policy.move_check_steps
                if self._move_slow_span():
                    return
        self._step(1)

    def _move_slow_span(self) -> bool:
        """As the client's move check: the first span whose server is now much slower than another route there
        moves (its cache rebuilt from this session's tokens)."""
        client = self.client
        view = client.view
        for index, span in enumerate(self.route):
            info = view.servers.get(span.peer_id) if view is not None else None
            if info is None or span.peer_id not in client.live:
                continue
            staying = routing.staying_seconds(info, span, client.rtts.get(span.peer_id, routing.DEFAULT_RTT),
                                              view.num_blocks)  # fmt: skip
            if staying <= routing.MOVE_MIN_GAIN:
                continue
            placed = client.placed_counts()
            began = time.perf_counter()
            try:
                other = routing.inference_route(
                    view,
                    span.start,
                    span.end,
                    rtts=client.rtts,
                    banned=client.avoided((span.peer_id,)),
                    cache_tokens_needed=self.max_length,
                    placed=placed,
                )
            except NoRouteError:
                continue
            finally:
                self.sim.run_data.decisions.append(time.perf_counter() - began)
            elsewhere = routing.route_seconds(view, other, rtts=client.rtts, placed=placed)
            if routing.worth_moving(staying, elsewhere):
                self.record.moves += 1
                self.sim.close_session(self.sim.by_peer[span.peer_id], self.key)
                for replacement in other:
                    self.sim.open_session(self.sim.by_peer[replacement.peer_id], self.key, self.max_length)
                    client.placed.setdefault(replacement.peer_id, []).append(self.sim.now)
                self.route = self.route[:index] + other + self.route[index + 1 :]
                self.step_id += 1
                self._step(1, replay_from=span.start)
                return True
        return False

    def end(self, error: str) -> None:
        if self.record is None:
            return
        record, self.record = self.record, None
        record.error = error
        self.sim.run_data.liars.extend((served, None) for served, _ in self.liars.values())
        self.liars = {}
        self.step_id += 1
        self.sim.run_data.generations.append(record)
        for span in self.route:
            self.sim.close_session(self.sim.by_peer[span.peer_id], self.key)
        self.route = []
        if self in self.client.active:
            self.client.active.remove(self)
        if self.repeat:
            think = self.client.spec.think_s
            pause = self.client.rng.expovariate(1 / think) if think > 0 else 0.0
            self.sim.after(pause + (1.0 if error else 0.0), self.begin)
