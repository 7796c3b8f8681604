"""Aggregate generation speed of several sessions at once through one local swarm (the step engine's batching).

    python benchmarks/concurrent_sessions.py --preset midsize --sessions 1 8   # issue 15's configuration

Starts the servers with `petals serve` on 127.0.0.1; for each N, N client threads of one process each generate
greedily (new tokens after a prompt of their own) at the same time; prints one JSON object: per N the aggregate
new tokens per second, per-step latency percentiles, and the largest batch each server ran.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `petals` CLI does for its peers
import msgpack  # noqa: E402
import torch  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402
from swarm_vs_local import PRESETS as SWARM_VS_LOCAL  # noqa: E402 (this folder: the same models and spans)

from petals_cli import AutoDistributedModelForCausalLM  # noqa: E402
from petals_cli.bench import generate_at_once  # noqa: E402
from petals_cli.config import ClientConfig  # noqa: E402
from petals_cli.testing import ensure_tiny_model  # noqa: E402
from petals_cli.testing.swarm import Swarm  # noqa: E402
from petals_cli.wire import ServerInfo  # noqa: E402

PRESETS = {name: {**preset, "new_tokens": 32} for name, preset in SWARM_VS_LOCAL.items()}


def run_sessions(model, prompts: list[torch.Tensor], new_tokens: int) -> dict:
    seconds, clocks = generate_at_once(model, prompts, new_tokens)
    steps = [later - earlier for clock in clocks for earlier, later in itertools.pairwise(clock.times)]
    quantiles = statistics.quantiles(steps, n=20) if len(steps) > 1 else [0.0] * 19
    return {
        "sessions": len(prompts),
        "seconds": round(seconds, 3),
        "aggregate_tokens_per_s": round(len(prompts) * new_tokens / seconds, 2),
        "step_ms_p50": round(1000 * statistics.median(steps), 1) if steps else None,
        "step_ms_p95": round(1000 * quantiles[18], 1),
    }


def largest_batches(model, swarm) -> list[int]:
    client, found = model.petals_client, []
    for server in swarm.servers:
        peer = server.addresses()[0].rsplit("/p2p/", 1)[1]
        answer = client.run(client.stub(peer).rpc_info(runtime_pb2.ExpertUID(uid="")), timeout=10)
        found.append(ServerInfo.from_wire(msgpack.unpackb(answer.serialized_info, raw=False)).largest_batch)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "petals-bench-models"))
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    model_path = ensure_tiny_model(Path(args.models_dir) / f"bench-{args.preset}", "llama", **preset["model"])
    swarm = Swarm(model=model_path, workdir=Path(tempfile.mkdtemp(prefix="petals-concurrent-")))
    results = []
    try:
        swarm.start_many(*preset["spans"])
        config = ClientConfig(initial_peers=tuple(swarm.initial_peers))
        model = AutoDistributedModelForCausalLM.from_pretrained(str(model_path), config=config)
        try:
            generator = torch.Generator().manual_seed(0)
            model.generate(torch.randint(4, 200, (1, 8), generator=generator), max_new_tokens=4, do_sample=False)
            for count in args.sessions:
                prompts = [
                    torch.randint(4, 200, (1, preset["prompt_tokens"]), generator=generator) for _ in range(count)
                ]
                results.append(run_sessions(model, prompts, preset["new_tokens"]))
            batches = largest_batches(model, swarm)
        finally:
            model.close()
    finally:
        swarm.stop()
    single = next((result["aggregate_tokens_per_s"] for result in results if result["sessions"] == 1), None)
    for result in results:
        result["vs_one_session"] = round(result["aggregate_tokens_per_s"] / single, 2) if single else None
    report = {
        "preset": args.preset,
        "servers": list(preset["spans"]),
        "prompt_tokens": preset["prompt_tokens"],
        "new_tokens": preset["new_tokens"],
        "runs": results,
        "largest_batch_per_server": batches,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
