"""Benchmark runners: inference, forward and training throughput through the swarm, and locally.

``run_bench(config)`` optionally starts a local swarm, measures the distributed model, optionally measures
the same model in plain transformers (in a separate process, its best case: the faster of one thread or all
cores), and returns a ``BenchReport`` of medians with their spread, flagging figures whose runs disagree. Asked to
speculate, the swarm's inference runs draft tokens (a fresh ``Speculation`` per generate() run) and the report adds
how many drafts were kept and how many tokens a trip brought (the records: ``measurements``).
``on_phase`` hears what it is doing. Knows nothing about rendering.

Why the care: on a shared machine, one timed call of a few milliseconds is mostly scheduler noise, the first calls
pay for connections and allocations, and OpenMP threads that spin (torch's default) stall whenever another process
holds a core: the same local figure moved 10x within one run. So both sides' threads wait passively (as the peers'
do), everything warms up for a while, and every sample averages enough calls to last ``MIN_SAMPLE_SECONDS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from petals_cli.config import BenchConfig, ClientConfig
from petals_cli.measurements import BenchReport, Measurement, machine
from petals_cli.speculative import Speculation, SpeculationStats, load_draft_model

WARMUP_SECONDS = 1.0  # of calls after the first: a tiny model's swarm forward still sped up 1.5x over the first second
MIN_SAMPLE_SECONDS = 0.25  # each sample averages as many calls as fill this
T = TypeVar("T")


def _quiet(_: str) -> None:
    pass


class _TokenClock:
    """A generate() streamer that records when it was made, when each step's new tokens arrive and how many a row
    got (one in plain decoding; with speculation, a trip's accepted drafts and the model's own token)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
            self.tokens.append(value.shape[-1] if value.dim() > 1 else 1)
        self.prompt_seen = True

    def end(self):
        pass


def measure(
    model,
    config: BenchConfig,
    on_step: Callable[[str], None] = _quiet,
    speculate: Callable[[], Speculation] | None = None,
) -> dict[str, Measurement]:
    """Every figure ``config.mode`` asks for, measured on ``model`` (distributed or local, same API); inference
    with ``speculate()``'s fresh Speculation per generate() run when given (the distributed model only)."""
    input_ids = _input_ids(model, config)
    results: dict[str, Measurement] = {}
    modes = ("inference", "forward", "training") if config.mode == "all" else (config.mode,)
    if "inference" in modes:
        steps, speculated = _steps_per_second(model, input_ids, config, _prefixed("inference, ", on_step), speculate)
        if steps and speculate is None:  # one new token has no step after it
            results["inference_steps_per_s"] = Measurement.of("inference", "steps/s", steps)
        elif steps:  # a trip brings several tokens: tokens/s, what steps/s is in plain decoding
            results["inference_tokens_per_s"] = Measurement.of("inference, speculative", "tokens/s", steps)
        results.update(_speculation_figures(speculated))
        if config.sessions > 1:
            step = _prefixed(f"{config.sessions} sessions at once, ", on_step)
            rates, p50s, p95s = _concurrent_sessions(model, config, step, speculate)
            results["sessions_tokens_per_s"] = Measurement.of(f"{config.sessions} sessions at once", "tokens/s", rates)
            results["sessions_step_p50_ms"] = Measurement.of("their step latency, p50", "ms", p50s)
            results["sessions_step_p95_ms"] = Measurement.of("their step latency, p95", "ms", p95s)
        step = _prefixed("time to first token, ", on_step)
        seconds = _seconds_per_call(lambda: _first_token(model, input_ids), config.repeats, step, warmup=0.0)
        results["time_to_first_token_s"] = Measurement.of("time to first token", "s", seconds)
    tokens = config.batch_size * config.seq_len
    if "forward" in modes:
        step = _prefixed("forward, ", on_step)
        seconds = _seconds_per_call(lambda: _forward(model, input_ids), config.repeats, step)
        results["forward_tokens_per_s"] = Measurement.of("forward", "tokens/s", [tokens / t for t in seconds])
    if "training" in modes:
        step = _prefixed("training, ", on_step)
        seconds = _seconds_per_call(lambda: _training_step(model, input_ids), config.repeats, step)
        results["training_tokens_per_s"] = Measurement.of("training", "tokens/s", [tokens / t for t in seconds])
    return results


def _input_ids(model, config: BenchConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(4, vocab, (config.batch_size, config.seq_len), generator=generator)


def _steps_per_second(
    model,
    input_ids,
    config: BenchConfig,
    on_step: Callable[[str], None],
    speculate: Callable[[], Speculation] | None = None,
) -> tuple[list[float], list[SpeculationStats]]:
    """New tokens per second of each generate() run after the first (the prompt's prefill left out: that is time
    to first token), steps/s in plain decoding; with ``speculate``, also each measured run's speculation figures."""
    steps, speculated = [], []
    for repeat in range(config.repeats + 1):  # the first run warms up connections and caches
        on_step(f"run {repeat}/{config.repeats}" if repeat else "warming up")
        clock = _TokenClock()
        speculation = speculate() if speculate is not None else None
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=config.new_tokens,
            min_new_tokens=config.new_tokens,
            do_sample=False,
            streamer=clock,
            **({"speculation": speculation} if speculation is not None else {}),
        )
        if repeat and len(clock.times) > 1:
            steps.append(sum(clock.tokens[1:]) / (clock.times[-1] - clock.times[0]))
        if repeat and speculation is not None:
            speculated.append(speculation.stats)
    return steps, speculated


