"""The GPU check: a Llama-3-8B-shaped model through a two-server swarm on one GPU, against local transformers.

    bash benchmarks/gpu_check.sh                      # on the device machine (see gpu_check.sh for the call)
    bash benchmarks/gpu_check.sh --device cpu --small # the same flow here, tiny and float32

gpu_check.sh installs what the image lacks, then runs this. Stages, each recorded in summary.json as it ends:

    environment  versions and the CUDA device
    model        ``python -m petals_cli.testing make-model``: random weights and a local tokenizer, nothing fetched
    <dtype>      two ``petals serve`` processes on 127.0.0.1 splitting the blocks, both on the one device; greedy
                 tokens and logits through the swarm against local transformers on the same device; local eager
                 decode speed next to ``petals bench``
    float32      the same checkpoint served and run in float32, the exact check (skipped when short of time)

Exit status: 0 every check passed; 1 tokens differ or a stage failed; 3 the checks passed, but only with the
client's local modules on the CPU (on the GPU they failed: see each stage's ``client_errors``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# As the `petals` CLI does for its peers: spinning OpenMP threads of co-located processes starve each other on
# the CPU (the dry run's local decode measured 10 steps/s instead of 300 on 2 cores without this).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import gpu_measure as measure  # noqa: E402  (beside this file)
import torch  # noqa: E402

from petals_cli.testing.swarm import Swarm, even_spans  # noqa: E402

LLAMA3_8B = dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
# make-model draws every weight on one CPU core: 20-35 s per billion parameters on the development machine (2 shared
# cores), so all 32 layers (8.0 B) would take 3-5 minutes, 16 layers (4.5 B, 9 GB in bfloat16) 1.5-2.5.
DEFAULT_LAYERS = 16
SMALL = dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=176, vocab=512)
# Seconds of the budget a stage needs to be worth starting.
NEEDS_S = {"local_decode": 15, "petals_bench": 60, "float32": 100}
LOG_TAIL_BYTES = 4 * 2**20
LOGIT_EXCESS_NOTED = 5  # swarm-vs-local logit difference over the local model's own rounding scale worth a note


class Check:
    """The run's clock, its summary (saved after every stage) and the problems found so far."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.started = out, budget_s, time.monotonic()
        self.summary: dict = {"problems": [], "notes": []}
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("servers-*.log"):  # an earlier run's, where OUT is not emptied between runs
            stale.unlink()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def problem(self, message: str) -> None:
        if len(message) > 2000:  # a server's log in an error: its head says what, its tail says why
            message = f"{message[:500]} [...] {message[-1500:]}"
        self.log(f"PROBLEM: {message}")
        self.summary["problems"].append(message)

    def note(self, message: str) -> None:
        self.log(message)
        self.summary["notes"].append(message)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")


def environment(device: str) -> dict:
    import hivemind
    import transformers

    import petals_cli

    found = dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__)
    found.update(hivemind=hivemind.__version__, petals=petals_cli.__version__, torch_cuda=torch.version.cuda)
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        found.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1))
        found.update(capability=f"{properties.major}.{properties.minor}", sms=properties.multi_processor_count)
    return found


def make_model(path: Path, shape: dict, dtype: str) -> dict:
    command = [sys.executable, "-m", "petals_cli.testing", "make-model", str(path), "--family", "llama3", "--reuse"]
    for option in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab"):
        command += [f"--{option.replace('_', '-')}", str(shape[option])]
    command += ["--dtype", dtype, "--shards", str(min(4, shape["layers"]))]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    size = sum(file.stat().st_size for file in path.glob("*.safetensors")) / 1e9
    return dict(shape, dtype=dtype, path=str(path), seconds=round(seconds, 1), size_gb=round(size, 3))


