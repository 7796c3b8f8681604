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
- leaving a slow server mid-session: ``moves.faster_route`` (``staying_seconds``, ``inference_route``,
  ``route_seconds``, ``worth_moving``);
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
import random
import time
from collections import deque
from collections.abc import Callable

from petals_cli.server import placement
from petals_cli.server.engine import STEP_SMOOTHING, plan
from petals_cli.server.selection import block_throughputs
from petals_cli.testing.sim_clients import SimClient
from petals_cli.testing.sim_model import (  # noqa: F401 (the simulator's names, importable from here)
    BACKGROUND_SLICE,
    DETECT_SECONDS,
    PREFIX,
    SESSIONS_PER_PEER,
    ClientSpec,
    Generation,
    Job,
    Policy,
    Scenario,
    ServerSpec,
    SimRun,
    SimServer,
)
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot


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
