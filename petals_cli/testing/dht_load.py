"""A real DHT holding many announced servers, to measure how reading the swarm and announcing scale (testing only).

``python -m petals_cli.testing.dht_load --records 1000 --announcers 4 --dht-peers 20`` starts, on this machine:

- plain DHT peers: ``--dht-peers`` hivemind DHT nodes in server mode, each on its own libp2p daemon,
  ``--peers-per-process`` of them to a process (a node waits nearly all the time; a Python process each would
  cost a torch import each); the first node is the bootstrap peer the others join through;
- ``--announcers`` processes, each owning a share of the records' identities: RSA keys in hivemind's identity file
  format (kept in ``--keys-dir``, so that later runs skip generating them), loaded with ``security.Identity`` as a
  server loads its own. Each record is a plausible ``ServerInfo`` (a span of the model, a throughput, ONLINE) plus
  the server's model index entry, signed by its own key with ``security.PeerRecordValidator.sign_value``: the bytes
  a server's DHT node stores. The storing nodes check every record as they would a server's.

One difference from a server, on purpose: an announcer finds the nodes nearest to each key once per period and
stores its records there in batches, where each server's ``announce_server`` runs its own lookup. 1,000 lookups per
period would measure this machine's 2 cores, not the DHT (``benchmarks/dht_scale.py`` times one real announce).

Prints one JSON line when every record is stored (initial peers, process ids), then re-announces every
``--period`` seconds until SIGTERM or SIGINT, and stops its children. Each peer process writes
``peers-N.json`` into ``--status-dir`` (its pid, its daemons' pids, records each node holds) every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from petals_cli.wire import MODEL_INDEX_KEY, ModelIndexEntry, ServerInfo, ServerState, servers_key

STORE_BATCH = 100  # records per store RPC (a real server stores one)
STATUS_EVERY = 3.0  # seconds between a peer process's status files
SPAN_LENGTHS = (4, 8, 10, 16, 20, 32, 40)


def plausible_info(index: int, num_blocks: int, seed: int = 0) -> ServerInfo:
    """The record of load server ``index``: a span of the model and a load, fixed by ``index`` and ``seed``."""
    rng = random.Random(seed * 1_000_003 + index)
    length = min(rng.choice(SPAN_LENGTHS), num_blocks)
    start = rng.randrange(0, num_blocks - length + 1)
    return ServerInfo(
        state=ServerState.ONLINE,
        start_block=start,
        end_block=start + length,
        version="load",
        dtype="bfloat16",
        cache_tokens_left=rng.choice((8192, 16384, 32768)),
        public_name=f"load-{index}",
        throughput=round(rng.lognormvariate(3.0, 0.8), 3),
        inference_rps=round(rng.uniform(50, 500), 3),
        forward_rps=round(rng.uniform(500, 5000), 3),
        batch_capacity=8,
        sessions_per_peer=8,
    )


def identity_paths(keys_dir: Path, first: int, count: int) -> list[Path]:
    """Identity files ``first .. first + count - 1``, generating those missing (hivemind's 2048-bit RSA)."""
    from hivemind.p2p import P2P

    keys_dir.mkdir(parents=True, exist_ok=True)
    paths = [keys_dir / f"server-{index}.key" for index in range(first, first + count)]
    for path in paths:
        if not path.exists():
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            P2P.generate_identity(str(partial))
            partial.replace(path)
    return paths


# --- processes -----------------------------------------------------------------------------------------------


async def _run_peers(args) -> None:
    from hivemind.dht.routing import DHTID

    from petals_cli import daemon
    from petals_cli.dht import start_dht

    stop = _stop_event()
    initial = list(args.initial_peers)
    pairs = []
    for _ in range(args.count):
        p2p = await daemon.create_p2p("127.0.0.1", initial_peers=initial)
        pairs.append((p2p, await start_dht(p2p, initial, client_mode=False)))
        if not initial:  # this process started the swarm: the others join through its first node
            initial = [str(addr) for addr in await p2p.get_visible_maddrs()]
    _ready({"initial_peers": initial})
    watched = [DHTID.generate(source=key) for key in (servers_key(args.prefix), MODEL_INDEX_KEY)]
    status = Path(args.status_dir) / f"peers-{args.index}.json"
    while not stop.is_set():
        held = [[_held(node, key) for key in watched] for _, node in pairs]
        daemons = [p2p._child.pid for p2p, _ in pairs if p2p._child is not None]
        text = json.dumps({"pid": os.getpid(), "daemon_pids": daemons, "held": held})
        status.with_suffix(".tmp").write_text(text)
        status.with_suffix(".tmp").replace(status)
        await _wait(stop, STATUS_EVERY)
    for p2p, node in pairs:
        await node.shutdown()
        await p2p.shutdown()


def _held(node, key_id) -> int:
    item = node.protocol.storage.get(key_id)
    return 0 if item is None or not hasattr(item.value, "items") else len(list(item.value.items()))


async def _run_announcer(args) -> None:
    from petals_cli import daemon, security
    from petals_cli.dht import start_dht

    stop = _stop_event()
    first = args.index * args.count
    identities = [
        security.Identity.load_or_create(str(p)) for p in identity_paths(Path(args.keys_dir), first, args.count)
    ]
    signers = {identity.peer_id: security.PeerRecordValidator(identity) for identity in identities}
    infos = {
        identity.peer_id: plausible_info(first + n, args.num_blocks, args.seed)
        for n, identity in enumerate(identities)
    }
    p2p = await daemon.create_p2p("127.0.0.1", initial_peers=args.initial_peers, client_mode=True)
    node = await start_dht(p2p, args.initial_peers, client_mode=True)
    entry = ModelIndexEntry(model=f"load/{args.prefix}", num_blocks=args.num_blocks, family="llama")
    told = False
    while not stop.is_set():
        started = time.monotonic()
        stored = await announce_all(node, args.prefix, infos, entry, signers, expiration=max(2.5 * args.period, 10.0))
        if not told:
            _ready({"stored": stored, "records": len(infos)})
            told = True
        await _wait(stop, args.period - (time.monotonic() - started))
    await node.shutdown()
    await p2p.shutdown()


async def announce_all(node, prefix: str, infos: dict, entry: ModelIndexEntry, signers: dict, *, expiration: float):
    """Store every server's record and model index entry on the nodes nearest to each key; the number of records
    that reached at least one node."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import get_dht_time

    keys = {servers_key(prefix): lambda peer: peer, MODEL_INDEX_KEY: lambda peer: f"{prefix}:{peer}"}
    key_ids = {key: DHTID.generate(source=key) for key in keys}
    nearest = await node.find_nearest_nodes(list(key_ids.values()), k_nearest=node.num_replicas, exclude_self=True)
    serializer, expires = node.protocol.serializer, get_dht_time() + expiration
    stored: set[str] = set()
    for key, subkey_of in keys.items():
        key_id = key_ids[key]
        subkeys, values = [], []
        for peer, info in infos.items():
            value = info.to_wire() if key != MODEL_INDEX_KEY else entry.to_wire()
            record = DHTRecord(key_id.to_bytes(), serializer.dumps(subkey_of(peer)), serializer.dumps(value), expires)
            subkeys.append(subkey_of(peer))
            values.append(signers[peer].sign_value(record))
        for start in range(0, len(values), STORE_BATCH):
            batch = slice(start, start + STORE_BATCH)
            results = await asyncio.gather(
                *(
                    node.protocol.call_store(
                        peer_id, [key_id] * len(values[batch]), values[batch], expires, subkeys[batch]
                    )
                    for peer_id in nearest[key_id].values()
                )
            )
            for result in results:
                if key == servers_key(prefix) and result is not None:
                    stored.update(peer for peer, ok in zip(list(infos)[batch], result, strict=True) if ok)
    return len(stored)


def _stop_event() -> asyncio.Event:
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))


def _ready(message: dict) -> None:
    print(json.dumps(message), flush=True)


# --- the coordinator ------------------------------------------------------------------------------------------


def _child(role: str, args, index: int, count: int, initial_peers: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "petals_cli.testing.dht_load", "--role", role, "--index", str(index)]
    command += ["--count", str(count), "--prefix", args.prefix, "--num-blocks", str(args.num_blocks)]
    command += ["--period", str(args.period), "--keys-dir", args.keys_dir, "--status-dir", args.status_dir]
    command += ["--seed", str(args.seed), "--initial-peers", *initial_peers]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _read_ready(process: subprocess.Popen, what: str) -> dict:
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} (pid {process.pid}) exited before it was ready")
    return json.loads(line)


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts differing by at most one (no zeros)."""
    parts = max(1, min(parts, total))
    return [total // parts + (index < total % parts) for index in range(parts)]


def run_load(args) -> None:
    Path(args.status_dir).mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    try:
        peer_counts = shares(args.dht_peers, -(-args.dht_peers // args.peers_per_process))
        children.append(_child("peers", args, 0, peer_counts[0], []))
        initial = _read_ready(children[0], "the first DHT peer process")["initial_peers"]
        children += [_child("peers", args, n, count, initial) for n, count in enumerate(peer_counts[1:], 1)]
        for process in children[1:]:
            _read_ready(process, "a DHT peer process")
        peer_processes = list(children)
        announcers = [
            _child("announcer", args, n, count, initial)
            for n, count in enumerate(shares(args.records, args.announcers))
        ]
        children += announcers
        stored = sum(_read_ready(process, "an announcer")["stored"] for process in announcers)
        _ready(
            {
                "initial_peers": initial,
                "prefix": args.prefix,
                "num_blocks": args.num_blocks,
                "records": args.records,
                "stored": stored,
                "dht_peers": args.dht_peers,
                "peer_pids": [process.pid for process in peer_processes],
                "announcer_pids": [process.pid for process in announcers],
            }
        )
        while not stop and all(process.poll() is None for process in children):
            time.sleep(0.5)
    finally:
        for process in children:
            if process.poll() is None:
                process.terminate()
        for process in children:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000, help="servers announced")
    parser.add_argument("--announcers", type=int, default=4, help="processes announcing them")
    parser.add_argument("--dht-peers", type=int, default=20, help="plain DHT nodes forming the DHT")
    parser.add_argument("--peers-per-process", type=int, default=5)
    parser.add_argument("--prefix", default="load-model")
    parser.add_argument("--num-blocks", type=int, default=80)
    parser.add_argument("--period", type=float, default=30.0, help="seconds between re-announces (as servers)")
    parser.add_argument("--keys-dir", default=str(Path.home() / ".cache" / "petals" / "dht-load-keys"))
    parser.add_argument("--status-dir", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--role", choices=("load", "peers", "announcer"), default="load", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.status_dir:
        import tempfile

        args.status_dir = tempfile.mkdtemp(prefix="petals-dht-load-")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "peers":
        asyncio.run(_run_peers(args))
    elif args.role == "announcer":
        asyncio.run(_run_announcer(args))
    else:
        run_load(args)


if __name__ == "__main__":
    main()
