"""The swarm simulator (``petals_cli/testing/simswarm.py``): every decision made by the product's own code, in
simulated time.

    python benchmarks/simulate.py validate /tmp/petals-scale-XXXX/run.json   # a real scale run, simulated beside it
    python benchmarks/simulate.py internet                                  # 1,000 servers, 10,000 sessions, 1 hour
    python benchmarks/simulate.py internet --servers 200 --sessions 2000 --hours 0.25 --policies ours,petals
    python benchmarks/simulate.py scale-swarm --policies ours,petals        # the scale benchmark's swarm, no real run

``validate`` reads a run of ``benchmarks/swarm_scale.py`` (its ``run.json``), measures what this machine added to its
device models (the processes' CPU per token: ``testing/sim_validate.py``), simulates the same swarm on the same
timeline, and prints the figures side by side. ``internet`` is ``sim_scenarios.internet``: mixed devices in four
regions, an 80-block model, sessions generating back to back, 5% of the servers leaving or crashing per hour and as
many joining; each policy (``sim_policies``) runs the same scenario with the same seed. Targets are reported, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from petals_cli.testing.sim_policies import POLICIES


def _policies(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"policies: a comma-separated list of {', '.join(POLICIES)}")
    return names


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="simulate a real scale run beside it")
    validate.add_argument("run_json", type=Path, help="run.json of benchmarks/swarm_scale.py")
    validate.add_argument("--seed", type=int, default=0)
    internet = commands.add_parser("internet", help="a public swarm: regions, mixed devices, churn")
    internet.add_argument("--servers", type=int, default=1000)
    internet.add_argument("--sessions", type=int, default=10_000)
    internet.add_argument("--hours", type=float, default=1.0)
    internet.add_argument("--blocks", type=int, default=80)
    internet.add_argument("--churn", type=float, default=0.05, help="fraction of servers leaving per hour")
    internet.add_argument("--clients", type=int, default=100, help="client processes the sessions belong to")
    internet.add_argument("--policies", type=_policies, default=["ours", "petals"])
    internet.add_argument("--seed", type=int, default=0)
    swarm = commands.add_parser("scale-swarm", help="the scale benchmark's swarm on a default timeline")
    swarm.add_argument("--minutes", type=float, default=5.0)
    swarm.add_argument("--after-minutes", type=float, default=5.0)
    swarm.add_argument("--policies", type=_policies, default=["ours"])
    swarm.add_argument("--seed", type=int, default=0)
    for command in (validate, internet, swarm):
        command.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return parser.parse_args()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_validate(args) -> dict:
    from petals_cli.testing.scale import ScaleRun
    from petals_cli.testing.sim_policies import ours
    from petals_cli.testing.sim_report import summarize
    from petals_cli.testing.sim_validate import compare, measured, real_figures, scenario_of
    from petals_cli.testing.simswarm import Sim

    run = ScaleRun.from_json(json.loads(args.run_json.read_text()))
    costs = measured(run)
    say(f"measured: {json.dumps({key: round(value, 5) for key, value in costs.items()})}")
    scenario, line = scenario_of(run, costs)
    simulated = summarize(Sim(scenario, ours(scenario), args.seed).run(), started=line.started,
                          killed_at=line.killed_at)  # fmt: skip
    real = real_figures(run)
    return {"measured": costs, "rows": compare(real, simulated), "simulated": simulated}


def run_policies(scenario, line, names: list[str], seed: int) -> dict:
    from petals_cli.testing.sim_report import summarize
    from petals_cli.testing.simswarm import Sim

    reports = {}
    for name in names:
        say(f"simulating {len(scenario.servers)} servers, policy {name}")
        policy = POLICIES[name](scenario)
        run = Sim(scenario, policy, seed).run()
        reports[name] = summarize(run, started=line.started, killed_at=line.killed_at or None)
        say(f"  {reports[name]['wall_s']} s of wall time, {reports[name]['events']} events")
    return reports


def render_table(reports: dict) -> str:
    names = list(reports)
    keys = [key for key in next(iter(reports.values())) if not isinstance(reports[names[0]][key], (dict, list))]
    width = max(len(key) for key in keys)
    lines = [f"{'':{width}}  " + "  ".join(f"{name:>12}" for name in names)]
    for key in keys:
        lines.append(f"{key:{width}}  " + "  ".join(f"{reports[name].get(key)!s:>12}" for name in names))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.command == "validate":
        result = run_validate(args)
        if args.json:
            print(json.dumps(result, indent=1))
            return
        print(f"{'figure':46} {'real':>10} {'simulated':>10} {'off':>8}")
        for row in result["rows"]:
            off = "" if row["off"] is None else f"{100 * row['off']:+.1f}%"
            mark = " *" if row["checked"] else ""
            print(f"{row['figure']:46} {row['real']!s:>10} {row['simulated']!s:>10} {off:>8}{mark}")
        print("* the issue's figures (target: within 15%)")
        return
    if args.command == "internet":
        from petals_cli.testing.sim_scenarios import internet

        scenario, line = internet(servers=args.servers, sessions=args.sessions, hours=args.hours,
                                  num_blocks=args.blocks, churn_per_hour=args.churn, seed=args.seed,
                                  clients=args.clients)  # fmt: skip
    else:
        from petals_cli.testing.scale import ScaleSettings
        from petals_cli.testing.sim_scenarios import like_scale_run

        settings = ScaleSettings(minutes=args.minutes, after_minutes=args.after_minutes, seed=args.seed)
        scenario, line = like_scale_run(settings)
    reports = run_policies(scenario, line, args.policies, args.seed)
    print(json.dumps(reports, indent=1) if args.json else render_table(reports))


if __name__ == "__main__":
    main()
