"""Measurements of one model through a swarm and locally: exactness (tokens, logits) and decode speed.

Used by gpu_check.py, which owns the stages, the time budget and the report; nothing here knows about them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def gpu_memory_mib(pids: dict[int, str]) -> dict[str, float]:
    """GPU memory of each process as nvidia-smi reports it, by span ({} where it shows no processes)."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        lines = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in lines:
        pid, _, used = (part.strip() for part in line.partition(","))
        if pid.isdigit() and int(pid) in pids:
            found[pids[int(pid)]] = float(used)
    return found


def load_local(path: Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device).eval()


def local_reference(model, prompt: torch.Tensor, device: str, new_tokens: int) -> dict:
    tokens, step_logits = greedy(model, prompt.to(device), new_tokens)
    sequence = torch.cat([prompt, tokens[None]], dim=1)
    logits = forward_logits(model, sequence, device)
    # The same model's logits with and without its cache differ by rounding: the scale of a harmless difference.
    uncached = logits[prompt.shape[1] - 1 : -1]
    self_diff = float((step_logits - uncached).abs().max())
    return dict(tokens=tokens, step_logits=step_logits, sequence=sequence, logits=logits, self_diff=self_diff)


def greedy(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens [new_tokens] and the logits each step chose from [new_tokens, vocab], both on the CPU."""
    output = greedy_generate(model, input_ids, new_tokens, output_logits=True, return_dict_in_generate=True)
    return output.sequences[0, input_ids.shape[1] :].cpu(), torch.stack(output.logits, 1)[0].float().cpu()


def greedy_generate(model, input_ids: torch.Tensor, new_tokens: int, **options):
    """transformers' generate(), greedy, exactly ``new_tokens`` new tokens."""
    with torch.no_grad():
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            **options,
        )


def forward_logits(model, sequence: torch.Tensor, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model(sequence.to(device)).logits[0].float().cpu()


def compare(reference: dict, tokens: torch.Tensor, step_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """Tokens and logits through the swarm against the local ones; logits compared only where inputs agree."""
    differ = (tokens != reference["tokens"]).nonzero()
    first = int(differ[0]) if len(differ) else None
    shared = len(tokens) if first is None else first + 1  # step k's inputs are the same on both sides up to here
    step_diff = (step_logits[:shared] - reference["step_logits"][:shared]).abs().amax(dim=-1)
    forward_diff = (logits - reference["logits"]).abs()
    result = dict(
        tokens_equal=first is None,
        first_divergence=first,
        generate_max_abs_logit_diff=float(step_diff.max()),
        forward_max_abs_logit_diff=float(forward_diff.max()),
        forward_rel_logit_diff=float(forward_diff.max() / reference["logits"].abs().max()),
        forward_argmax_agreement=float((logits.argmax(-1) == reference["logits"].argmax(-1)).float().mean()),
        local_cached_vs_uncached_diff=reference["self_diff"],
        swarm_tokens=tokens.tolist(),
        local_tokens=reference["tokens"].tolist(),
    )
    if first is not None:
        local_token, swarm_token = int(reference["tokens"][first]), int(tokens[first])
        row = reference["step_logits"][first]
        result["divergence"] = dict(
            step=first,
            local_token=local_token,
            swarm_token=swarm_token,
            local_margin=float(row[local_token] - row[swarm_token]),  # how near a tie the local choice was
            logit_diff_there=float(step_diff[first]),
            largest_diff_before=float(step_diff[:first].max()) if first else 0.0,
        )
    return result


def through_swarm(path: Path, peers: list[str], client_device: str, dtype: str, prompt, reference: dict) -> dict:
    from petals_cli import AutoDistributedModelForCausalLM
    from petals_cli.config import ClientConfig

    config = ClientConfig(initial_peers=tuple(peers), device=client_device, dtype=dtype)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), config=config)
    try:
        tokens, step_logits = greedy(model, prompt.to(client_device), len(reference["tokens"]))
        logits = forward_logits(model, reference["sequence"], client_device)
    finally:
        model.close()
    return compare(reference, tokens, step_logits, logits)


class _Stamps:
    """A generate() streamer noting when each new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def local_decode(model, vocab: int, device: str, *, seq_len: int, new_tokens: int, repeats: int) -> dict:
    """Eager transformers generate() on ``device``, timed as ``petals bench`` times the swarm (same prompt)."""
    input_ids = torch.randint(4, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    steps, first_token, totals = [], [], []
    for repeat in range(repeats + 1):  # the first run warms up kernels and allocations
        stamps, started = _Stamps(), time.perf_counter()
        greedy_generate(model, input_ids, new_tokens, streamer=stamps)
        if repeat:
            first_token.append(stamps.times[0] - started)
            steps.append((len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0]))
            totals.append(new_tokens / (stamps.times[-1] - started))
    return dict(
        inference_steps_per_s=round(statistics.median(steps), 2),
        time_to_first_token_s=round(statistics.median(first_token), 4),
        tokens_per_s=round(statistics.median(totals), 2),
    )


def petals_bench(path: Path, peers: list[str], client_device: str, dtype: str, timing: dict, timeout: float) -> dict:
    """`petals bench --mode inference` medians, its client configured through PETALS_DEVICE and PETALS_DTYPE.

    ``timing``: seq_len, new_tokens, repeats, as ``local_decode`` takes them."""
    environment = {**os.environ, "PETALS_DEVICE": client_device, "PETALS_DTYPE": dtype}
    command = [sys.executable, "-m", "petals_cli.commands", "bench", str(path), "--mode", "inference", "--json"]
    command += ["--seq-len", str(timing["seq_len"]), "--new-tokens", str(timing["new_tokens"])]
    command += ["--repeats", str(timing["repeats"]), *(item for peer in peers for item in ("--initial-peers", peer))]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"petals bench exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: figure["median"] for name, figure in report["swarm"].items()}
