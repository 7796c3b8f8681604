"""The policies the swarm simulator compares (``simswarm.Policy``): each is the real code of one set of rules.

- ``ours``: ``routing.inference_route`` under the load rule (live load, this client's placements, spreading), the
  client's mid-session moves, ``selection.rebalance`` + ``selection.confirm_move``, bans from 1 s;
- ``idle``: the same with routes costed by idle throughput only (``--routing idle``), no mid-session moves;
- ``petals``: the original Petals' published rules (``testing/petals_rules.py``).
"""

from __future__ import annotations

import random
from dataclasses import replace

from petals_cli import routing
from petals_cli.client.inference import MOVE_CHECK_STEPS
from petals_cli.server.selection import confirm_move, rebalance
from petals_cli.testing import petals_rules
from petals_cli.testing.simswarm import Policy, Scenario, SimServer
from petals_cli.wire import SwarmSnapshot

PETALS_ANNOUNCE_PERIOD = 120.0  # the original servers republished their records about every two minutes


def ours(scenario: Scenario) -> Policy:
    def route(snapshot, start, end, **kwargs):
        return routing.inference_route(snapshot, start, end, push=True, rule="load", **kwargs)

    def move(server: SimServer, snapshot: SwarmSnapshot, now: float):
        decision = rebalance(
            snapshot, server.peer_id, server.span, server.throughput, balance_quality=scenario.balance_quality
        )
        go, server.pending = confirm_move(decision, server.pending, now - server.last_move, scenario.balance_period)
        return decision.new_span if go else None

    return Policy("ours", route, live_load=True, move_check_steps=MOVE_CHECK_STEPS, move=move)


def idle(scenario: Scenario) -> Policy:
    def route(snapshot, start, end, *, placed=None, rng=None, **kwargs):
        return routing.inference_route(snapshot, start, end, push=True, rule="idle", **kwargs)

    return replace(ours(scenario), name="idle", route=route, move_check_steps=0)


def petals(scenario: Scenario, seed: int = 0, max_others: int | None = None) -> Policy:
    rng = random.Random(f"petals-rules/{seed}")

    def move(server: SimServer, snapshot: SwarmSnapshot, now: float):
        return petals_rules.should_move(snapshot, server.peer_id, server.span, server.throughput, rng, max_others)

    return Policy(
        "petals",
        petals_rules.route,
        live_load=False,
        move_check_steps=0,
        ban_seconds=petals_rules.BAN_SECONDS,
        move=move,
        announce_period=PETALS_ANNOUNCE_PERIOD,
    )


POLICIES = {"ours": ours, "idle": idle, "petals": petals}
