"""Server memory before and after a flood of inference sessions, and who still gets served.

Starts one real server of a tiny model on 127.0.0.1, reads its resident memory (VmRSS of the server
process), then has --peers clients each try to open --attempts sessions (each stepping a few tokens and
holding them open). Reports sessions accepted and refused per peer, the server's memory at the peak of the
flood and after the sessions end, and whether a fresh peer is still served during the flood.

    python benchmarks/session_flood.py --peers 4 --attempts 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petals_cli.client import SwarmClient  # noqa: E402
from petals_cli.config import ClientConfig  # noqa: E402
from petals_cli.errors import CacheExhaustedError  # noqa: E402
from petals_cli.testing import make_tiny_model  # noqa: E402
from petals_cli.testing.swarm import Swarm  # noqa: E402
from tests.swarm.raw import open_session, peer_id_of  # noqa: E402

PREFIX = "tiny-flood"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--attempts", type=int, default=100, help="sessions each peer tries to open")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="petals-flood-"))
    model = make_tiny_model(workdir / PREFIX, "llama", num_layers=2)
    swarm = Swarm(model=model, workdir=workdir)
    try:
        server = swarm.start(":")
        pid, peer = server.process.pid, peer_id_of(server)
        config = ClientConfig(initial_peers=tuple(swarm.initial_peers))
        time.sleep(2)
        before = rss_mib(pid)
        clients, held, per_peer = [SwarmClient(config) for _ in range(args.peers)], [], []
        for client in clients:
            accepted = refused = 0
            for _ in range(args.attempts):
                try:
                    session = client.run(open_session(client.stub(peer), PREFIX, 2, args.max_length), timeout=60)
                except CacheExhaustedError:  # the per-peer cap (PeerLimitError) or the whole budget
                    refused += 1
                    continue
                client.run(session.step(torch.randn(1, 8, 64)), timeout=60)
                held.append((client, session))
                accepted += 1
            per_peer.append({"accepted": accepted, "refused": refused})
        peak = rss_mib(pid)
        fresh = SwarmClient(config)
        try:
            session = fresh.run(open_session(fresh.stub(peer), PREFIX, 2, 16), timeout=60)
            fresh.run(session.step(torch.randn(1, 4, 64)), timeout=60)
            fresh.run(session.end(), timeout=60)
            fresh_served = True
        except CacheExhaustedError:
            fresh_served = False
        finally:
            fresh.close()
        for client, session in held:
            client.run(session.end(), timeout=60)
        time.sleep(2)
        after = rss_mib(pid)
        for client in clients:
            client.close()
        report = {
            "peers": args.peers,
            "attempts_per_peer": args.attempts,
            "sessions": per_peer,
            "server_rss_mib": {"before": round(before, 1), "flood_peak": round(peak, 1), "after": round(after, 1)},
            "fresh_peer_served_during_flood": fresh_served,
            "server_alive": server.process.poll() is None,
        }
        print(json.dumps(report, indent=2))
    finally:
        swarm.stop()


if __name__ == "__main__":
    main()
