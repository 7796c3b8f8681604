"""A server as slow as a given device, for tests and benchmarks only: ``petals serve`` whose answers are paced.

    python -m petals_cli.testing.paced [--device fast-gpu|slow-gpu|laptop] [--overhead-ms MS] [--block-ms MS] \\
        [--token-ms MS] [--batch-capacity N] [--place-at UNIX_TIME] [--slow-on-usr1 FACTOR] \\
        -- MODEL [other options of `petals serve`]

It computes its real blocks (its outputs are exact), then, on the compute thread, waits out whatever is left of the
time the device model gives that call: a paced server sleeps instead of computing, so tens of them fit on a few
cores and a swarm of them measures coordination rather than this machine. The device model (``DeviceModel``), for
one call of the compute thread over ``blocks`` blocks computing ``tokens`` tokens in all (a batch of eight
one-token steps: 8; a 100-token prompt: 100)::

    seconds = passes * (overhead_ms + blocks * (block_ms + token_ms * tokens)) / 1000

``overhead_ms`` is paid once per call (launches, the Python around them), ``block_ms`` once per block (reading its
weights: what a one-token step is bound by on a GPU), ``token_ms`` per token per block (arithmetic). A batch of
one-token steps thus costs little more than one step while ``token_ms`` is small next to ``block_ms``, and a prompt
costs its length. ``passes`` is 1 for inference steps and forwards, 2 for a backward. The step engine forms
batches of at most ``batch_capacity`` sessions (and never more than a real server's ``engine.MAX_BATCH``). Context
length and memory are left out. The server measures its throughput at start under this pacing (never cached,
so unpaced servers of the same model keep their own figure) and announces it. Like ``tamper`` and ``faulty``, it
patches this process only and is never a flag of ``petals serve``.

``--place-at`` (servers placed with ``--blocks auto`` or ``N``) makes the server read the swarm to choose its blocks
at that wall-clock moment instead of after its random start delay: joiners given one moment decide at once, as
servers of a swarm started together can, which is what the placement's claims must settle. ``--slow-on-usr1 F``: on
SIGUSR1 every time of the device model is multiplied by F from then on (a server that gets slow while serving:
another job on its GPU, throttling); its announced throughput stays what it measured at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from petals_cli.testing.tamper import OneLineParser, _finite, serve


@dataclass(frozen=True)
class DeviceModel:
    """How long a device takes for one call of the compute thread (see the module's docstring)."""

    overhead_ms: float
    block_ms: float
    token_ms: float
    batch_capacity: int = 8

    def __post_init__(self):
        if min(self.overhead_ms, self.block_ms, self.token_ms) < 0 or self.batch_capacity < 1:
            raise ValueError(f"times must be >= 0 and the batch capacity >= 1: {self}")

    def seconds(self, blocks: int, tokens: int, passes: int = 1) -> float:
        """The time of one call over ``blocks`` blocks computing ``tokens`` tokens (all its sessions' rows)."""
        return passes * (self.overhead_ms + blocks * (self.block_ms + self.token_ms * tokens)) / 1000

    def inference_rps(self) -> float:
        """The one-token steps per second through one block that a paced server measures and announces
        (``throughput.measure`` times its first block alone)."""
        return 1.0 / self.seconds(1, 1)

    def forward_rps(self, tokens: int) -> float:
        """Tokens per second through one block in a forward of ``tokens`` tokens."""
        return tokens / self.seconds(1, tokens)


# Illustrative numbers for one block of a 7B-class model in 16-bit (about 0.4 GB of weights, 0.4 GFLOP per token):
# a data-centre GPU (~1.5 TB/s), a consumer or older GPU (~300 GB/s), a laptop's CPU (~50 GB/s, ~0.5 TFLOP/s).
PRESETS = {
    "fast-gpu": DeviceModel(overhead_ms=1.0, block_ms=0.3, token_ms=0.003, batch_capacity=8),
    "slow-gpu": DeviceModel(overhead_ms=2.0, block_ms=1.5, token_ms=0.02, batch_capacity=4),
    "laptop": DeviceModel(overhead_ms=5.0, block_ms=10.0, token_ms=1.0, batch_capacity=2),
}


class Pacer:
    """Runs a call, then waits (never spins) until the device model's time for it has passed since it began."""

    def __init__(
        self,
        device: DeviceModel,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
    ):
        self.device, self.clock, self.sleep = device, clock, sleep

    def run(self, function: Callable[[], Any], blocks: int, tokens: int, passes: int = 1) -> Any:
        started = self.clock()
        result = function()
        left = self.device.seconds(blocks, tokens, passes) - (self.clock() - started)
        if left > 0:
            self.sleep(left)  # the compute thread waits; a failed call raised above and is not paced
        return result


def _tokens(hidden) -> int:
    return hidden.shape[0] * hidden.shape[1]  # [batch rows, new tokens, hidden]


class _PacedSpan:
    """A span whose calls ``span(hidden, start, end, ...)`` are paced: what ``throughput.measure`` times."""

    def __init__(self, span, pacer: Pacer):
        self._span, self._pacer = span, pacer

    def __getattr__(self, name: str):
        return getattr(self._span, name)

    def __call__(self, hidden, start: int, end: int, *args, **kwargs):
        call = functools.partial(self._span, hidden, start, end, *args, **kwargs)
        return self._pacer.run(call, end - start, _tokens(hidden))


def install(pacer: Pacer) -> None:
    """Patch this process: `SpanCompute`'s calls paced, the engine's batches capped, its throughput measured paced."""
    from petals_cli.server import host
    from petals_cli.server.compute import SpanCompute
    from petals_cli.server.engine import StepEngine
    from petals_cli.server.throughput import Throughput, measure

    run_group, forward, backward = SpanCompute.run_group, SpanCompute.forward, SpanCompute.backward

    @functools.wraps(run_group)
    def paced_run_group(self, group):
        start, end = group[0].blocks  # a group shares its blocks (engine.plan)
        tokens = sum(_tokens(job.hidden) for job in group)
        return pacer.run(lambda: run_group(self, group), end - start, tokens)

    @functools.wraps(forward)
    def paced_forward(self, hidden, request, *args, **kwargs):
        blocks = request.end_block - request.start_block
        return pacer.run(lambda: forward(self, hidden, request, *args, **kwargs), blocks, _tokens(hidden))

    @functools.wraps(backward)
    def paced_backward(self, hidden, grad_output, request, *args, **kwargs):
        blocks = request.end_block - request.start_block
        call = functools.partial(backward, self, hidden, grad_output, request, *args, **kwargs)
        return pacer.run(call, blocks, _tokens(hidden), passes=2)

    SpanCompute.run_group, SpanCompute.forward, SpanCompute.backward = paced_run_group, paced_forward, paced_backward

    engine_init = StepEngine.__init__

    @functools.wraps(engine_init)
    def capped_init(self, *args, **kwargs):
        engine_init(self, *args, **kwargs)
        self.max_batch = min(self.max_batch, pacer.device.batch_capacity)

    StepEngine.__init__ = capped_init

    def paced_throughput(span, key: str, *, network_rps: float = 0.0, refresh: bool = False) -> Throughput:
        """Measured at every start, under pacing, and never read from or written to the cache (``key``'s entry
        is an unpaced server's figure)."""
        measured = measure(_PacedSpan(span, pacer))
        return dataclasses.replace(measured, network_rps=network_rps)

    host.get_throughput = paced_throughput


def slow_on_usr1(pacer: Pacer, factor: float) -> None:
    """Patch this process: SIGUSR1 makes ``pacer``'s device ``factor`` times slower (each signal again)."""

    def slow_down(signum, frame):
        device = pacer.device
        scaled = {name: getattr(device, name) * factor for name in ("overhead_ms", "block_ms", "token_ms")}
        pacer.device = dataclasses.replace(device, **scaled)
        print(f"PACED server slowed down: {pacer.device}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, slow_down)


def place_at(moment: float) -> None:
    """Patch this process: placement reads the swarm at the wall-clock ``moment`` (at once if it has passed)."""
    from petals_cli.server import placement

    placement.start_delay = lambda max_delay: max(0.0, moment - time.time())


def apply(options: Options, pacer: Pacer) -> None:
    if options.place_at is not None:
        place_at(options.place_at)
    if options.slow_on_usr1 is not None:
        slow_on_usr1(pacer, options.slow_on_usr1)


def _milliseconds(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a time >= 0")
    return value


def _capacity(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a batch capacity >= 1")
    return value


@dataclass(frozen=True)
class Options:
    place_at: float | None = None
    slow_on_usr1: float | None = None


def _factor(text: str) -> float:
    value = _finite(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a slow-down factor >= 1")
    return value


def parse(argv: list[str]) -> tuple[DeviceModel, list[str], Options]:
    """The device model (a preset, with any number given explicitly in its place), the arguments of `petals
    serve` (what follows ``--``) and the other options."""
    parser = OneLineParser(
        prog="python -m petals_cli.testing.paced",
        usage="%(prog)s [--device NAME] [--overhead-ms MS] [--block-ms MS] [--token-ms MS] [--batch-capacity N] "
        "[--place-at UNIX_TIME] [--slow-on-usr1 FACTOR] -- MODEL [SERVE OPTIONS]",
        description="For tests and benchmarks only: run `petals serve` no faster than a given device. A call of "
        "the compute thread over B blocks and T tokens takes at least overhead + B x (block + T x token) ms "
        "(twice that for a backward).",
    )
    parser.add_argument(
        "--device",
        choices=sorted(PRESETS),
        default="slow-gpu",
        help="preset (default slow-gpu); the numbers given below replace its own",
    )
    parser.add_argument("--overhead-ms", type=_milliseconds, metavar="MS", help="fixed cost of every call")
    parser.add_argument("--block-ms", type=_milliseconds, metavar="MS", help="cost per block of a one-token step")
    parser.add_argument("--token-ms", type=_milliseconds, metavar="MS", help="cost per block of each token computed")
    parser.add_argument("--batch-capacity", type=_capacity, metavar="N", help="the most sessions in a batched step")
    parser.add_argument(
        "--place-at", type=_finite, metavar="UNIX_TIME", help="choose blocks at this moment (simultaneous joiners)"
    )
    parser.add_argument("--slow-on-usr1", type=_factor, metavar="FACTOR", help="SIGUSR1 makes it FACTOR times slower")
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    serve_args = argv[split + 1 :]
    if not serve_args:
        parser.error("give the arguments of `petals serve` after -- (MODEL and its options, without `serve`)")
    given = {
        name: getattr(options, name)
        for name in ("overhead_ms", "block_ms", "token_ms", "batch_capacity")
        if getattr(options, name) is not None
    }
    other = Options(place_at=options.place_at, slow_on_usr1=options.slow_on_usr1)
    return dataclasses.replace(PRESETS[options.device], **given), serve_args, other


def main(argv: list[str] | None = None) -> None:
    device, serve_args, options = parse(sys.argv[1:] if argv is None else argv)
    pacer = Pacer(device)
    install(pacer)
    apply(options, pacer)
    print(f"PACED server: {device}", file=sys.stderr, flush=True)
    serve(serve_args)


if __name__ == "__main__":
    main()
