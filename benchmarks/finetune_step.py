"""Training step time through a local swarm vs the same training step run locally in transformers (+ peft).

    python benchmarks/finetune_step.py --preset midsize   # 12 layers, hidden 1024, 3 servers, batch 4 x 64
    python benchmarks/finetune_step.py --preset tiny      # the per-step overhead, 2 servers
    python benchmarks/finetune_step.py --preset midsize --method lora   # client-owned LoRA, r 8, q/v projections

One step = forward, backward and an AdamW update of deep_ptune prompts (pre_seq_len 16), or with ``--method lora``
of LoRA weights (``--lora-r``, q_proj and v_proj) that the client sends with every request. Locally the prompts
are added by forward pre-hooks on transformers' decoder layers, exactly as the servers add them; local LoRA is
peft's. Starts the
servers with `petals serve` on 127.0.0.1, measures, stops them, and prints one JSON object.

Local steps run in their own process (torch's default threading, its best case). Measurements alternate in
rounds: a block of local steps, then a block of swarm steps, each block back to back after one unmeasured
step, so that on a shared machine both see the same background load. Reported: medians of all measured
steps and their ratio, and the median of the per-round ratios.
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
    ),
    "tiny": dict(model=dict(num_layers=4), spans=("0:2", "2:4")),
}


def local_step(model, prefix, deep, optimizer, input_ids) -> float:
    """One local training step with the prompts; returns its loss."""
    embeddings = model.get_input_embeddings()(input_ids)
    hidden = torch.cat([prefix.unsqueeze(0).expand(input_ids.shape[0], -1, -1), embeddings], dim=1)
    handles = []
    for index, layer in enumerate(model.model.layers):

        def add(module, args, kwargs, prompt=deep[index]):
            states = args[0]
            states = torch.cat([states[:, : prompt.shape[0]] + prompt, states[:, prompt.shape[0] :]], dim=1)
            return (states, *args[1:]), kwargs

        handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        logits = model(inputs_embeds=hidden).logits[:, prefix.shape[0] :]
    finally:
        for handle in handles:
            handle.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def swarm_step(model, optimizer, input_ids) -> float:
    loss = model(input_ids=input_ids, labels=input_ids).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def timed_block(step, steps: int) -> list[float]:
    """One unmeasured step (wakes threads and caches after an idle spell), then ``steps`` timed ones."""
    step()
    return [timed(step) for _ in range(steps)]


def serve_local_steps(step) -> None:
    """The local process: for each number N read from stdin, a block of N timed steps, printed as JSON."""
    step()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(timed_block(step, int(line))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--method", choices=("deep_ptune", "lora"), default="deep_ptune")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="local block + swarm block, this many times")
    parser.add_argument("--models-dir", default=".models")
    parser.add_argument("--local-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from petals_cli import AutoDistributedModelForCausalLM
    from petals_cli.testing import ensure_tiny_model

    model_path = ensure_tiny_model(Path(args.models_dir) / f"bench-{args.preset}", "llama", **preset["model"])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 200, (args.batch_size, args.seq_len), generator=generator)

    if args.local_only and args.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"])
        local = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora)
        trainable = [parameter for parameter in local.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        serve_local_steps(lambda: swarm_step(local, optimizer, input_ids))  # the same step, on the local model
        return
    if args.local_only:
        local = AutoModelForCausalLM.from_pretrained(model_path).eval().requires_grad_(False)
        hidden_size, num_layers = local.config.hidden_size, local.config.num_hidden_layers
        prefix = torch.nn.Parameter(torch.randn(args.pre_seq_len, hidden_size) * 0.02)
        deep = torch.nn.Parameter(torch.zeros(num_layers, args.pre_seq_len, hidden_size))
        optimizer = torch.optim.AdamW([prefix, deep], lr=1e-2)
        serve_local_steps(lambda: local_step(local, prefix, deep, optimizer, input_ids))
        return
    local_env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    command = [sys.executable, __file__, "--local-only", *sys.argv[1:]]
    local = subprocess.Popen(command, env=local_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    swarm = Swarm(model=model_path, workdir=Path(tempfile.mkdtemp(prefix="petals-bench-")))
    try:
        assert local.stdout.readline().strip() == "ready", "the local process failed"
        swarm.start_many(*preset["spans"])
        tuning = dict(tuning_mode="deep_ptune", pre_seq_len=args.pre_seq_len)
        if args.method == "lora":
            tuning = dict(tuning_mode="lora", lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
        distributed = AutoDistributedModelForCausalLM.from_pretrained(
            str(model_path), initial_peers=swarm.initial_peers, **tuning
        )
        optimizer = torch.optim.AdamW(distributed.trainable_parameters(), lr=1e-2)
        swarm_step(distributed, optimizer, input_ids)  # warm-up: connections, routes
        local_times, swarm_times, round_ratios = [], [], []
        for _ in range(args.rounds):
            local.stdin.write(f"{args.repeats}\n")
            local.stdin.flush()
            local_block = json.loads(local.stdout.readline())
            swarm_block = timed_block(lambda: swarm_step(distributed, optimizer, input_ids), args.repeats)
            local_times += local_block
            swarm_times += swarm_block
            round_ratios.append(statistics.median(swarm_block) / statistics.median(local_block))
        distributed.close()
    finally:
        local.kill()
        swarm.stop()

    local_median, swarm_median = statistics.median(local_times), statistics.median(swarm_times)
    result = {
        "preset": args.preset,
        "servers": list(preset["spans"]),
        "batch": [args.batch_size, args.seq_len],
        **({"lora_r": args.lora_r} if args.method == "lora" else {"pre_seq_len": args.pre_seq_len}),
        "method": args.method,
        "local_step_s": round(local_median, 4),
        "swarm_step_s": round(swarm_median, 4),
        "swarm_over_local": round(swarm_median / local_median, 3),
        "round_ratios": [round(ratio, 3) for ratio in round_ratios],
        "local_times": [round(value, 4) for value in local_times],
        "swarm_times": [round(value, 4) for value in swarm_times],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
