"""Tens of paced servers of mixed speeds placing themselves, sessions from several client processes, then a
quarter of the servers SIGKILLed: throughput against its bound, latency, balance, routing time, DHT traffic,
recovery and moves.

    python benchmarks/swarm_scale.py                       # the issue's: 40 servers, 200 sessions, 8 clients
    python benchmarks/swarm_scale.py --servers 8 --sessions 24 --clients 4 --minutes 1 --after-minutes 1
    python benchmarks/swarm_scale.py --report /tmp/petals-scale-XXXX/run.json   # the report of a saved run again

Servers are ``petals_cli.testing.scale_server`` (paced, with meters) taking ``--blocks N`` of their speed class,
placed by the swarm; the bound is ``testing/scale_bound.py``'s max flow of the placement; every figure is defined
in ``testing/scale_report.py``. Targets are reported, never asserted. Servers are forked from one fork server
(``testing/forkserver.py``: they share their imports' memory); each still needs about 0.25 GB with its libp2p daemon
(0.5 GB with ``--exec``), and each client process about 0.5 GB: check ``free -g`` before a big run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from petals_cli.routing import RULES  # noqa: E402
from petals_cli.testing.scale import SPEEDS, Scale, ScaleRun, ScaleSettings  # noqa: E402
from petals_cli.testing.scale_report import render, summarize  # noqa: E402


def parse_mix(text: str) -> tuple[tuple[str, int], ...]:
    try:
        mix = tuple((name, int(count)) for name, count in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give CLASS:COUNT,... of {sorted(SPEEDS)}") from None
    return mix


def parse_args() -> argparse.Namespace:
    defaults = ScaleSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=defaults.servers)
    parser.add_argument("--sessions", type=int, default=defaults.sessions, help="over all client processes")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="client processes")
    parser.add_argument("--blocks", type=int, default=defaults.layers, help="the tiny model's blocks")
    parser.add_argument("--mix", type=parse_mix, default=defaults.mix, help="speed classes taken in turn, "
                        f"CLASS:COUNT,... of {sorted(SPEEDS)} (default fast:1,medium:1,slow:1)")  # fmt: skip
    parser.add_argument("--slowdown", type=float, default=defaults.slowdown, help="multiplies every paced time")
    parser.add_argument("--join", choices=("sequential", "together"), default=defaults.join)
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="of generation before the kill")
    parser.add_argument("--after-minutes", type=float, default=defaults.after_minutes, help="after the kill")
    parser.add_argument("--kill-fraction", type=float, default=defaults.kill_fraction)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help="tokens per generation")
    parser.add_argument("--check-rate", type=float, default=defaults.check_rate, help="generations checked")
    parser.add_argument("--routing", choices=RULES, default=defaults.routing,
                        help="clients' routing rule (load: by live load; idle: by idle throughput)")  # fmt: skip
    parser.add_argument("--balance-period", type=float, default=0.0, help="servers' rebalancing period (0: theirs)")
    parser.add_argument("--exec", action="store_true",
                        help="start each server as its own interpreter (default: forked)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "petals-bench-models"))
    parser.add_argument("--report", metavar="RUN_JSON", help="only print the report of a saved run (its run.json)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        report = summarize(ScaleRun.from_json(json.loads(Path(args.report).read_text())))
        print(json.dumps(report, indent=1) if args.json else render(report))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the run's cleanup runs

    from petals_cli.testing import ensure_tiny_model

    settings = ScaleSettings(
        servers=args.servers,
        sessions=args.sessions,
        clients=args.clients,
        layers=args.blocks,
        mix=args.mix,
        slowdown=args.slowdown,
        join=args.join,
        minutes=args.minutes,
        after_minutes=args.after_minutes,
        kill_fraction=args.kill_fraction,
        new_tokens=args.new_tokens,
        check_rate=args.check_rate,
        routing=args.routing,
        balance_period=args.balance_period,
        forked=not args.exec,
        seed=args.seed,
    )
    model_dir = Path(args.models_dir) / f"scale-llama-{settings.layers}"
    model = ensure_tiny_model(model_dir, "llama", num_layers=settings.layers, hidden_size=settings.hidden)
    workdir = Path(tempfile.mkdtemp(prefix="petals-scale-"))
    run = Scale(settings, model, workdir, say=lambda text: print(text, file=sys.stderr, flush=True)).run()
    report = summarize(run)
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else render(report))


if __name__ == "__main__":
    main()
