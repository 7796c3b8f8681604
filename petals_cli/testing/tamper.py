"""A server that lies, for tests and benchmarks only: ``petals serve`` with its outputs altered on purpose.

    python -m petals_cli.testing.tamper --mode noise|zero|shift [--probability P] [--scale S] [--seed N] \\
        [--attract] -- MODEL [other options of `petals serve`]

Everything after ``--`` is what would follow the word ``serve`` (the word itself is not repeated). This module
patches ``SpanCompute`` of this process only, so that each output tensor (an inference step's, alone or per job of
a batch, a forward's, and the gradient of the hidden states a backward returns) is altered with probability P,
then runs ``petals serve`` in-process exactly as ``python -m petals_cli.commands serve ...`` would. A step whose
prompt is computed in chunks is tampered chunk by chunk. It is never a flag of ``petals serve``: the serving code
knows nothing about it, and a production install has no reason to run it.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import runpy
import sys
import threading
from dataclasses import dataclass, field

import torch

MODES = ("noise", "zero", "shift")
DEFAULT_SCALE = 0.05


@dataclass
class Tampering:
    """What to do to outputs, and its own random stream (seeded, so a run can be repeated)."""

    mode: str
    probability: float = 1.0
    scale: float = DEFAULT_SCALE
    seed: int = 0
    attract: bool = False  # announce an inflated throughput (see ``attract``)
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def maybe(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor itself, or with probability P a tampered copy (same shape and dtype)."""
        with self._lock:
            if self._rng.random() >= self.probability:
                return tensor
            noise_seed = self._rng.getrandbits(63)
        return tampered(tensor, self.mode, self.scale, noise_seed)


@torch.no_grad()
def tampered(tensor: torch.Tensor, mode: str, scale: float, noise_seed: int = 0) -> torch.Tensor:
    """A new tensor: ``tensor`` with noise of std ``scale`` x its RMS added, its last position zeroed, or
    ``scale`` added to every element. The input is left as it was."""
    if mode == "noise":
        values = tensor.float()
        generator = torch.Generator(device=tensor.device).manual_seed(noise_seed)
        noise = torch.randn(values.shape, generator=generator, device=tensor.device, dtype=values.dtype)
        rms = values.pow(2).mean().sqrt()
        return (values + noise * (scale * rms)).to(tensor.dtype)
    if mode == "zero":
        result = tensor.clone()
        result[..., -1, :] = 0  # every row's last token, all hidden dims
        return result
    if mode == "shift":
        return tensor + scale
    raise ValueError(f"unknown tampering mode {mode!r}")


def attract(factor: float = 100.0) -> None:
    """Announce ``factor`` times the measured throughput, as a server fishing for traffic would: routes prefer it."""
    import dataclasses

    from petals_cli.server import host

    measured = host.get_throughput

    @functools.wraps(measured)
    def inflated(*args, **kwargs):
        real = measured(*args, **kwargs)
        return dataclasses.replace(
            real,
            inference_rps=real.inference_rps * factor,
            forward_rps=real.forward_rps * factor,
            network_rps=real.network_rps * factor,
        )

    host.get_throughput = inflated


def install(tampering: Tampering) -> None:
    """Patch ``SpanCompute`` (this process only) so that what it returns passes through ``tampering``."""
    from petals_cli.server.compute import SpanCompute

    run_group, forward, backward = SpanCompute.run_group, SpanCompute.forward, SpanCompute.backward

    @functools.wraps(run_group)
    def tampered_run_group(self, group):
        return [tampering.maybe(output) for output in run_group(self, group)]  # each job decided on its own

    @functools.wraps(forward)
    def tampered_forward(self, *args, **kwargs):
        return [tampering.maybe(output) for output in forward(self, *args, **kwargs)]

    @functools.wraps(backward)
    def tampered_backward(self, *args, **kwargs):
        hidden_grad, *others = backward(self, *args, **kwargs)
        return [tampering.maybe(hidden_grad), *others]

    SpanCompute.run_group, SpanCompute.forward, SpanCompute.backward = (
        tampered_run_group,
        tampered_forward,
        tampered_backward,
    )


class OneLineParser(argparse.ArgumentParser):
    """A testing server's options: a bad one is one line and exit code 2, like every bad option of `petals`."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (hint: `{self.prog} -h` lists the options)\n")


def _probability(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def parse(argv: list[str]) -> tuple[Tampering, list[str]]:
    """The tampering and the arguments of `petals serve` (what follows ``--``)."""
    parser = OneLineParser(
        prog="python -m petals_cli.testing.tamper",
        usage="%(prog)s --mode {noise,zero,shift} [--probability P] [--scale S] [--seed N] [--attract] -- MODEL "
        "[SERVE OPTIONS]",
        description="For tests and benchmarks only: run `petals serve` with its outputs altered on purpose.",
    )
    parser.add_argument("--mode", required=True, choices=MODES, help="add noise, zero the last position, or shift")
    parser.add_argument("--probability", type=_probability, default=1.0, help="chance per output (default 1)")
    parser.add_argument("--scale", type=_finite, default=DEFAULT_SCALE, help="noise std x RMS, or the shift")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tampering's own random stream")
    parser.add_argument("--attract", action="store_true", help="announce 100x its throughput, so routes prefer it")
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    serve_args = argv[split + 1 :]
    if not serve_args:
        parser.error("give the arguments of `petals serve` after -- (MODEL and its options, without `serve`)")
    tampering = Tampering(options.mode, options.probability, options.scale, options.seed, options.attract)
    return tampering, serve_args


def main(argv: list[str] | None = None) -> None:
    tampering, serve_args = parse(sys.argv[1:] if argv is None else argv)
    install(tampering)
    if tampering.attract:
        attract()
    print(
        f"TAMPERING server: mode={tampering.mode}, probability={tampering.probability}, "
        f"scale={tampering.scale}, seed={tampering.seed}",
        file=sys.stderr,
        flush=True,
    )
    serve(serve_args)


def serve(serve_args: list[str]) -> None:
    """Run `petals serve` with ``serve_args`` in this process, as ``python -m petals_cli.commands serve`` would
    (run as `-m` runs it, so that the core imports nothing of the CLI: tests/unit/test_layering.py)."""
    sys.argv = ["petals", "serve", *serve_args]
    runpy.run_module("petals_cli.commands", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
