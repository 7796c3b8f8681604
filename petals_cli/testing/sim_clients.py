"""The swarm simulator's clients (``SimClient``: snapshot, pings, bans, placements) and their sessions
(``Session``: route, steps pushed from server to server, failover, mid-session moves, checks), each decision
the product's own code (see ``simswarm``)."""

from __future__ import annotations

import functools
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from petals_cli import moves, routing
from petals_cli.client.swarm import MAX_PINGS
from petals_cli.errors import PetalsError
from petals_cli.routing import BanList, RouteSpan
from petals_cli.testing.sim_model import DETECT_SECONDS, PLACED_KEPT, ClientSpec, Generation, Job
from petals_cli.wire import ServerInfo, SwarmSnapshot

if TYPE_CHECKING:
    from petals_cli.testing.simswarm import Sim


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

    def timed(self, search, *args, **kwargs) -> list[RouteSpan]:
        """``search(*args, **kwargs)``, a route decision, its wall time noted (the decision alone, as scale_client
        times it)."""
        began = time.perf_counter()
        try:
            return search(*args, **kwargs)
        finally:
            self.sim.run_data.decisions.append(time.perf_counter() - began)

    def route(self, start: int, end: int, cache_tokens: int, exclude=()) -> list[RouteSpan]:
        """The policy's route over [start, end), timed."""
        if self.view is None or not self.view.servers:  # nothing read yet: read now, as route() does on a miss
            self.refresh(again=False)
        spans = self.timed(
            self.sim.policy.route,
            self.view,
            start,
            end,
            rtts=self.rtts,
            banned=self.avoided(exclude),
            cache_tokens_needed=cache_tokens,
            placed=self.placed_counts(),
            rng=self.rng,
        )
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
            if view is None or span.peer_id not in client.live:
                continue
            move = moves.faster_route(
                view,
                span,
                rtts=client.rtts,
                banned=client.avoided((span.peer_id,)),
                cache_tokens_needed=self.max_length,
                placed=client.placed_counts(),
                search=functools.partial(client.timed, routing.inference_route),
            )
            if move is not None:
                other = move.route
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
