"""What `petals api` costs over the library: one stream, and 8 streams at once, through one local swarm.

    python benchmarks/api_overhead.py --preset midsize   # issue 18's targets
    python benchmarks/api_overhead.py --preset tiny

Starts the servers and `petals api` (its own process, as users run it) on 127.0.0.1. This process is the user:
through the library (the distributed model's greedy generate(), one thread per session) and through the API (the
`openai` package, streaming completions, greedy, one thread per stream), runs taken in turn; prints one JSON object
with new tokens/s both ways and their ratio for 1 and for N sessions at once.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `petals` CLI does for its peers
from swarm_vs_local import PRESETS  # noqa: E402 (this folder: the same models and spans)

from petals_cli.bench import run_at_once  # noqa: E402
from petals_cli.config import ClientConfig  # noqa: E402
from petals_cli.generation import GenerationOptions, generate, open_model  # noqa: E402
from petals_cli.testing import ensure_tiny_model  # noqa: E402
from petals_cli.testing.swarm import Swarm, petals_command  # noqa: E402

PROMPTS = [f"Report number {index}: the swarm of small servers ran one large model and" for index in range(16)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_api(model: Path, initial_peers: list[str], port: int, workdir: Path) -> subprocess.Popen:
    log = open(workdir / "api.log", "wb")  # noqa: SIM115 (closed with the process)
    command = petals_command("api", str(model), "--port", str(port), "--initial-peers", *initial_peers)
    process = subprocess.Popen(command, stdout=log, stderr=log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"petals api exited; its log: {workdir / 'api.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("petals api did not start listening")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs each way, in turn, after a warm-up")
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "petals-bench-models"))
    args = parser.parse_args()
    import openai

    preset = PRESETS[args.preset]
    model_path = ensure_tiny_model(Path(args.models_dir) / f"bench-{args.preset}", "llama", **preset["model"])
    workdir = Path(tempfile.mkdtemp(prefix="petals-api-bench-"))
    swarm = Swarm(model=model_path, workdir=workdir)
    options = GenerationOptions(max_new_tokens=args.new_tokens)
    rows = []
    try:
        swarm.start_many(*preset["spans"])
        port = free_port()
        api = start_api(model_path, swarm.initial_peers, port, workdir)
        model, tokenizer = open_model(str(model_path), ClientConfig(initial_peers=tuple(swarm.initial_peers)))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        try:

            def library(index: int) -> int:
                return generate(model, tokenizer, PROMPTS[index], options).new_tokens

            def through_api(index: int) -> int:
                stream = client.completions.create(
                    model=str(model_path),
                    prompt=PROMPTS[index],
                    max_tokens=args.new_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                return next(chunk.usage.completion_tokens for chunk in stream if chunk.usage is not None)

            for count in args.sessions:
                rates = {"library": [], "api": []}
                for repeat in range(args.repeats + 1):  # the first round warms up
                    for name, work in (("library", library), ("api", through_api)):
                        seconds, tokens = run_at_once(work, count)
                        if repeat:
                            rates[name].append(sum(tokens) / seconds)
                library_rate, api_rate = (statistics.median(rates[name]) for name in ("library", "api"))
                rows.append(
                    {
                        "sessions": count,
                        "library_tokens_per_s": round(library_rate, 2),
                        "api_tokens_per_s": round(api_rate, 2),
                        "api_over_library": round(api_rate / library_rate, 3),
                        "runs": {name: [round(rate, 2) for rate in values] for name, values in rates.items()},
                    }
                )
        finally:
            model.close()
            api.terminate()
            api.wait(20)
    finally:
        swarm.stop()
    report = dict(preset=args.preset, servers=list(preset["spans"]), new_tokens=args.new_tokens, rows=rows)
    print(json.dumps({**report, "cpus": os.cpu_count(), "python": sys.version.split()[0]}, indent=1))


if __name__ == "__main__":
    main()
