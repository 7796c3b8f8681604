"""A long run of a swarm on the emulated WAN under churn and network faults, every token checked.

    sudo .venv/bin/python benchmarks/soak.py                  # 30 minutes, 10 servers, 16 sessions
    sudo .venv/bin/python benchmarks/soak.py --minutes 5 --json
    python benchmarks/soak.py --report /tmp/petals-soak-XXXX/run.json   # the report of a saved run again

About ten `petals serve` processes hold four spans of a tiny model two or three times each, each on its own host of
``petals_cli.testing.wan``; sessions in several client processes (some with ``--verify``) generate greedily without
pause, and every token is compared with local transformers. At random moments: a server joins, leaves (SIGTERM), is
SIGKILLed, is frozen (SIGSTOP, SIGCONT later), a link is cut for 30 s, a host loses 1% of its packets, the bootstrap
peer restarts, or a server that lies about every output serves for a while. The report: tokens, wrong tokens,
failed generations and why, crashes, each server's memory and descriptors, DHT record counts over time, how long
each fault took to be noticed, and the issue's targets, met or missed (reported, never asserted).

The harness is ``petals_cli.testing.soak`` (shared with tests/swarm/test_soak.py). Without root or /dev/net/tun it
says so and exits 0.
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

from petals_cli.testing.soak import Soak  # noqa: E402
from petals_cli.testing.soak_records import SoakRun, SoakSettings  # noqa: E402
from petals_cli.testing.soak_report import summarize  # noqa: E402
from petals_cli.testing.soak_text import render  # noqa: E402
from petals_cli.testing.wan import unavailable  # noqa: E402


def parse_args() -> argparse.Namespace:
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="how long sessions generate")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="client processes")
    parser.add_argument("--sessions", type=int, default=defaults.sessions, help="sessions over all clients")
    parser.add_argument("--verify-clients", type=int, default=defaults.verify_clients, help="clients with --verify")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help="tokens per generation")
    parser.add_argument("--step-pause", type=float, default=defaults.step_pause, help="seconds between tokens")
    parser.add_argument("--rtt", type=float, default=defaults.rtt_ms, help="round trip between hosts, ms")
    parser.add_argument("--mbit", type=float, default=defaults.mbit, help="every host's uplink, Mbit/s")
    parser.add_argument("--faults-per-kind", type=int, default=0, help="default: one per 5 minutes")
    parser.add_argument("--sample", type=float, default=defaults.sample_s, help="seconds between resource samples")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "petals-bench-models"))
    parser.add_argument("--report", metavar="RUN_JSON", help="only print the report of a saved run (its run.json)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        report = summarize(SoakRun.from_json(json.loads(Path(args.report).read_text())))
        print(json.dumps(report, indent=1) if args.json else render(report))
        return
    reason = unavailable()
    if reason:
        print(f"benchmarks/soak.py: skipped: an emulated WAN {reason}", file=sys.stderr)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the soak's cleanup runs

    from petals_cli.testing import ensure_tiny_model

    settings = SoakSettings(
        minutes=args.minutes,
        clients=args.clients,
        sessions=args.sessions,
        verify_clients=args.verify_clients,
        new_tokens=args.new_tokens,
        step_pause=args.step_pause,
        rtt_ms=args.rtt,
        mbit=args.mbit,
        faults_per_kind=args.faults_per_kind,
        sample_s=args.sample,
        seed=args.seed,
    )
    model_dir = Path(args.models_dir) / "soak-llama"
    model = ensure_tiny_model(model_dir, "llama", num_layers=settings.layers, hidden_size=settings.hidden)
    workdir = Path(tempfile.mkdtemp(prefix="petals-soak-"))
    run = Soak(settings, model, workdir, say=lambda text: print(text, file=sys.stderr, flush=True)).run()
    report = summarize(run)
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else render(report))


if __name__ == "__main__":
    main()
