"""A client's reads of the swarm: one that finds no server at all, soon after one that found some, is a failed read
(DHT lookups timing out under load) and the last snapshot stands; after ``EMPTY_READ_GRACE`` an empty swarm is
believed. The DHT is replaced by the reads it returns, in turn."""

import asyncio
import time

from petals_cli.client import swarm as client_swarm
from petals_cli.client.swarm import EMPTY_READ_GRACE, SwarmClient
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot


def snapshot(**servers):
    return SwarmSnapshot(prefix="m", num_blocks=4, servers=servers)


def test_an_empty_read_soon_after_a_full_one_keeps_the_full_one_then_an_old_one_gives_way(monkeypatch):
    full = snapshot(a=ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=4, version="t"))
    reads = [full, snapshot(), snapshot(), snapshot(b=full.servers["a"])]

    async def fetch(node, prefix, num_blocks):
        return reads.pop(0)

    monkeypatch.setattr(client_swarm, "fetch_snapshot", fetch)
    client = SwarmClient.__new__(SwarmClient)
    client.node, client._snapshots = None, {}
    assert asyncio.run(client._read_snapshot("m", 4)) is full
    assert asyncio.run(client._read_snapshot("m", 4)) is full  # a failed read: the last one stands
    read_at, kept = client._snapshots["m"]
    client._snapshots["m"] = (read_at - EMPTY_READ_GRACE - 1, kept)  # the last full read is now too old
    assert asyncio.run(client._read_snapshot("m", 4)).servers == {}  # believed: nobody serves any more
    assert set(asyncio.run(client._read_snapshot("m", 4)).servers) == {"b"}
    assert time.monotonic() - client._snapshots["m"][0] < 1
