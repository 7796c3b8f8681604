"""A paced server that keeps meters of its own, for the scale benchmark (testing only).

    python -m petals_cli.testing.scale_server METER_FILE [options of testing.paced] -- MODEL [serve options]

It is ``python -m petals_cli.testing.paced`` plus, every ``PERIOD`` seconds, one JSON line appended to METER_FILE
with counters since the process started (a SIGKILLed server loses only its last period):

- ``busy_s``, ``calls``, ``rows``: the wall time of its paced calls of the compute thread (compute plus the device
  model's wait: the time the "device" was busy), how many and the tokens they computed. Utilisation over a window
  is the growth of ``busy_s`` over the window's length.
- ``rpc``: per unary RPC name (hivemind's ``DHTProtocol.rpc_find``, ``rpc_store``, ``rpc_ping``; petals' own unary
  calls such as pings and info), ``[calls made, bytes, calls answered, bytes]`` by this process, bytes being the
  protobuf request plus response. Counted at hivemind's P2P API, in this process: libp2p's framing, encryption and
  multiplexing, and whatever the libp2p daemon sends on its own, are not in it. Streams (inference) are not
  counted.

Nothing here changes what the server does; ``paced`` does the pacing, ``petals serve`` the rest.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from collections import defaultdict

from petals_cli.testing import paced

PERIOD = 5.0


class MeteredPacer(paced.Pacer):
    """A pacer that adds up the wall time, the calls and the tokens of what it paces."""

    def __init__(self, device: paced.DeviceModel):
        super().__init__(device)
        self.lock = threading.Lock()
        self.busy_s, self.calls, self.rows = 0.0, 0, 0

    def run(self, function, blocks: int, tokens: int, passes: int = 1):
        started = time.monotonic()
        try:
            return super().run(function, blocks, tokens, passes)
        finally:
            with self.lock:
                self.busy_s += time.monotonic() - started
                self.calls += 1
                self.rows += tokens


class RpcMeter:
    """Unary RPCs made and answered by this process, by name: ``[made, bytes, answered, bytes]``."""

    def __init__(self):
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])

    def note(self, name: str, outgoing: bool, size: int) -> None:
        entry = self.counts[name]
        entry[0 if outgoing else 2] += 1
        entry[1 if outgoing else 3] += size

    def install(self) -> None:
        """Wrap hivemind's P2P unary calls and unary handlers (the DHT's and petals' own)."""
        from hivemind.p2p import P2P

        call, add = P2P._call_unary_protobuf_handler, P2P._add_protobuf_unary_handler
        meter = self

        @functools.wraps(call)
        async def metered_call(self, peer_id, handle_name, input, output_protobuf_type):
            response = await call(self, peer_id, handle_name, input, output_protobuf_type)
            meter.note(handle_name, True, input.ByteSize() + response.ByteSize())
            return response

        @functools.wraps(add)
        async def metered_add(self, handle_name, handler, input_protobuf_type, balanced=False):
            async def metered_handler(request, context):
                response = await handler(request, context)
                meter.note(handle_name, False, request.ByteSize() + response.ByteSize())
                return response

            return await add(self, handle_name, metered_handler, input_protobuf_type, balanced=balanced)

        P2P._call_unary_protobuf_handler, P2P._add_protobuf_unary_handler = metered_call, metered_add


def write_meters(path: str, pacer: MeteredPacer, rpcs: RpcMeter, stop: threading.Event) -> None:
    """One line every ``PERIOD`` seconds until ``stop``, and one more then."""
    with open(path, "a") as meters:
        while True:
            stopping = stop.wait(PERIOD)
            with pacer.lock:
                line = {"at": time.time(), "busy_s": round(pacer.busy_s, 4), "calls": pacer.calls, "rows": pacer.rows}
            line["rpc"] = {name: list(entry) for name, entry in list(rpcs.counts.items())}
            meters.write(json.dumps(line) + "\n")
            meters.flush()
            if stopping:
                return


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    meter_file, argv = argv[0], argv[1:]
    device, serve_args, options = paced.parse(argv)
    pacer, rpcs, stop = MeteredPacer(device), RpcMeter(), threading.Event()
    paced.install(pacer)
    paced.apply(options, pacer)
    rpcs.install()
    writer = threading.Thread(target=write_meters, args=(meter_file, pacer, rpcs, stop), daemon=True)
    writer.start()
    print(f"PACED server (metered in {meter_file}): {device}", file=sys.stderr, flush=True)
    try:
        paced.serve(serve_args)
    finally:
        stop.set()
        writer.join(5)


if __name__ == "__main__":
    main()
