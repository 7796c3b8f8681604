"""What verification costs, and whether honest replicas ever disagree (issue 19's targets).

    python benchmarks/verify.py --preset midsize             # cost: tokens/s at --verify 0 vs RATE, loopback
    python benchmarks/verify.py --preset tiny --steps 10000  # false positives: every step checked, 10,000 steps
    python benchmarks/verify.py --preset tiny --tamper 0.01 --rate 0.1 --trials 20  # how fast a liar is caught

Starts two servers per span on 127.0.0.1 (a check needs a replica). Cost: greedy generation of one session with
verification off and at ``--rate`` (default 0.05), runs taken in turn; prints tokens/s both ways and their ratio.
False positives: ``--steps`` one-token steps of random hidden states through sessions checked at rate 1 (float32,
same CPU), counting checks and disagreements. Tamper: a third server of the first span alters each output with
probability ``--tamper`` (and announces an inflated throughput, so routes use it); ``--trials`` sessions each step
until it is caught or ``checks_needed(rate, tamper)`` steps pass, and the share caught in time is reported. One JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `petals` CLI does for its peers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from swarm_vs_local import PRESETS  # noqa: E402 (this folder: the same models and spans)

from petals_cli import AutoDistributedModelForCausalLM  # noqa: E402
from petals_cli.config import ClientConfig  # noqa: E402
from petals_cli.testing import ensure_tiny_model  # noqa: E402
from petals_cli.testing.swarm import Swarm  # noqa: E402
from petals_cli.verify import checks_needed  # noqa: E402


def open_model(path: Path, swarm: Swarm, rate: float):
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), verify_rate=rate, verify_seed=0)
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), config=config)


def cost(path: Path, swarm: Swarm, rate: float, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    models = {"off": open_model(path, swarm, 0.0), "verify": open_model(path, swarm, rate)}
    rates, checks = {name: [] for name in models}, 0
    try:
        for repeat in range(repeats + 1):  # the first round warms up
            for name, model in models.items():
                with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
                    started = time.perf_counter()
                    model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, session=session)
                    seconds = time.perf_counter() - started
                    if repeat:
                        rates[name].append(new_tokens / seconds)
                        checks += session.verified_steps if name == "verify" else 0
    finally:
        for model in models.values():
            model.close()
    off, on = (statistics.median(rates[name]) for name in ("off", "verify"))
    return {
        "rate": rate,
        "tokens_per_s_off": round(off, 2),
        "tokens_per_s_verified": round(on, 2),
        "verified_over_off": round(on / off, 3),
        "checks_per_session": round(checks / repeats, 1),
        "runs": {name: [round(value, 2) for value in values] for name, values in rates.items()},
    }


def false_positives(path: Path, swarm: Swarm, steps: int, session_length: int = 500) -> dict:
    model = open_model(path, swarm, 1.0)
    generator = torch.Generator().manual_seed(0)
    hidden, done, checks, caught, tokens = model.config.hidden_size, 0, 0, 0, 0
    started = time.perf_counter()
    try:
        while done < steps:
            length = min(session_length, steps - done)
            with model.inference_session(max_length=length + 8) as session:
                session.step(torch.randn(1, 8, hidden, generator=generator))
                for _ in range(length - 1):
                    session.step(torch.randn(1, 1, hidden, generator=generator))
                checks, caught = checks + session.verified_steps, caught + session.caught
                tokens += session.verified_tokens
            done += length
    finally:
        model.close()
    seconds = round(time.perf_counter() - started, 1)
    return {"steps": done, "checks": checks, "tokens_compared": tokens, "mismatches": caught, "seconds": seconds}


def catching(path: Path, swarm: Swarm, rate: float, tamper: float, trials: int) -> dict:
    """Sessions stepping through a swarm with a liar until it is caught or the predicted number of steps passes."""
    limit = checks_needed(rate, tamper)
    model = open_model(path, swarm, rate)
    client, generator, hidden = model.petals_client, torch.Generator().manual_seed(0), model.config.hidden_size
    caught_at = []
    try:
        for _ in range(trials):
            client.bans.forever.clear()  # each trial starts trusting every server again
            with model.inference_session(max_length=limit + 8) as session:
                session.step(torch.randn(1, 8, hidden, generator=generator))
                steps = 1
                while not session.caught and steps < limit:
                    session.step(torch.randn(1, 1, hidden, generator=generator))
                    steps += 1
                session.settle_checks()
                caught_at.append(steps if session.caught else None)
    finally:
        model.close()
    within = [steps for steps in caught_at if steps is not None]
    return {
        "rate": rate,
        "tamper": tamper,
        "predicted_steps_for_95_percent": limit,
        "trials": trials,
        "caught_within": len(within),
        "share_caught": round(len(within) / trials, 3),
        "median_steps_to_catch": statistics.median(within) if within else None,
        "caught_at": caught_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs each way, in turn, after a warm-up")
    parser.add_argument("--steps", type=int, default=0, help="instead: this many steps checked at rate 1")
    parser.add_argument("--tamper", type=float, default=0.0, help="instead: a liar with this probability per output")
    parser.add_argument("--trials", type=int, default=20, help="sessions with --tamper")
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "petals-bench-models"))
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    path = ensure_tiny_model(Path(args.models_dir) / f"bench-{args.preset}", "llama", **preset["model"])
    swarm = Swarm(model=path, workdir=Path(tempfile.mkdtemp(prefix="petals-verify-bench-")))
    try:
        swarm.start_many(*preset["spans"], *preset["spans"])  # two replicas of every span
        if args.tamper:
            liar = ("--mode", "noise", "--probability", str(args.tamper), "--seed", "1", "--attract")
            swarm.start(preset["spans"][0], tamper=liar)
            result = catching(path, swarm, args.rate, args.tamper, args.trials)
        elif args.steps:
            result = false_positives(path, swarm, args.steps)
        else:
            prompt = torch.randint(4, 200, (1, preset["prompt_tokens"]), generator=torch.Generator().manual_seed(0))
            result = cost(path, swarm, args.rate, prompt, preset["new_tokens"], args.repeats)
    finally:
        swarm.stop()
    report = {"preset": args.preset, "servers": [*preset["spans"], *preset["spans"]], **result}
    print(json.dumps({**report, "cpus": os.cpu_count(), "python": sys.version.split()[0]}, indent=1))


if __name__ == "__main__":
    main()
