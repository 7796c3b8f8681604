"""A client's reads of the swarm: a server that a read missed stays in the client's snapshot until its record
expires (DHT lookups time out under load and come back with some servers or none); a newer record replaces an
older one. ``SwarmSnapshot.merged_with`` alone, then through a client whose DHT is replaced by the reads it
returns, in turn."""

import asyncio

from hivemind.utils import get_dht_time

from petals_cli.client import swarm as client_swarm
from petals_cli.client.swarm import SwarmClient
from petals_cli.wire import ServerInfo, ServerState, SwarmSnapshot


def record(start=0, end=4, state=ServerState.ONLINE):
    return ServerInfo(state=state, start_block=start, end_block=end, version="t")


def snapshot(expiring_at: float = 0.0, **servers):
    return SwarmSnapshot(prefix="m", num_blocks=4, servers=servers, expires={peer: expiring_at for peer in servers})


def test_a_missed_server_stays_until_its_record_expires_and_a_newer_record_wins():
    older = snapshot(100.0, a=record(0, 2), b=record(2, 4))
    partial = snapshot(150.0, a=record(0, 4))  # a moved to 0:4; b's record was not found
    merged = partial.merged_with(older, now=90.0)
    assert merged.servers == {"a": record(0, 4), "b": record(2, 4)} and merged.expires == {"a": 150.0, "b": 100.0}
    assert set(partial.merged_with(older, now=100.5).servers) == {"a"}  # b's record has expired
    assert snapshot().merged_with(older, now=90.0).servers == older.servers  # an empty read: nobody is lost
    assert partial.merged_with(None, now=90.0) is partial
    leaving = snapshot(160.0, b=record(2, 4, ServerState.OFFLINE))  # a server that left says so in a newer record
    assert leaving.merged_with(older, now=90.0).servers["b"].state == ServerState.OFFLINE


def test_a_client_keeps_servers_that_its_reads_miss_until_their_records_expire(monkeypatch):
    now = get_dht_time()
    reads = [
        snapshot(now + 60, a=record(0, 2), b=record(2, 4)),
        snapshot(),  # a lookup that timed out everywhere
        snapshot(now + 60, a=record(0, 2)),  # one that missed b
        snapshot(now + 70, c=record(2, 4)),
    ]

    async def fetch(node, prefix, num_blocks):
        return reads.pop(0)

    monkeypatch.setattr(client_swarm, "fetch_snapshot", fetch)
    client = SwarmClient.__new__(SwarmClient)
    client.node, client._snapshots = None, {}
    assert set(asyncio.run(client._read_snapshot("m", 4)).servers) == {"a", "b"}
    assert set(asyncio.run(client._read_snapshot("m", 4)).servers) == {"a", "b"}
    assert set(asyncio.run(client._read_snapshot("m", 4)).servers) == {"a", "b"}
    read_at, kept = client._snapshots["m"]
    client._snapshots["m"] = (read_at, snapshot(now - 1, **kept.servers))  # their records have expired meanwhile
    assert set(asyncio.run(client._read_snapshot("m", 4)).servers) == {"c"}


def test_sessions_asking_for_a_fresh_read_at_once_share_one_read(monkeypatch):
    from petals_cli.config import ClientConfig

    calls = []

    async def fetch(node, prefix, num_blocks):
        calls.append(prefix)
        await asyncio.sleep(0.05)
        return snapshot(get_dht_time() + 60, a=record(0, 4, ServerState.JOINING))  # nobody to ping

    monkeypatch.setattr(client_swarm, "fetch_snapshot", fetch)
    client = SwarmClient.__new__(SwarmClient)
    client.node, client._snapshots, client._reading, client._refreshers = None, {}, {}, {}
    client.config = ClientConfig(
        initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/QmcCGfYUEkD5QWVq2VQ2uVkdE6xSZ9yVxq5hTExFkZotD1",)
    )

    async def many():
        reads = await asyncio.gather(*(client.snapshot("m", 4, max_age=0) for _ in range(25)))
        first = len(calls)
        await client.snapshot("m", 4, max_age=0)  # asked after that read ended: a read of its own
        for task in client._refreshers.values():
            task.cancel()
        return reads, first

    reads, first = asyncio.run(many())
    assert first == 1 and len(calls) == 2
    assert all(read is reads[0] for read in reads)


def test_liveness_checks_wait_longer_when_every_round_trip_has_grown():
    from petals_cli.config import ClientConfig

    client = SwarmClient.__new__(SwarmClient)
    client.config = ClientConfig(
        initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/QmcCGfYUEkD5QWVq2VQ2uVkdE6xSZ9yVxq5hTExFkZotD1",)
    )
    client.rtts = {"a": 0.002, "b": 0.003, "c": 0.02}
    assert client.liveness_timeout("a") == client.config.liveness_timeout == 0.75  # a quiet network: the floor
    client.rtts = {"a": 0.5, "b": 0.6, "c": 0.9}  # a saturated machine: every round trip grew
    assert client.liveness_timeout("a") == 3 * 0.6  # the median
    assert client.liveness_timeout("c") == 3 * 0.9  # its own, when longer
    assert client.liveness_timeout("unknown") == 3 * 0.6


def test_a_large_swarm_is_pinged_in_turns_placed_servers_first():
    import random

    client = SwarmClient.__new__(SwarmClient)
    client._rng, client._placed, client._pinged_at = random.Random(0), {}, {}
    small = [f"s{index}" for index in range(client_swarm.MAX_PINGS)]
    assert client._to_ping(small) == small  # a swarm this small: every server, every refresh
    online = [f"p{index}" for index in range(3 * client_swarm.MAX_PINGS)]
    client._placed = {"p150": [1.0]}
    pinged: list[str] = []
    for moment in range(4):
        chosen = client._to_ping(online)
        assert len(chosen) == client_swarm.MAX_PINGS and chosen[0] == "p150"
        client._pinged_at.update({peer: float(moment) for peer in chosen})
        pinged += chosen
    assert set(pinged) == set(online)  # four refreshes reached everyone (p150 took a place in each)
