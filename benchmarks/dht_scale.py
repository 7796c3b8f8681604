"""The DHT at 1,000 announced servers: what reading the swarm, `swarm status` and announcing cost.

Starts ``petals_cli.testing.dht_load`` (--records signed server records announced by --announcers processes on a DHT
of --dht-peers real hivemind nodes on this machine), then measures, from this process:

- a client's snapshot read (``dht.fetch_snapshot`` on a client's DHT node): seconds, bytes received, DHT RPCs;
- the client's snapshot as routing gets it (``SwarmClient.snapshot``: the read, then its liveness pings);
- ``collect_status`` in this process, and ``petals swarm status --json`` as a subprocess (wall time);
- one server's announce per period (``announce_server`` + ``announce_model`` on a server-mode node with its own
  identity, as ``server/announcer.py`` does), and the snapshot read its announcer makes to ping its next servers;
- the resident memory (VmRSS) of a DHT peer process whose nodes hold the records, and of one whose nodes do not.

Bytes are the protobuf sizes of the DHT requests and answers (libp2p framing not counted). The load's records
belong to no running server, so every ping to them fails: that is what a status of servers that all died would
meet, and what the pings cost at this scale.

    python benchmarks/dht_scale.py --records 1000 --dht-peers 20 --announcers 4 [--json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petals_cli import daemon, security  # noqa: E402
from petals_cli.client import SwarmClient  # noqa: E402
from petals_cli.config import ClientConfig  # noqa: E402
from petals_cli.dht import announce_model, announce_server, fetch_snapshot, start_dht  # noqa: E402
from petals_cli.swarm import collect_status  # noqa: E402
from petals_cli.testing.dht_load import plausible_info  # noqa: E402
from petals_cli.wire import ModelIndexEntry  # noqa: E402


class RpcMeter:
    """Counts the DHT RPCs one node sends and the protobuf bytes of their requests and answers."""

    def __init__(self, protocol):
        self.calls: Counter[str] = Counter()
        self.sent = self.received = 0
        stub_for = protocol.get_stub
        protocol.get_stub = lambda peer: _MeteredStub(stub_for(peer), self)

    def reset(self) -> None:
        self.calls.clear()
        self.sent = self.received = 0

    def reading(self) -> dict:
        return {
            "rpcs": sum(self.calls.values()),
            "by_rpc": dict(self.calls),
            "sent": self.sent,
            "received": self.received,
        }


class _MeteredStub:
    def __init__(self, stub, meter: RpcMeter):
        self._stub, self._meter = stub, meter

    def __getattr__(self, name):
        method = getattr(self._stub, name)

        async def call(request, *args, **kwargs):
            self._meter.calls[name] += 1
            self._meter.sent += request.ByteSize()
            response = await method(request, *args, **kwargs)
            self._meter.received += response.ByteSize()
            return response

        return call


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


SETTLE = 1.5  # seconds to let the RPCs a call left in flight answer: a lookup returns before all its requests do


def timed(client: SwarmClient, meter: RpcMeter, make, timeout: float = 600.0) -> tuple[dict, object]:
    meter.reset()
    started = time.perf_counter()
    result = client.run(make(), timeout=timeout)
    seconds = round(time.perf_counter() - started, 3)
    time.sleep(SETTLE)
    return {"seconds": seconds, **meter.reading()}, result


def median_of(readings: list[dict]) -> dict:
    middle = sorted(readings, key=lambda reading: reading["seconds"])[len(readings) // 2]
    return {**middle, "all_seconds": [reading["seconds"] for reading in readings]}


def measure_reads(client, meter, prefix: str, num_blocks: int, reads: int) -> dict:
    readings = []
    for _ in range(reads):
        reading, snapshot = timed(client, meter, lambda: fetch_snapshot(client.node, prefix, num_blocks))
        readings.append({**reading, "servers": len(snapshot.servers)})
    return median_of(readings)


def measure_client_snapshot(client, meter, prefix: str, num_blocks: int) -> dict:
    """The first read and pings of a client, then the next (a refresh); its background refreshes are stopped after,
    so that they do not count in what is measured next."""
    first, snapshot = timed(client, meter, lambda: client.snapshot(prefix, num_blocks, max_age=0.0))
    refresh, _ = timed(client, meter, lambda: client.snapshot(prefix, num_blocks, max_age=0.0))
    for task in client._refreshers.values():
        client.loop.call_soon_threadsafe(task.cancel)
    return {**first, "servers": len(snapshot.servers), "refresh": refresh}


def measure_status(peers: list[str], prefix: str) -> dict:
    """``collect_status`` on a fresh client, as `petals swarm status` runs it."""
    client = SwarmClient(ClientConfig(initial_peers=tuple(peers)))
    try:
        reading, status = timed(client, RpcMeter(client.node.protocol), lambda: collect_status(client))
    finally:
        client.close()
    servers = sum(len(model.servers) for model in status.models if model.prefix == prefix)
    states = Counter(server.state for model in status.models for server in model.servers)
    return {**reading, "servers": servers, "states": dict(states)}


def measure_cli_status(initial_peers: list[str], prefix: str) -> dict:
    command = [sys.executable, "-m", "petals_cli.commands", "swarm", "status", "--json", "--initial-peers"]
    started = time.perf_counter()
    done = subprocess.run(command + initial_peers, capture_output=True, text=True, timeout=900)
    seconds = round(time.perf_counter() - started, 3)
    servers = 0
    if done.returncode == 0:
        models = json.loads(done.stdout)["models"]
        servers = sum(len(model["servers"]) for model in models if model["prefix"] == prefix)
    return {"seconds": seconds, "exit_code": done.returncode, "servers": servers, "stderr": done.stderr[-300:]}


def measure_announce(client, initial_peers: list[str], prefix: str, num_blocks: int, periods: int) -> dict:
    """One server's DHT work per announce period: its two records, and the snapshot read before its pings."""
    identity = security.Identity.load_or_create(None)
    info = plausible_info(10**6, num_blocks)
    entry = ModelIndexEntry(model=f"load/{prefix}", num_blocks=num_blocks, family="llama")

    async def join():
        p2p = await daemon.create_p2p("127.0.0.1", initial_peers=initial_peers, identity_path=identity.path)
        return p2p, await start_dht(p2p, initial_peers, client_mode=False, identity=identity)

    p2p, node = client.run(join(), timeout=120)
    identity.discard_file()
    meter, peer = RpcMeter(node.protocol), p2p.peer_id.to_base58()

    async def announce():
        ok = await announce_server(node, prefix, peer, info, expiration=75.0)
        return await announce_model(node, prefix, peer, entry, expiration=75.0) and ok

    # as the announcer reads before pinging its next servers (the code before the fix read everything)
    advisory = {"first_found": True} if "first_found" in inspect.signature(fetch_snapshot).parameters else {}
    try:
        stores, reads = [], []
        for _ in range(periods):
            reading, ok = timed(client, meter, announce)
            stores.append({**reading, "stored": ok})
            reading, snapshot = timed(client, meter, lambda: fetch_snapshot(node, prefix, num_blocks, **advisory))
            reads.append({**reading, "servers": len(snapshot.servers)})
        return {"store": median_of(stores), "read": median_of(reads)}
    finally:
        client.run(node.shutdown(), timeout=30)
        client.run(p2p.shutdown(), timeout=30)