def _speculation_figures(speculated: list[SpeculationStats]) -> dict[str, Measurement]:
    """The share of drafts kept and the new tokens a trip brought, over measured runs (none without speculation)."""
    figures = {}
    acceptance = [stats.accepted / stats.drafted for stats in speculated if stats.drafted]
    if acceptance:
        figures["speculation_acceptance"] = Measurement.of("speculation, drafts accepted", "share", acceptance)
    per_trip = [stats.tokens / stats.trips for stats in speculated if stats.trips]
    if per_trip:
        figures["speculation_tokens_per_trip"] = Measurement.of("speculation, tokens per trip", "tokens", per_trip)
    return figures


def _concurrent_sessions(
    model, config: BenchConfig, on_step: Callable[[str], None], speculate: Callable[[], Speculation] | None = None
):
    """Per run: aggregate new tokens/s of ``config.sessions`` generate() calls at once (threads, each its own
    prompt and session; speculating with ``speculate``), and the 50th and 95th percentiles of their steps' (or
    trips') latency in ms."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    shape = (config.batch_size, config.seq_len)
    prompts = [torch.randint(4, vocab, shape, generator=generator) for _ in range(config.sessions)]
    rates, p50s, p95s = [], [], []
    for repeat in range(config.repeats + 1):  # the first run warms up
        on_step(f"run {repeat}/{config.repeats}" if repeat else "warming up")
        seconds, clocks = generate_at_once(model, prompts, config.new_tokens, speculate)
        gaps = sorted(b - a for clock in clocks for a, b in zip(clock.times, clock.times[1:], strict=False))
        if repeat and gaps:
            rates.append(len(prompts) * config.batch_size * config.new_tokens / seconds)
            p50s.append(1000 * gaps[len(gaps) // 2])
            p95s.append(1000 * gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))])
    return rates, p50s, p95s


def generate_at_once(
    model, prompts: list[torch.Tensor], new_tokens: int, speculate: Callable[[], Speculation] | None = None
) -> tuple[float, list[_TokenClock]]:
    """Greedy generate() of every prompt at the same time, one thread each (each with a fresh ``speculate()`` when
    given): wall seconds, and each one's clock."""
    clocks = [_TokenClock() for _ in prompts]

    def one(index: int) -> None:
        speculation = {"speculation": speculate()} if speculate is not None else {}
        prompt = prompts[index]
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clocks[index],
            **speculation,
        )

    seconds, _ = run_at_once(one, len(prompts))
    return seconds, clocks


def run_at_once(work: Callable[[int], T], count: int) -> tuple[float, list[T]]:
    """``work(0)`` ... ``work(count - 1)`` in threads started together: wall seconds and their results; the first
    error raised in a thread is raised here."""
    results: list = [None] * count
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as error:  # raised below, in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=one, args=(index,), daemon=True) for index in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, results


def _first_token(model, input_ids) -> None:
    """One token: a session opened (through the swarm), the prompt's prefill and one step."""
    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1, do_sample=False)


def _prefixed(prefix: str, on_step: Callable[[str], None]) -> Callable[[str], None]:
    return lambda step: on_step(prefix + step)


def _seconds_per_call(
    function, repeats: int, on_step: Callable[[str], None], *, warmup: float = WARMUP_SECONDS
) -> list[float]:
    """``repeats`` samples of the seconds one call takes, each averaged over at least ``MIN_SAMPLE_SECONDS`` of
    calls, after a first call and ``warmup`` seconds more of them."""
    on_step("warming up")
    function()
    if warmup > 0:
        _calls_filling(function, warmup)
    samples = []
    for repeat in range(1, repeats + 1):
        on_step(f"run {repeat}/{repeats}")
        calls, seconds = _calls_filling(function, MIN_SAMPLE_SECONDS)
        samples.append(seconds / calls)
    return samples


def _calls_filling(function, seconds: float) -> tuple[int, float]:
    """Call ``function`` until ``seconds`` have passed (once at least): how many calls, how long they took."""
    calls, started = 0, time.perf_counter()
    while True:
        function()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls, elapsed


@torch.no_grad()
def _forward(model, input_ids):
    model(input_ids)


def _training_step(model, input_ids):
    """Forward and backward to the inputs; the weights are frozen on both sides, as the swarm's blocks are."""
    embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    model(inputs_embeds=embeddings, labels=input_ids).loss.backward()


