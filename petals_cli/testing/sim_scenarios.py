"""Scenarios for the swarm simulator (``simswarm``).

- ``like_scale_run``: the scale benchmark's swarm (``testing/scale.py``: its speed classes, sequential joins, client
  processes with sessions generating back to back, a quarter of the servers SIGKILLed), on the timeline of a real
  run when one is given, so that the simulation can be checked against it.
- ``internet``: a public swarm: mixed devices in four regions, an 80-block model, sessions arriving at random,
  servers leaving or crashing and newcomers joining over an hour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from petals_cli.testing.scale import ScaleSettings
from petals_cli.testing.simswarm import ClientSpec, Scenario, ServerSpec


@dataclass(frozen=True)
class Timeline:
    """When things happened, in seconds from the first server's start (a real run's, or the defaults)."""

    joins: tuple[float, ...] = ()  # each server's start
    started: float = 0.0  # clients told to go
    killed_at: float = 0.0
    ended: float = 0.0


@dataclass(frozen=True)
class Overheads:
    """What a real run on this machine adds to the device models (``Scenario``'s fields of the same names)."""

    hop_seconds: float = 0.004
    client_seconds: float = 0.01
    call_seconds: float = 0.002
    load_seconds: float = 1.0


def default_timeline(settings: ScaleSettings, join_every: float = 3.0, lead: float = 20.0) -> Timeline:
    joins = tuple(join_every * number for number in range(settings.servers))
    started = joins[-1] + lead
    killed_at = started + 60 * settings.minutes
    return Timeline(joins, started, killed_at, killed_at + 60 * settings.after_minutes)


def like_scale_run(settings: ScaleSettings, timeline: Timeline | None = None, overheads: Overheads = Overheads(),
                   victims: tuple[int, ...] | None = None) -> tuple[Scenario, Timeline]:  # fmt: skip
    """The scale benchmark's swarm; ``victims``: the servers killed (by number), else the benchmark's seeded draw."""
    timeline = timeline or default_timeline(settings)
    if victims is None:
        count = round(settings.kill_fraction * settings.servers)
        victims = tuple(random.Random(settings.seed).sample(range(settings.servers), count))
    servers = []
    for number in range(settings.servers):
        name = settings.server_class(number)
        servers.append(
            ServerSpec(
                name=f"server-{number}",
                device=settings.device(name),
                blocks=settings.span_blocks(name),
                start_at=timeline.joins[number],
                stop_at=timeline.killed_at if number in victims else None,
                load_seconds=overheads.load_seconds,
            )
        )
    per_client = [settings.sessions // settings.clients + (index < settings.sessions % settings.clients)
                  for index in range(settings.clients)]  # fmt: skip
    clients = tuple(
        ClientSpec(f"client-{index}", sessions=count, start_at=timeline.started)
        for index, count in enumerate(per_client)
    )
    scenario = Scenario(
        num_blocks=settings.layers,
        servers=tuple(servers),
        clients=clients,
        duration=timeline.ended,
        prompt_tokens=settings.prompt_tokens,
        new_tokens=settings.new_tokens,
        hop_seconds=overheads.hop_seconds,
        client_seconds=overheads.client_seconds,
        call_seconds=overheads.call_seconds,
        balance_period=settings.balance_period or 60.0,
    )
    return scenario, timeline


REGIONS = ("eu", "us-east", "us-west", "asia")
# round trips between regions, seconds (inside one region: 10 ms)
RTTS = {
    ("eu", "eu"): 0.01,
    ("us-east", "us-east"): 0.01,
    ("us-west", "us-west"): 0.01,
    ("asia", "asia"): 0.01,
    ("eu", "us-east"): 0.08,
    ("eu", "us-west"): 0.15,
    ("eu", "asia"): 0.22,
    ("us-east", "us-west"): 0.07,
    ("us-east", "asia"): 0.18,
    ("us-west", "asia"): 0.12,
}
# The scale benchmark's speed classes (the device models the simulator was checked against), slowed ``slowdown``
# times, holding twice their blocks of an 80-block model; share of servers.
MIX = (("fast", 1 / 3), ("medium", 1 / 3), ("slow", 1 / 3))


def internet(
    servers: int = 1000,
    sessions: int = 10_000,
    hours: float = 1.0,
    num_blocks: int = 80,
    churn_per_hour: float = 0.05,
    new_tokens: int = 128,
    prompt_tokens: int = 16,
    seed: int = 0,
    clients: int = 100,
    join_minutes: float = 10.0,
    slowdown: float = 4.0,
) -> tuple[Scenario, Timeline]:
    """A public swarm: ``servers`` of the ``MIX`` spread over ``REGIONS`` (servers and clients alike), joining over
    ``join_minutes``; then ``sessions`` sessions of ``clients`` client processes generating back to back for
    ``hours``; each hour ``churn_per_hour`` of the servers leave (half announce it, half crash) and as many
    newcomers join. Sessions outnumber what the swarm carries at once, so it runs saturated: the aggregate
    is measured against the placement's bound."""
    rng = random.Random(seed)
    settings = ScaleSettings(layers=num_blocks, slowdown=slowdown)
    names, weights = [name for name, _ in MIX], [share for _, share in MIX]
    started = 60.0 * join_minutes + 60.0
    duration = started + 3600.0 * hours
    specs = [(rng.choices(names, weights)[0], rng.choice(REGIONS), rng.uniform(0, 60.0 * join_minutes))
             for _ in range(servers)]  # fmt: skip
    leaving = rng.sample(range(servers), round(churn_per_hour * hours * servers))
    stops = {number: rng.uniform(started, duration) for number in leaving}
    newcomers = [
        (specs[rng.randrange(servers)][0], rng.choice(REGIONS), rng.uniform(started, duration)) for _ in leaving
    ]
    server_specs = tuple(
        ServerSpec(
            name=f"{kind}-{number}",
            device=settings.device(kind),
            blocks=settings.span_blocks(kind),
            region=region,
            start_at=start_at,
            stop_at=stops.get(number),
            crash=number % 2 == 0,
            load_seconds=30.0,
        )
        for number, (kind, region, start_at) in enumerate(specs + newcomers)
    )
    per_client = [sessions // clients + (index < sessions % clients) for index in range(clients)]
    client_specs = tuple(
        ClientSpec(
            f"client-{index}", region=REGIONS[index % len(REGIONS)], sessions=count, start_at=started, ramp_s=300.0
        )  # fmt: skip
        for index, count in enumerate(per_client)
    )
    scenario = Scenario(
        num_blocks=num_blocks,
        servers=server_specs,
        clients=client_specs,
        duration=duration,
        rtt=RTTS,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        hop_seconds=0.005,
        client_seconds=0.005,
        step_bytes=8192 * 2,
        uplink_bps=100e6,
        max_start_delay=10.0,
        live_every=1.0,
    )
    return scenario, Timeline((), started, 0.0, duration)
