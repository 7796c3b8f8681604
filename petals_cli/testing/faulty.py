"""A server with faults that only time shows, for tests and benchmarks only: ``petals serve`` that hangs or lags.

    python -m petals_cli.testing.faulty [--hang-after N] [--hang-seconds S] [--push-ack-delay S] \\
        -- MODEL [other options of `petals serve`]

``--hang-after N``: the compute thread's N+1-th call blocks for ``--hang-seconds`` (default: for good) while the
process, its event loop and its RPCs stay up: a GPU driver that stopped answering. ``--push-ack-delay S``: a step
pushed to this server by the previous one is queued at once but acknowledged S seconds later, so that a pusher
that waits less gives up and its client relays the same step again. Like ``tamper``, it patches this process only
and is never a flag of ``petals serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import threading
from dataclasses import dataclass, field

from petals_cli.testing.tamper import _finite, serve


@dataclass
class Faults:
    hang_after: int | None = None  # compute calls that run normally before one hangs
    hang_seconds: float | None = None  # how long it hangs (None: until the process ends)
    push_ack_delay: float = 0.0
    _calls: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def before_compute(self) -> None:
        """On the compute thread, before each call: hang once the calls allowed have run."""
        with self._lock:
            self._calls += 1
            hang = self.hang_after is not None and self._calls == self.hang_after + 1
        if hang:
            print(f"FAULTY server: compute hangs at call {self._calls}", file=sys.stderr, flush=True)
            threading.Event().wait(self.hang_seconds)


def install(faults: Faults) -> None:
    from petals_cli.server.compute import SpanCompute
    from petals_cli.server.handler import BlockHandler

    for name in ("run_group", "forward", "backward"):
        original = getattr(SpanCompute, name)

        def faulty(self, *args, _original=original, **kwargs):
            faults.before_compute()
            return _original(self, *args, **kwargs)

        setattr(SpanCompute, name, functools.wraps(original)(faulty))

    if faults.push_ack_delay > 0:
        rpc_push = BlockHandler.rpc_push

        @functools.wraps(rpc_push)
        async def late_push(self, message, context):
            answer = await rpc_push(self, message, context)  # queued (or refused) now
            await asyncio.sleep(faults.push_ack_delay)
            return answer

        BlockHandler.rpc_push = late_push


def parse(argv: list[str]) -> tuple[Faults, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m petals_cli.testing.faulty",
        description="For tests and benchmarks only: run `petals serve` with a hanging compute thread or late pushes.",
    )
    parser.add_argument("--hang-after", type=int, help="compute calls that run before one hangs")
    parser.add_argument("--hang-seconds", type=_finite, help="how long that call hangs (default: for good)")
    parser.add_argument("--push-ack-delay", type=_finite, default=0.0, help="seconds before a push is acknowledged")
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    if not argv[split + 1 :]:
        parser.error("give the arguments of `petals serve` after -- (MODEL and its options, without `serve`)")
    return Faults(options.hang_after, options.hang_seconds, options.push_ack_delay), argv[split + 1 :]


def main(argv: list[str] | None = None) -> None:
    faults, serve_args = parse(sys.argv[1:] if argv is None else argv)
    install(faults)
    print(f"FAULTY server: {faults}", file=sys.stderr, flush=True)
    serve(serve_args)


if __name__ == "__main__":
    main()