def run_bench(
    config: BenchConfig,
    client_config: ClientConfig,
    on_phase: Callable[[str], None] = _quiet,
    on_route_wait: Callable[[tuple[int, ...], float], None] | None = None,
    *,
    speculative: str = "",
    draft_tokens: int = 8,
    draft_model: str | None = None,
) -> BenchReport:
    """Measure through the swarm (starting a local one if asked), and locally when ``compare_local``.

    ``on_phase`` hears each phase in words; ``on_route_wait`` becomes the client's ``on_route_wait``. With
    ``speculative`` (a mode of ``petals_cli.speculative``; ``draft_model``: a path, for mode model) the swarm's
    inference runs speculate, at most ``draft_tokens`` drafts a trip, and the report's config says so."""
    from petals_cli.remote_model import AutoDistributedModelForCausalLM
    from petals_cli.testing.swarm import Swarm, even_spans

    report = BenchReport(model=config.model, config=asdict(config), machine=machine())
    swarm = None
    try:
        if config.local_swarm:
            from transformers import AutoConfig

            num_blocks = AutoConfig.from_pretrained(config.model).num_hidden_layers
            swarm = Swarm(model=Path(config.model), workdir=Path(tempfile.mkdtemp(prefix="petals-bench-")))
            report.servers = even_spans(num_blocks, config.local_swarm)
            on_phase(f"starting a local swarm of {len(report.servers)} servers")
            swarm.start_many(*report.servers)
            client_config = ClientConfig(**{**asdict(client_config), "initial_peers": tuple(swarm.initial_peers)})
        on_phase("loading the model and connecting to the swarm")
        model = AutoDistributedModelForCausalLM.from_pretrained(config.model, config=client_config)
        model.petals_client.on_route_wait = on_route_wait
        try:
            speculate, draft = None, None
            if speculative and draft_model:
                on_phase("loading the draft model")
                draft = load_draft_model(draft_model, model)
            if speculative:
                speculate = partial(Speculation, speculative, draft_tokens, draft)
                speculate()  # its checks of the settings, before anything is measured
                report.config.update(speculative=speculative, draft_tokens=draft_tokens, draft_model=draft_model)
            phase = _prefixed("measuring through the swarm: ", on_phase)
            report.swarm = measure(model, config, phase, speculate)
        finally:
            model.close()
    finally:
        if swarm is not None:
            on_phase("stopping the local swarm")
            swarm.stop()
    if config.compare_local:
        on_phase("measuring locally in transformers: loading the model")
        local_phase = _prefixed("measuring locally in transformers: ", on_phase)
        report.local, report.machine["local_torch_threads"] = _measure_locally(config, local_phase)
    return report


def _measure_locally(config: BenchConfig, on_step: Callable[[str], None]) -> tuple[dict[str, Measurement], int]:
    """``measure`` on plain transformers in a child process, which reports its steps as JSON lines; the figures
    and the torch threads it chose."""
    environment = dict(os.environ)
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the peers wait: spinning threads made local erratic
    command = [sys.executable, "-m", "petals_cli.bench", json.dumps(asdict(config))]
    result: dict = {}
    with tempfile.TemporaryFile() as errors:
        with subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=errors, text=True) as child:
            for line in child.stdout:
                try:
                    message = json.loads(line)
                except ValueError:  # not ours (a library printing to stdout)
                    continue
                if "step" in message:
                    on_step(message["step"])
                result.update(message)
        if child.returncode != 0 or "figures" not in result:
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
            raise subprocess.CalledProcessError(child.returncode, command, stderr=stderr)
    return {name: Measurement(**value) for name, value in result["figures"].items()}, result["threads"]


def _fastest_threads(model, input_ids) -> int:
    """Local's best case while threads wait passively: all cores, or one (a tiny model loses more waking threads
    than it gains from them: 2x on 2 cores). Picked by timing forward passes with each."""
    seconds_per_call = {}
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        _forward(model, input_ids)
        calls, seconds = _calls_filling(lambda: _forward(model, input_ids), MIN_SAMPLE_SECONDS)
        seconds_per_call[threads] = seconds / calls
    fastest = min(seconds_per_call, key=seconds_per_call.get)
    torch.set_num_threads(fastest)
    return fastest


def _local_main(config_json: str) -> None:
    from transformers import AutoModelForCausalLM

    def tell(**message) -> None:
        print(json.dumps(message), flush=True)

    config = BenchConfig(**json.loads(config_json))
    model = AutoModelForCausalLM.from_pretrained(config.model).eval().requires_grad_(False)
    tell(step="choosing the number of threads")
    threads = _fastest_threads(model, _input_ids(model, config))
    figures = measure(model, config, lambda step: tell(step=step))
    tell(threads=threads, figures={name: asdict(value) for name, value in figures.items()})


if __name__ == "__main__":
    _local_main(sys.argv[1])
