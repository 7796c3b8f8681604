"""Benchmark runners: inference, forward and training throughput through the swarm, and locally.

``run_bench(config)`` optionally starts a local swarm, measures the distributed model, optionally measures
the same model in plain transformers (in a separate process, with torch's default threading: local's best
case), and returns a ``BenchReport`` of medians with their spread. Knows nothing about rendering.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from petals_cli.config import BenchConfig, ClientConfig


@dataclass(frozen=True)
class Measurement:
    name: str
    unit: str
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, name: str, unit: str, samples: list[float]) -> Measurement:
        return cls(name, unit, round(statistics.median(samples), 4), round(min(samples), 4), round(max(samples), 4))


@dataclass
class BenchReport:
    model: str
    config: dict
    swarm: dict[str, Measurement] = field(default_factory=dict)
    local: dict[str, Measurement] = field(default_factory=dict)
    servers: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        """swarm / local for every figure measured both ways (for times, local / swarm: above 1 is better)."""
        ratios = {}
        for name, measured in self.swarm.items():
            if name in self.local and self.local[name].median > 0 and measured.median > 0:
                higher_is_better = measured.unit != "s"  # "s" = seconds: lower is better
                ratio = measured.median / self.local[name].median
                ratios[name] = round(ratio if higher_is_better else 1 / ratio, 3)
        return ratios

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "config": self.config,
            "servers": self.servers,
            "swarm": {name: asdict(value) for name, value in self.swarm.items()},
            "local": {name: asdict(value) for name, value in self.local.items()},
            "swarm_over_local": self.ratios(),
        }


class _TokenClock:
    """A generate() streamer that records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def measure(model, config: BenchConfig) -> dict[str, Measurement]:
    """Every figure ``config.mode`` asks for, measured on ``model`` (distributed or local, same API)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(4, vocab, (config.batch_size, config.seq_len), generator=generator)
    results: dict[str, Measurement] = {}
    modes = ("inference", "forward", "training") if config.mode == "all" else (config.mode,)
    if "inference" in modes:
        results.update(_inference(model, input_ids, config))
    tokens = config.batch_size * config.seq_len
    if "forward" in modes:
        times = [_timed(lambda: _forward(model, input_ids)) for _ in range(config.repeats + 1)][1:]
        results["forward_tokens_per_s"] = Measurement.of("forward", "tokens/s", [tokens / t for t in times])
    if "training" in modes:
        times = [_timed(lambda: _training_step(model, input_ids)) for _ in range(config.repeats + 1)][1:]
        results["training_tokens_per_s"] = Measurement.of("training", "tokens/s", [tokens / t for t in times])
    return results


def _inference(model, input_ids, config: BenchConfig) -> dict[str, Measurement]:
    steps, first_token = [], []
    for repeat in range(config.repeats + 1):  # the first run warms up connections and caches
        clock = _TokenClock()
        started = time.perf_counter()
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=config.new_tokens,
            min_new_tokens=config.new_tokens,
            do_sample=False,
            streamer=clock,
        )
        if repeat and len(clock.times) > 1:
            first_token.append(clock.times[0] - started)
            steps.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    return {
        "inference_steps_per_s": Measurement.of("inference", "steps/s", steps),
        "time_to_first_token_s": Measurement.of("time to first token", "s", first_token),
    }


@torch.no_grad()
def _forward(model, input_ids):
    model(input_ids)


def _training_step(model, input_ids):
    embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    model(inputs_embeds=embeddings, labels=input_ids).loss.backward()


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def run_bench(config: BenchConfig, client_config: ClientConfig) -> BenchReport:
    """Measure through the swarm (starting a local one if asked), and locally when ``compare_local``."""
    from petals_cli.remote_model import AutoDistributedModelForCausalLM
    from petals_cli.testing.swarm import Swarm, even_spans

    report = BenchReport(model=config.model, config=asdict(config))
    swarm = None
    try:
        if config.local_swarm:
            from transformers import AutoConfig

            num_blocks = AutoConfig.from_pretrained(config.model).num_hidden_layers
            swarm = Swarm(model=Path(config.model), workdir=Path(tempfile.mkdtemp(prefix="petals-bench-")))
            report.servers = even_spans(num_blocks, config.local_swarm)
            swarm.start_many(*report.servers)
            client_config = ClientConfig(**{**asdict(client_config), "initial_peers": tuple(swarm.initial_peers)})
        model = AutoDistributedModelForCausalLM.from_pretrained(config.model, config=client_config)
        try:
            report.swarm = measure(model, config)
        finally:
            model.close()
    finally:
        if swarm is not None:
            swarm.stop()
    if config.compare_local:
        report.local = _measure_locally(config)
    return report


def _measure_locally(config: BenchConfig) -> dict[str, Measurement]:
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    command = [sys.executable, "-m", "petals_cli.bench", json.dumps(asdict(config))]
    output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
    return {name: Measurement(**value) for name, value in json.loads(output).items()}


def _local_main(config_json: str) -> None:
    from transformers import AutoModelForCausalLM

    config = BenchConfig(**json.loads(config_json))
    model = AutoModelForCausalLM.from_pretrained(config.model).eval()
    print(json.dumps({name: asdict(value) for name, value in measure(model, config).items()}))


if __name__ == "__main__":
    _local_main(sys.argv[1])
