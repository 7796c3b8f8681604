"""Generation speed through a local swarm vs the same model run locally in transformers.

    python benchmarks/swarm_vs_local.py --preset midsize   # 12 layers, hidden 1024, 3 servers, 64+128 tokens
    python benchmarks/swarm_vs_local.py --preset tiny      # per-step overhead, 2 servers

Starts the servers with `petals serve` on 127.0.0.1, measures, stops them, and prints one JSON object:
tokens/s both ways, their ratio, per-step latency and overhead, and each server's memory next to its span's
weights and what the interpreter alone takes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--local-only" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `petals` CLI does for its peers
import torch  # noqa: E402

from petals_cli.testing.swarm import Swarm  # noqa: E402

PRESETS = {
    "midsize": dict(
        model=dict(
            num_layers=12, hidden_size=1024, num_heads=16, num_kv_heads=16, intermediate_size=2816, vocab_size=32000
        ),
        spans=("0:4", "4:8", "8:12"),
        prompt_tokens=64,
        new_tokens=128,
    ),
    "tiny": dict(model=dict(num_layers=4), spans=("0:2", "2:4"), prompt_tokens=16, new_tokens=64),
}


def memory_mib(pid: int) -> dict[str, float]:
    """Peak resident memory, and the private (anonymous) part now: the shared libraries' pages are not in it."""
    fields = {"VmHWM": "peak_rss", "RssAnon": "anon_rss"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found[fields[name]] = round(int(value.split()[0]) / 1024, 1)
    return found


def span_weights_mib(model_path: Path, spans) -> dict[str, float]:
    from safetensors import safe_open

    from petals_cli.checkpoint import resolve_model, weight_map

    sizes: dict[int, int] = {}
    source = resolve_model(str(model_path))
    for name, filename in weight_map(source).items():
        if name.startswith("model.layers."):
            with safe_open(str(model_path / filename), framework="pt") as file:
                tensor = file.get_slice(name)
                count = 1
                for size in tensor.get_shape():
                    count *= size
            index = int(name.split(".")[2])
            sizes[index] = sizes.get(index, 0) + 4 * count
    result = {}
    for span in spans:
        start, end = map(int, span.split(":"))
        result[span] = round(sum(sizes.get(index, 0) for index in range(start, end)) / 2**20, 1)
    return result


def interpreter_baseline_mib() -> dict[str, float]:
    """Memory of a process that has imported what a server imports, before loading any weights."""
    code = "import petals_cli.server.host, time; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            found["rss" if name == "VmRSS" else "anon_rss"] = round(int(value.split()[0]) / 1024, 1)
    return found


def timed_generate(model, input_ids, new_tokens: int, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        times.append(time.perf_counter() - started)
        assert output.shape[1] == input_ids.shape[1] + new_tokens
    return times


def step_times(model, input_ids, steps: int) -> list[float]:
    """Seconds per one-token step through the swarm's blocks after the prompt (no prefill, no LM head)."""
    with torch.no_grad(), model.inference_session(max_length=input_ids.shape[1] + steps + 1) as session:
        hidden = model.embed(model.get_input_embeddings()(input_ids))
        session.step(hidden)
        token = hidden[:, -1:]
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            session.step(token)
            times.append(time.perf_counter() - started)
    return times


def local_step_times(model, input_ids, steps: int) -> list[float]:
    """The same as ``step_times`` locally: the transformer blocks only (no embeddings, final norm or LM head)."""
    from transformers import DynamicCache

    from petals_cli.compat import cache_kwargs

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        cached = cache_kwargs(model.model, cache)
        hidden = model.get_input_embeddings()(input_ids)
        model.model(inputs_embeds=hidden, use_cache=True, **cached)
        token = hidden[:, -1:]
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            model.model(inputs_embeds=token, use_cache=True, **cached)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models-dir", default=".models")
    parser.add_argument("--local-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from petals_cli import AutoDistributedModelForCausalLM
    from petals_cli.testing import ensure_tiny_model

    model_path = ensure_tiny_model(Path(args.models_dir) / f"bench-{args.preset}", "llama", **preset["model"])
    input_ids = torch.randint(4, 200, (1, preset["prompt_tokens"]), generator=torch.Generator().manual_seed(0))
    new_tokens = preset["new_tokens"]

    if args.local_only:
        local = AutoModelForCausalLM.from_pretrained(model_path).eval()
        times = timed_generate(local, input_ids, new_tokens, args.repeats)
        print(json.dumps({"times": times, "steps": local_step_times(local, input_ids, new_tokens)}))
        return
    # Local transformers runs alone in its own process, with torch's default threading: its best case.
    local_env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    command = [sys.executable, __file__, "--local-only", "--preset", args.preset, "--repeats", str(args.repeats)]
    command += ["--models-dir", args.models_dir]
    local = json.loads(subprocess.run(command, env=local_env, capture_output=True, text=True, check=True).stdout)
    local_times, local_steps = local["times"], local["steps"]

    swarm = Swarm(model=model_path, workdir=Path(tempfile.mkdtemp(prefix="petals-bench-")))
    try:
        swarm.start_many(*preset["spans"])
        distributed = AutoDistributedModelForCausalLM.from_pretrained(
            str(model_path), initial_peers=swarm.initial_peers
        )
        timed_generate(distributed, input_ids, 4, 1)  # warm-up: connections, routes
        swarm_times = timed_generate(distributed, input_ids, new_tokens, args.repeats)
        swarm_steps = step_times(distributed, input_ids, new_tokens)
        distributed.close()
        memory = {server.blocks: memory_mib(server.process.pid) for server in swarm.servers}
    finally:
        swarm.stop()

    local_tps = new_tokens / statistics.median(local_times)
    swarm_tps = new_tokens / statistics.median(swarm_times)
    result = {
        "preset": args.preset,
        "servers": list(preset["spans"]),
        "prompt_tokens": preset["prompt_tokens"],
        "new_tokens": new_tokens,
        "local_tokens_per_s": round(local_tps, 2),
        "swarm_tokens_per_s": round(swarm_tps, 2),
        "swarm_over_local": round(swarm_tps / local_tps, 3),
        "local_step_ms": round(1000 * statistics.median(local_steps), 2),
        "swarm_step_ms": round(1000 * statistics.median(swarm_steps), 2),
        "step_overhead_ms": round(1000 * (statistics.median(swarm_steps) - statistics.median(local_steps)), 2),
        "server_memory_mib": memory,
        "span_weights_mib": span_weights_mib(model_path, preset["spans"]),
        "server_interpreter_baseline_mib": interpreter_baseline_mib(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
