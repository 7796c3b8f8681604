"""The dial-back check between real daemons on loopback, the verdict it leads to, and reading relayed addresses.
(Servers behind emulated NATs, relays and all: tests/swarm/test_nat.py.)"""

from __future__ import annotations

import asyncio
import socket

from petals_cli import daemon, multiaddrs, reachability
from petals_cli.swarm import DIRECT, RELAYED, UNKNOWN, connection_kind

RELAY = "12D3KooWQFRUmmgGgujM3PCUQ8yEyD9dnCVriGzSMEDqX3aq3g8B"
PEER = "12D3KooWJEJiXsUhNypRDbuK5BZ26ctEqv2AAyva8Cv2ZWGFTi4J"
CIRCUIT = f"/ip4/11.77.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_peer_dials_back_the_port_it_is_asked_for_on_the_askers_own_address():
    async def scenario():
        checker, asker = await daemon.create_p2p(), None
        try:
            await reachability.serve_dial_back(checker)
            addresses = [str(address) for address in await checker.get_visible_maddrs()]
            asker = await daemon.create_p2p(initial_peers=addresses)
            listening = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
            open_port = listening.sockets[0].getsockname()[1]
            async with listening:
                can = await reachability.check(asker, addresses, open_port)
                asked_again = await reachability.check(asker, addresses, open_port)  # within DIAL_BACK_PERIOD
            handler = reachability.DialBack(checker)  # a fresh one: no period to wait for
            cannot = await handler.answer(str(_free_port()), asker.peer_id)
            refused = [await reachability.DialBack(checker).answer(text, asker.peer_id) for text in ("0", "x", "1e3")]
            return can, asked_again, cannot, refused
        finally:
            for p2p in (asker, checker):
                if p2p is not None:
                    await p2p.shutdown()

    can, asked_again, cannot, refused = asyncio.run(scenario())
    assert can == (1, 1)  # it dialled, and it answered
    assert asked_again == (0, 0)  # refused: a refusal does not count either way
    assert cannot == reachability.UNREACHABLE
    assert refused == [reachability.REFUSED] * 3


def test_unreachable_only_when_most_peers_that_answered_could_not_dial():
    assert reachability.reachable(0, 0)  # nobody answered: proves nothing
    assert reachability.reachable(1, 2) and reachability.reachable(3, 5)
    assert not reachability.reachable(0, 1) and not reachability.reachable(1, 3)


def test_relayed_addresses_name_their_relay_and_a_status_says_relayed():
    direct = f"/ip4/11.77.0.3/tcp/4002/p2p/{PEER}"
    assert multiaddrs.relayed_addresses([direct, CIRCUIT]) == (CIRCUIT,)
    assert multiaddrs.relay_of(CIRCUIT) == RELAY
    assert multiaddrs.tcp_port([CIRCUIT, direct]) == 4002 and multiaddrs.tcp_port([CIRCUIT]) is None
    assert connection_kind([direct]) == DIRECT and connection_kind([CIRCUIT.rsplit("/p2p/", 1)[0]]) == RELAYED
    assert connection_kind(None) == UNKNOWN and connection_kind(None, (CIRCUIT,)) == RELAYED


def test_a_peer_behind_relays_starts_as_unreachable_on_them_and_reachable_peers_relay_within_limits():
    relay = f"/ip4/11.77.0.1/tcp/4001/p2p/{RELAY}"
    kwargs, flags = daemon.daemon_options("0.0.0.0", 0, [relay], relays=[relay])
    assert kwargs["force_reachability"] == "private" and kwargs["trusted_relays"] == [relay]
    assert kwargs["use_auto_relay"] and kwargs["dht_mode"] == "client"
    assert flags == {"relayDiscovery": 0, "relayService": 0}  # its slot at once; it relays for nobody
    kwargs, flags = daemon.daemon_options("0.0.0.0", 0, [relay])
    assert flags == daemon.RELAY_LIMITS and kwargs["use_relay"] and not kwargs["use_auto_relay"]
    kwargs, flags = daemon.daemon_options("0.0.0.0", 0, [relay], client_mode=True)
    assert flags == {"relayService": 0} and kwargs["host_maddrs"] and not kwargs["no_listen"]  # can be dialled back
    assert kwargs["dht_mode"] == "client"
    kwargs, flags = daemon.daemon_options("127.0.0.1", 0, [], client_mode=True)
    assert flags == {} and kwargs["no_listen"] and kwargs["host_maddrs"] == []
    kwargs, flags = daemon.daemon_options("127.0.0.1", 0, [])
    assert flags == {} and kwargs["force_reachability"] == "public" and not kwargs["use_relay"]
    command = type("Daemon", (daemon._Daemon,), {"flags": {"relayDiscovery": 0}})._make_process_args
    assert command("p2pd", autoRelay=True) == ["p2pd", "-autoRelay=1", "-relayDiscovery=0"]