def swarm_stage(check: Check, model: dict, dtype: str, args, client_devices: list[str], speed: bool) -> dict:
    """Serve the model on two processes in ``dtype``; compare with local transformers; with ``speed``, time both.

    The stage's record is ``check.summary[dtype]``, filled as it goes; it is also returned."""
    path, spans = Path(model["path"]), even_spans(model["layers"], 2)
    workdir = Path(tempfile.mkdtemp(prefix=f"petals-gpu-check-{dtype}-"))
    swarm, local = Swarm(model=path, workdir=workdir), None
    server_options = ("--device", args.device, "--dtype", dtype)
    check.summary[dtype] = stage = dict(servers=spans, client_errors={})  # kept, however far the stage gets
    try:
        started = time.perf_counter()
        first = swarm.start(spans[0], *server_options, wait=False)
        local = measure.load_local(path, dtype, args.device)  # while the first server loads
        swarm.wait_ready(first)
        second = swarm.start(spans[1], *server_options, wait=False)
        prompt = torch.randint(4, model["vocab"], (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
        reference = measure.local_reference(local, prompt, args.device, args.new_tokens)
        swarm.wait_ready(second)
        stage["servers_ready_after_s"] = ready = round(time.perf_counter() - started, 1)
        check.log(f"{dtype}: servers {' and '.join(spans)} on {args.device} up after {ready} s, reference computed")
        peers = swarm.initial_peers
        for client_device in client_devices:
            try:
                stage["comparison"] = measure.through_swarm(path, peers, client_device, dtype, prompt, reference)
                stage["client_device"] = client_device
                break
            except Exception as error:  # recorded; the next device is tried
                traceback.print_exc()
                stage["client_errors"][client_device] = repr(error)[:500]
                check.log(f"{dtype}: client with its local modules on {client_device} failed: {error!r}"[:300])
        if "comparison" not in stage:
            raise RuntimeError(f"no client could generate through the swarm: {stage['client_errors']}")
        comparison = stage["comparison"]
        check.log(
            f"{dtype}: tokens equal {comparison['tokens_equal']}, max |logit diff| generate "
            f"{comparison['generate_max_abs_logit_diff']:.3g}, forward {comparison['forward_max_abs_logit_diff']:.3g}"
        )
        servers = {server.process.pid: server.blocks for server in swarm.servers}
        stage["server_gpu_mib"] = measure.gpu_memory_mib(servers)
        if speed:
            _measure_speed(check, stage, local, model, path, peers, dtype, args)
    finally:
        swarm.stop()
        for index, server in enumerate(swarm.servers):
            if server.log_file.exists():
                log = server.log_file.read_bytes()[-LOG_TAIL_BYTES:]
                (check.out / f"servers-{dtype}-{index}.log").write_bytes(log)
        shutil.rmtree(workdir, ignore_errors=True)
        del local
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return stage


def _measure_speed(check: Check, stage: dict, local, model: dict, path: Path, peers, dtype: str, args) -> None:
    timing = dict(seq_len=args.bench_seq_len, new_tokens=args.bench_tokens, repeats=args.repeats)
    if check.left() < NEEDS_S["local_decode"]:
        check.note(f"{dtype}: local decode speed skipped: {check.left():.0f} s of the budget left")
    else:
        stage["local"] = measure.local_decode(local, model["vocab"], args.device, **timing)
        check.log(f"{dtype}: local eager decode {stage['local']}")
    if check.left() < NEEDS_S["petals_bench"]:
        check.note(f"{dtype}: petals bench skipped: {check.left():.0f} s of the budget left")
        return
    try:
        client_device, timeout = stage["client_device"], max(check.left(), NEEDS_S["petals_bench"])
        stage["bench"] = measure.petals_bench(path, peers, client_device, dtype, timing, timeout=timeout)
        check.log(f"{dtype}: petals bench {stage['bench']}")
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:
        check.problem(f"{dtype}: petals bench failed: {error}")


def judge(check: Check, dtype: str) -> None:
    """Tokens must be equal. A bfloat16 divergence passes only at a near tie (the local model's top two logits
    closer than twice its own cached-vs-uncached difference) with float32 tokens equal. Logit differences far
    above that rounding scale are noted, not failed: the figure is reported, the tokens are the test."""
    exact = check.summary.get("float32", {}).get("comparison")
    for name in dict.fromkeys((dtype, "float32")):
        comparison = check.summary.get(name, {}).get("comparison")
        if comparison is None:
            continue
        noise = comparison["local_cached_vs_uncached_diff"]
        excess = comparison["forward_max_abs_logit_diff"] / max(noise, 1e-6)
        if excess > LOGIT_EXCESS_NOTED and comparison["forward_rel_logit_diff"] > 1e-3:
            check.note(
                f"{name}: max |logit diff| through the swarm is {excess:.0f}x the local model's own cached-vs-"
                f"uncached difference ({comparison['forward_max_abs_logit_diff']:.3g} vs {noise:.3g}): not rounding"
            )
        if comparison["tokens_equal"]:
            continue
        divergence = comparison["divergence"]
        where = f"step {divergence['step']} (local top-two margin {divergence['local_margin']:.3g}, noise {noise:.3g})"
        if name != "float32" and exact and exact["tokens_equal"] and divergence["local_margin"] <= 2 * noise:
            check.note(f"{name}: tokens diverge at a near tie, {where}; float32 tokens equal: rounding")
        else:
            check.problem(f"{name}: tokens through the swarm differ from local transformers from {where}")


def run(check: Check, args) -> None:
    shape = dict(SMALL if args.small else LLAMA3_8B, layers=args.layers or (4 if args.small else DEFAULT_LAYERS))
    dtype = args.dtype or ("float32" if args.small else "bfloat16")
    check.summary["environment"] = environment(args.device)
    check.log(f"environment {check.summary['environment']}")
    check.save()
    name = f"llama3-{shape['layers']}x{shape['hidden']}-v{shape['vocab']}-{dtype}"
    check.summary["model"] = model = make_model(Path(args.models_dir) / name, shape, dtype)
    rate = f" ({model['seconds'] / model['size_gb']:.1f} s/GB)" if model["size_gb"] >= 0.1 else ""
    check.log(f"model {name}: {model['size_gb']} GB made in {model['seconds']} s{rate}")
    if not args.small and shape["layers"] < LLAMA3_8B["layers"]:
        check.note(f"model: {shape['layers']} of Llama-3-8B's {LLAMA3_8B['layers']} layers at full width")
    check.save()
    client_devices = (args.client_devices or f"{args.device},cpu").split(",")
    stages = [(dtype, True)] + ([("float32", False)] if dtype != "float32" else [])
    for stage_dtype, speed in stages:
        if stage_dtype != dtype and check.left() < NEEDS_S["float32"]:
            check.note(f"float32: skipped, {check.left():.0f} s of the budget left")
            continue
        try:
            stage = swarm_stage(check, model, stage_dtype, args, client_devices, speed)
            client_devices = [stage["client_device"]]  # don't retry a failed one
        except Exception as error:  # one failed stage must not hide the next one's
            traceback.print_exc()
            check.problem(f"{stage_dtype}: {error!r}")
        check.save()
    judge(check, dtype)


def report(summary: dict, status: int, out: Path) -> None:
    """The human summary: the last lines of the output."""
    verdict = {0: "PASSED", 1: "FAILED", 3: "PASSED, client on the CPU only"}[status]
    lines = [f"== petals GPU check: {verdict} (exit {status}) in {summary.get('elapsed_s')} s =="]
    found = summary.get("environment", {})
    lines.append(
        f"device       {found.get('gpu', 'cpu')}, torch {found.get('torch')} (CUDA {found.get('torch_cuda')}), "
        f"transformers {found.get('transformers')}, hivemind {found.get('hivemind')}, Python {found.get('python')}"
    )
    if model := summary.get("model"):
        lines.append(
            f"model        llama3, {model['layers']} layers, hidden {model['hidden']}, vocab {model['vocab']}, "
            f"{model['dtype']}: {model['size_gb']} GB made in {model['seconds']} s"
        )
    for name in [key for key in ("bfloat16", "float16", "float32") if key in summary]:
        stage = summary[name]
        compared = stage.get("comparison", {})
        if compared:
            tokens = "yes" if compared["tokens_equal"] else f"NO, from step {compared['first_divergence']}"
            generate, forward = compared["generate_max_abs_logit_diff"], compared["forward_max_abs_logit_diff"]
            relative, own = compared["forward_rel_logit_diff"], compared["local_cached_vs_uncached_diff"]
            lines.append(
                f"{name:<12} tokens equal: {tokens}; max |logit diff| generate {generate:.3g}, forward {forward:.3g} "
                f"(relative {relative:.2g}; local cached vs uncached {own:.3g}); client on {stage['client_device']}"
            )
        if "local" in stage or "bench" in stage:
            local, bench = stage.get("local", {}), stage.get("bench", {})
            local_steps, swarm_steps = local.get("inference_steps_per_s"), bench.get("inference_steps_per_s")
            ratio = f" ({swarm_steps / local_steps:.2f}x local)" if local_steps and swarm_steps else ""
            first_local, first_swarm = local.get("time_to_first_token_s"), bench.get("time_to_first_token_s")
            lines.append(
                f"{'speed':<12} decode steps/s: local eager {local_steps}, petals bench {swarm_steps}{ratio}; "
                f"time to first token: local {first_local} s, swarm {first_swarm} s"
            )
        for device, error in stage.get("client_errors", {}).items():
            lines.append(f"{'client':<12} on {device} FAILED: {error[:200]}")
    lines += [f"note         {note}" for note in summary["notes"]]
    lines += [f"PROBLEM      {problem[:300]}" for problem in summary["problems"]] or ["problems     none"]
    lines.append(f"out          {out} (summary.json, gpu_check.log, servers-*.log)")
    print("\n".join(lines), flush=True)


def parse_args():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device of the servers and the local model")
    parser.add_argument("--small", action="store_true", help="a tiny model, float32 by default (a dry run)")
    parser.add_argument("--layers", type=int, help=f"decoder layers (default {DEFAULT_LAYERS}; --small: 4)")
    dtypes = ("bfloat16", "float16", "float32")
    parser.add_argument("--dtype", choices=dtypes, help="default bfloat16; --small: float32")
    parser.add_argument("--client-devices", help="devices for the client's local modules, tried in turn (DEVICE,cpu)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, help="greedy tokens compared (default 32; --small: 16)")
    parser.add_argument("--bench-seq-len", type=int, help="prompt of the speed runs (default 64; --small: 16)")
    parser.add_argument("--bench-tokens", type=int, help="tokens per speed run (default 64; --small: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed speed runs, after one warm-up")
    parser.add_argument("--budget-s", type=float, help="seconds for the whole check (default 330; --small: 900)")
    temporary = Path(tempfile.gettempdir())
    parser.add_argument("--models-dir", default=str(temporary / "petals-gpu-check-models"))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(temporary / "petals-gpu-check"))
    args = parser.parse_args()
    small = args.small
    args.new_tokens = args.new_tokens or (16 if small else 32)
    args.bench_seq_len = args.bench_seq_len or (16 if small else 64)
    args.bench_tokens = args.bench_tokens or (16 if small else 64)
    args.budget_s = args.budget_s or (900.0 if small else 330.0)
    return args


def main() -> int:
    args = parse_args()
    check = Check(Path(args.out), args.budget_s)
    check.summary["arguments"] = vars(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so that the stages' `finally` stops the servers
    try:
        run(check, args)
    except Exception as error:  # recorded in the summary, which is written whatever happens
        traceback.print_exc()
        check.problem(f"{error!r}")
    except KeyboardInterrupt:
        check.problem("interrupted")
    fallback = any(check.summary.get(name, {}).get("client_errors") for name in ("bfloat16", "float16", "float32"))
    status = 1 if check.summary["problems"] else 3 if fallback else 0
    check.summary["status"] = status
    check.save()
    report(check.summary, status, check.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
