"""Many signed server records on a real DHT (``petals_cli.testing.dht_load``), read as a client and `swarm status` do.

One load for the module: 100 server identities announced by 2 processes on 4 DHT nodes in 2 processes. No servers
run behind the records, so every ping to them fails: the status must still list them all, and finish.
"""

import json
import select
import subprocess
import sys

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from petals_cli import security
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.dht import fetch_snapshot
from petals_cli.testing.dht_load import plausible_info
from petals_cli.wire import ServerInfo, ServerState, servers_key
from tests.conftest import petals_command

pytestmark = pytest.mark.slow
RECORDS, NUM_BLOCKS, PREFIX = 100, 80, "load-model"


def read_line(process: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line from the load within {timeout:g}s")
    return process.stdout.readline()


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dht-load")
    keys = workdir / "keys"
    command = [sys.executable, "-m", "petals_cli.testing.dht_load", "--records", str(RECORDS), "--announcers", "2"]
    command += ["--dht-peers", "4", "--peers-per-process", "2", "--keys-dir", str(keys)]
    command += ["--status-dir", str(workdir / "status"), "--num-blocks", str(NUM_BLOCKS), "--prefix", PREFIX]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    client = None
    try:
        ready = json.loads(read_line(process, 120))
        identities = [security.Identity.load_or_create(str(keys / f"server-{n}.key")) for n in range(RECORDS)]
        client = SwarmClient(ClientConfig(initial_peers=tuple(ready["initial_peers"])))
        yield ready, identities, client
    finally:
        if client is not None:
            client.close()
        process.terminate()
        process.wait(30)


def test_a_client_reads_exactly_the_announced_servers_with_their_spans(load):
    ready, identities, client = load
    assert ready["stored"] == RECORDS
    snapshot = client.run(fetch_snapshot(client.node, PREFIX, NUM_BLOCKS), timeout=60)
    expected = {identity.peer_id: plausible_info(n, NUM_BLOCKS) for n, identity in enumerate(identities)}
    assert set(snapshot.servers) == set(expected)
    assert snapshot.servers == expected  # spans, throughputs, names: each record as its server signed it


def test_a_record_signed_with_another_servers_key_is_refused_and_never_read(load):
    _, identities, client = load
    victim, forger = identities[0], identities[1]
    key_id, expiration = DHTID.generate(source=servers_key(PREFIX)), get_dht_time() + 60
    forged = ServerInfo(ServerState.OFFLINE, 0, NUM_BLOCKS, "0", public_name="forged").to_wire()
    serializer = DHTProtocol.serializer
    # signed by the forger's key, under the victim's subkey: the key does not hash to the peer id it names
    record = DHTRecord(key_id.to_bytes(), serializer.dumps(forger.peer_id), serializer.dumps(forged), expiration)
    value = security.PeerRecordValidator(forger).sign_value(record)

    async def forge():
        nearest = await client.node.find_nearest_nodes([key_id], k_nearest=5, exclude_self=True)
        return [
            await client.node.protocol.call_store(peer, [key_id], [value], expiration, [victim.peer_id])
            for peer in nearest[key_id].values()
        ]

    answers = client.run(forge(), timeout=60)
    assert answers and all(answer == [False] for answer in answers)  # every node holding the key refused it
    snapshot = client.run(fetch_snapshot(client.node, PREFIX, NUM_BLOCKS), timeout=60)
    assert snapshot.servers[victim.peer_id] == plausible_info(0, NUM_BLOCKS)


def test_swarm_status_lists_every_announced_server_and_finishes(load):
    ready, identities, _ = load
    command = petals_command("swarm", "status", "--json", "--initial-peers", *ready["initial_peers"])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (model,) = [model for model in json.loads(done.stdout)["models"] if model["prefix"] == PREFIX]
    assert {server["peer_id"] for server in model["servers"]} == {identity.peer_id for identity in identities}
    # nobody runs behind these records: those asked did not answer, the others show as announced
    assert {server["state"] for server in model["servers"]} <= {"unreachable", "online"}