def measure_memory(status_dir: Path) -> dict:
    holders, idle = [], []
    for path in sorted(status_dir.glob("peers-*.json")):
        status = json.loads(path.read_text())
        held = max((node[0] for node in status["held"]), default=0)
        row = {"pid": status["pid"], "rss_mib": round(rss_mib(status["pid"]), 1), "nodes": len(status["held"])}
        row["held"] = held
        row["daemon_rss_mib"] = [round(rss_mib(pid), 1) for pid in status["daemon_pids"]]
        (holders if held else idle).append(row)
    return {"holding": holders, "not_holding": idle}


def report(result: dict) -> None:
    def row(what: str, reading: dict) -> str:
        size = f"{reading.get('received', 0) / 1e6:.2f} MB in, {reading.get('sent', 0) / 1e6:.2f} MB out"
        return f"{what:<44} {reading['seconds']:>8.2f} s  {reading.get('rpcs', '-'):>6} RPCs  {size}"

    load = result["load"]
    print(
        f"{load['records']} records ({load['stored']} stored), {load['dht_peers']} DHT peers,",
        f"setup {load['setup_s']} s",
    )
    print(
        row("fetch_snapshot (client node, median)", result["fetch_snapshot"]),
        f"{result['fetch_snapshot']['servers']} servers",
    )
    print(row("client snapshot: first read + pings", result["client_snapshot"]))
    print(row("client snapshot: a refresh (read + pings)", result["client_snapshot"]["refresh"]))
    print(row("collect_status (in process)", result["collect_status"]), result["collect_status"]["states"])
    cli = result["cli_status"]
    print(
        f"{'petals swarm status --json (subprocess)':<44} {cli['seconds']:>8.2f} s",
        f" exit {cli['exit_code']}, {cli['servers']} servers",
    )
    print(row("one announce: 2 records stored (median)", result["announce"]["store"]))
    print(row("one announce: its snapshot read (median)", result["announce"]["read"]))
    for kind, rows in result["memory"].items():
        for entry in rows[:3]:
            print(
                f"DHT peer process {kind}: pid {entry['pid']} ({entry['nodes']} nodes, {entry['held']} records)"
                f" {entry['rss_mib']} MiB; daemons {entry['daemon_rss_mib']} MiB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--dht-peers", type=int, default=20)
    parser.add_argument("--announcers", type=int, default=4)
    parser.add_argument("--peers-per-process", type=int, default=5)
    parser.add_argument("--reads", type=int, default=5, help="snapshot reads timed (median reported)")
    parser.add_argument("--periods", type=int, default=3, help="announces timed (median reported)")
    parser.add_argument("--skip-cli", action="store_true", help="do not run `petals swarm status` as a subprocess")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    status_dir = Path(tempfile.mkdtemp(prefix="petals-dht-scale-"))
    command = [sys.executable, "-m", "petals_cli.testing.dht_load", "--records", str(args.records)]
    command += ["--dht-peers", str(args.dht_peers), "--announcers", str(args.announcers)]
    command += ["--peers-per-process", str(args.peers_per_process), "--status-dir", str(status_dir)]
    started = time.perf_counter()
    load_process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    client = None
    try:
        load = json.loads(load_process.stdout.readline())
        load["setup_s"] = round(time.perf_counter() - started, 1)
        prefix, num_blocks, peers = load["prefix"], load["num_blocks"], load["initial_peers"]
        client = SwarmClient(ClientConfig(initial_peers=tuple(peers)))
        meter = RpcMeter(client.node.protocol)
        result = {"load": load, "fetch_snapshot": measure_reads(client, meter, prefix, num_blocks, args.reads)}
        result["collect_status"] = measure_status(peers, prefix)
        result["client_snapshot"] = measure_client_snapshot(client, meter, prefix, num_blocks)
        skipped = {"seconds": float("nan"), "exit_code": None, "servers": 0}
        result["cli_status"] = skipped if args.skip_cli else measure_cli_status(peers, prefix)
        result["announce"] = measure_announce(client, peers, prefix, num_blocks, args.periods)
        time.sleep(4)  # the peer processes' status files catch up
        result["memory"] = measure_memory(status_dir)
    finally:
        if client is not None:
            client.close()
        load_process.terminate()
        load_process.wait(60)
    if args.json:
        print(json.dumps(result))
    else:
        report(result)


if __name__ == "__main__":
    main()
