"""Joining the DHT, announcing servers, and reading the swarm into a ``SwarmSnapshot``.

The DHT node runs inside the caller's event loop on the caller's P2P daemon (no extra process).
One DHT key per model, ``servers_key(prefix)``; subkey = a server's peer id; value = its ``ServerInfo`` (its
span and load). A read of the swarm is one lookup, whatever the number of blocks: at 40 servers of a 48-block
model, the earlier layout (one key per block, each server's record under every block it holds) took 146 lookup
RPCs and 3.9 MB per read. Readers fall back to those per-block keys when a model has no server record (a swarm
of servers from before this layout). A model index key lists the models served (subkey = ``prefix:peer_id``).
Every record is signed by the server it names and checked by whoever stores or reads it
(``security.PeerRecordValidator``); records that fail that or fail to decode are dropped, never trusted. Pure
reading and writing: routing decisions live in ``routing.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence

import msgpack
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from petals_cli.errors import InvalidRequestError, SwarmUnreachableError
from petals_cli.security import (
    Identity,
    PeerRecordValidator,
    SwarmKey,
    SwarmKeyAuthorizer,
    blocks_stub,
    diagnose_refusal,
)
from petals_cli.wire import MODEL_INDEX_KEY, ModelIndexEntry, ServerInfo, SwarmSnapshot, block_uid, servers_key

logger = logging.getLogger(__name__)
# DHT nodes a read of the server records visits: twice the 5 that each record is stored on (hivemind's
# num_replicas), so that a node which missed a store, or a change among the nearest, costs no record
READ_BEAM = 10


async def start_dht(
    p2p: P2P,
    initial_peers: Sequence[str],
    *,
    client_mode: bool,
    swarm_key: SwarmKey | None = None,
    identity: Identity | None = None,
) -> DHTNode:
    """Start a DHT node on ``p2p``; fail with SwarmUnreachableError when no initial peer answers, or with
    SwarmKeyError when one refused this peer's swarm key (or its lack of one).

    Records are signed with ``identity`` (servers) and every record read or stored is checked against the
    peer id it names; with ``swarm_key`` every DHT message is authenticated with it.
    """
    authorizer = SwarmKeyAuthorizer(swarm_key)
    try:
        return await DHTNode.create(
            p2p=p2p,
            initial_peers=list(initial_peers),
            client_mode=client_mode,
            ensure_bootstrap_success=bool(initial_peers),
            num_workers=8,
            cache_locally=False,
            cache_nearest=0,
            record_validator=PeerRecordValidator(identity),
            authorizer=authorizer,
        )
    except Exception as exc:  # hivemind raises bare RuntimeErrors and daemon errors here
        await diagnose_refusal(p2p, initial_peers, authorizer)
        raise SwarmUnreachableError(f"cannot join the swarm through {', '.join(initial_peers)} ({exc})") from exc


async def rejoin(node: DHTNode, initial_peers: Sequence[str]) -> bool:
    """Ping the initial peers again; True when one answered. A node that lost every DHT peer (a partition, a
    restarted bootstrap peer) finds the swarm again this way, and a restarted bootstrap peer learns of this one."""

    async def ping(maddr: str) -> bool:
        with contextlib.suppress(Exception):
            return await node.protocol.call_ping(PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])) is not None
        return False

    return any(await asyncio.gather(*(ping(maddr) for maddr in initial_peers if "/p2p/" in maddr)))


async def announce_server(node: DHTNode, prefix: str, peer_id: str, info: ServerInfo, *, expiration: float) -> bool:
    """Store ``info`` as this server's one record of ``prefix`` (replacing its previous one, whatever its span);
    True when stored."""
    return await store_unread(node, servers_key(prefix), peer_id, info.to_wire(), get_dht_time() + expiration)


async def store_unread(node: DHTNode, key: str, subkey: str, value, expiration_time: float) -> bool:
    """Store one record (signed by ``node``'s validator) on the nodes nearest to ``key``, as ``node.store`` does, but
    without downloading what the key holds: hivemind finds those nodes by asking for the key itself, and each node
    that holds it answers with all of it (at 1,000 servers, about 1 MB from each of 5 nodes, 1,000 signatures to
    check in each, for every announce of every server). Asking for the key's id with its lowest bit flipped finds
    the same nodes (their XOR distances to both differ in that bit only, so both rank nodes alike), and no node
    holds a value there. True when at least one node stored it (False: none answered, or each held a newer one)."""
    key_id = DHTID.generate(source=key)
    client_mode = getattr(node.protocol, "client_mode", False)  # nobody asks a client for records
    found = await node.find_nearest_nodes(
        [DHTID(key_id ^ 1)], k_nearest=2 * node.num_replicas, exclude_self=client_mode
    )
    serializer = node.protocol.serializer
    record = DHTRecord(key_id.to_bytes(), serializer.dumps(subkey), serializer.dumps(value), expiration_time)
    validator = node.protocol.record_validator
    signed = record.value if validator is None else validator.sign_value(record)
    candidates = list(next(iter(found.values())).items())  # nearest first
    answered = stored = 0

    async def store_at(node_id: DHTID, peer: PeerID) -> bool | None:  # None: no answer
        if node_id == node.node_id:
            valid = validator is None or validator.validate(dataclasses.replace(record, value=signed))
            return valid and node.protocol.storage.store(key_id, signed, expiration_time, subkey=subkey)
        answer = await node.protocol.call_store(peer, [key_id], [signed], expiration_time, [subkey])
        return None if answer is None else bool(answer[0])

    while candidates and answered < node.num_replicas:  # nodes that did not answer: the next nearest instead
        wanted = node.num_replicas - answered
        tried, candidates = candidates[:wanted], candidates[wanted:]
        results = await asyncio.gather(*(store_at(node_id, peer) for node_id, peer in tried))
        answered += sum(result is not None for result in results)
        stored += sum(bool(result) for result in results)
    return stored > 0


async def announce_blocks(node: DHTNode, prefix: str, peer_id: str, info: ServerInfo, *, expiration: float) -> bool:
    """Store ``info`` under every block uid of its span, as servers did before ``announce_server`` (kept to
    make such servers in tests); True when every store succeeded."""
    uids = [block_uid(prefix, index) for index in range(info.start_block, info.end_block)]
    results = await node.store_many(
        uids, [info.to_wire()] * len(uids), get_dht_time() + expiration, subkeys=[peer_id] * len(uids)
    )
    return all(results.values())


async def announce_model(
    node: DHTNode, prefix: str, peer_id: str, entry: ModelIndexEntry, *, expiration: float
) -> bool:
    """Each server lists its model under its own subkey ``prefix:peer_id``, which only it can sign."""
    return await store_unread(
        node, MODEL_INDEX_KEY, f"{prefix}:{peer_id}", entry.to_wire(), get_dht_time() + expiration
    )


async def fetch_model_index(node: DHTNode) -> dict[str, ModelIndexEntry]:
    """Models served in the swarm: prefix -> entry (the newest of its servers' entries)."""
    found = await node.get(MODEL_INDEX_KEY, latest=True)
    models: dict[str, tuple[float, ModelIndexEntry]] = {}
    if found is not None and isinstance(found.value, dict):
        for subkey, item in found.value.items():
            prefix = str(subkey).rsplit(":", 1)[0]
            try:
                entry = ModelIndexEntry.from_wire(item.value)
            except InvalidRequestError:
                logger.debug("dropping a malformed model index entry for %s", prefix)
                continue
            if prefix not in models or item.expiration_time > models[prefix][0]:
                models[prefix] = (item.expiration_time, entry)
    return {prefix: entry for prefix, (_, entry) in models.items()}


async def fetch_snapshot(node: DHTNode, prefix: str, num_blocks: int, *, first_found: bool = False) -> SwarmSnapshot:
    """Read the model's server records (one lookup: the newest value of each record among the nodes nearest to the
    key, which are those that store it); a model without any is read block by block (servers of the earlier layout).
    A server's newest record wins. With ``first_found`` the lookup stops at the first node that holds records: a read
    for advice (which servers to ping), a fraction of the bytes (every node holding the key sends all of its records:
    about 1 MB each at 1,000 servers), that misses the servers whose last store that node missed."""
    if first_found:  # one request at a time, nearest first: parallel ones would each bring all the records anyway
        found = await node.get_many([servers_key(prefix)], sufficient_expiration_time=get_dht_time(), num_workers=1)
    else:
        found = await node.get_many(
            [servers_key(prefix)], sufficient_expiration_time=float("inf"), beam_size=READ_BEAM
        )
    servers: dict[str, tuple[float, ServerInfo]] = {}
    _collect(found.get(servers_key(prefix)), servers, num_blocks, prefix)
    if not servers:
        uids = [block_uid(prefix, index) for index in range(num_blocks)]
        found = await node.get_many(uids, sufficient_expiration_time=float("inf"))
        for uid in uids:
            _collect(found.get(uid), servers, num_blocks, uid)
    return SwarmSnapshot(
        prefix=prefix,
        num_blocks=num_blocks,
        servers={peer: info for peer, (_, info) in servers.items()},
        taken_at=get_dht_time(),
        expires={peer: expiration for peer, (expiration, _) in servers.items()},
    )


def _collect(entry, servers: dict[str, tuple[float, ServerInfo]], num_blocks: int, where: str) -> None:
    """Add the server records of one DHT value (a dictionary: peer id -> record) to ``servers``, keeping each
    server's newest; records that do not decode or name blocks outside the model are dropped."""
    if entry is None or not isinstance(entry.value, dict):
        return
    for peer_id, item in entry.value.items():
        try:
            info = ServerInfo.from_wire(item.value)
        except InvalidRequestError:
            logger.debug("dropping a malformed record of %s under %s", peer_id, where)
            continue
        if not 0 <= info.start_block < info.end_block <= num_blocks:
            continue
        if peer_id not in servers or item.expiration_time > servers[peer_id][0]:
            servers[peer_id] = (item.expiration_time, info)


async def probe_server(
    p2p: P2P, peer_id: str, swarm_key: SwarmKey | None, *, timeout: float
) -> tuple[float, ServerInfo | None] | None:
    """The round trip of an info RPC to ``peer_id`` in seconds, with the server's current record (its live load:
    fresher than its DHT record; None when the answer does not decode). None when the RPC fails, takes over
    ``timeout``, or the server says its compute thread is stalled (it answers, but would never compute a step)."""
    from hivemind.proto import runtime_pb2

    started = time.perf_counter()
    try:
        answer = await blocks_stub(p2p, peer_id, swarm_key).rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=timeout)
        rtt = time.perf_counter() - started
        data = msgpack.unpackb(answer.serialized_info, raw=False)
    except Exception:  # dead, hung, unreachable or garbled: the caller decides what that means
        return None
    if not isinstance(data, dict) or data.get("compute_stalled") is True:
        return None
    try:
        return rtt, ServerInfo.from_wire(data)
    except InvalidRequestError:  # alive, but its record is not one this client reads: the round trip still counts
        return rtt, None


async def ping_server(p2p: P2P, peer_id: str, swarm_key: SwarmKey | None, *, timeout: float) -> float | None:
    """The round trip of an info RPC to ``peer_id`` (see ``probe_server``); None when it failed."""
    probe = await probe_server(p2p, peer_id, swarm_key, timeout=timeout)
    return None if probe is None else probe[0]


async def unreachable_servers(
    p2p: P2P, snapshot: SwarmSnapshot, swarm_key: SwarmKey | None, *, timeout: float, own: str = ""
) -> set[str]:
    """Servers that ``snapshot`` shows online but that do not answer an info RPC within ``timeout``.

    A killed server's records outlive it until they expire; whoever reads the swarm to show it or to act on it
    asks the servers themselves. (Joining servers are not asked: their RPC handlers start once they have loaded.)
    """
    peers = [peer for peer in snapshot.online() if peer != own]
    rtts = await asyncio.gather(*(ping_server(p2p, peer, swarm_key, timeout=timeout) for peer in peers))
    return {peer for peer, rtt in zip(peers, rtts, strict=True) if rtt is None}
