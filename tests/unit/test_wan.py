"""The emulated WAN: the uplink's token bucket and queue, the forwarder's routing, timing, packet loss and
partitions; and, where root and /dev/net/tun allow it, a partition between two real namespaces."""

import random
import socket
import subprocess
import sys
import time

import pytest

from petals_cli.testing import wan, wan_forwarder
from petals_cli.testing.wan import Wan
from petals_cli.testing.wan_forwarder import Forwarder, Impairments, Uplink, ipv4_destination


def ipv4_packet(destination: str, size: int = 100) -> bytes:
    header = bytes([0x45]) + bytes(11) + socket.inet_aton("10.77.0.9") + socket.inet_aton(destination)
    return header + bytes(size - len(header))


def test_unlimited_uplink_sends_at_once():
    uplink = Uplink(rate=0)
    assert [uplink.admit(5.0, 60_000) for _ in range(100)] == [5.0] * 100


def test_a_full_bucket_lets_a_burst_through_then_the_rate_paces():
    uplink = Uplink(rate=1000, burst=3000, queue=10_000)
    assert [uplink.admit(0.0, 1000) for _ in range(5)] == [0.0, 0.0, 0.0, 1.0, 2.0]


def test_an_idle_bucket_refills_only_up_to_its_burst():
    uplink = Uplink(rate=1000, burst=2000, queue=10_000)
    uplink.admit(0.0, 2000)
    assert [uplink.admit(100.0, 1000) for _ in range(3)] == [100.0, 100.0, 101.0]


def test_a_full_queue_drops_the_newcomer_until_packets_leave():
    uplink = Uplink(rate=1000, burst=1000, queue=2500)
    assert [uplink.admit(0.0, 1000) for _ in range(4)] == [0.0, 1.0, 2.0, None]
    assert uplink.waiting_bytes == 2000  # the one sent at 0.0 left the queue when the fourth came
    assert uplink.admit(1.5, 1000) == 3.0


def test_only_ipv4_packets_have_a_destination():
    assert ipv4_destination(ipv4_packet("10.77.0.2")) == socket.inet_aton("10.77.0.2")
    assert ipv4_destination(bytes([0x60]) + bytes(39)) is None  # IPv6
    assert ipv4_destination(b"\x45") is None


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(wan_forwarder.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def wires():
    """Three datagram socket pairs standing in for TUN devices: the forwarder holds one end of each."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(3)]
    for ours, theirs in pairs:
        ours.setblocking(False)
        theirs.setblocking(False)
    yield pairs
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def forwarder_on(pairs, seed: int = 0) -> Forwarder:
    return Forwarder([ours.fileno() for ours, _ in pairs], [f"10.77.0.{i + 1}" for i in range(len(pairs))], seed)


def received(sock) -> int:
    """How many packets wait on ``sock`` (all read)."""
    count = 0
    while True:
        try:
            sock.recv(wan_forwarder.MAX_PACKET)
        except BlockingIOError:
            return count
        count += 1


def send_through(forwarder: Forwarder, pairs, source: int, target: int, count: int) -> None:
    """``count`` packets from host ``source`` to host ``target`` (in batches the forwarder reads at once)."""
    for sent in range(count):
        pairs[source][1].send(ipv4_packet(f"10.77.0.{target + 1}"))
        if sent % 32 == 31:
            forwarder.take(source)
    forwarder.take(source)
    forwarder.release()


def test_forwarder_delays_by_half_the_round_trip_and_routes_by_address(clock, wires):
    pairs = wires
    forwarder = forwarder_on(pairs)
    forwarder.configure(rtt_ms=40, mbit=0)
    packet = ipv4_packet("10.77.0.3")
    pairs[0][1].send(packet)
    pairs[0][1].send(ipv4_packet("10.99.0.1"))
    forwarder.take(0)
    forwarder.release()
    assert forwarder.stats.unroutable == 1 and forwarder.stats.packets == 0
    assert forwarder.timeout() == pytest.approx(0.02 - wan_forwarder.RELEASE_SLACK)
    clock[0] += 0.02
    forwarder.release()
    assert pairs[2][1].recv(1000) == packet
    assert forwarder.stats.report()["packets"] == 1 and forwarder.timeout() == -1


def test_impairments_cut_links_both_ways_and_isolate_hosts():
    impairments = Impairments(cut={frozenset((0, 1))}, isolated={2})
    assert impairments.blocks(0, 1) and impairments.blocks(1, 0)
    assert impairments.blocks(2, 3) and impairments.blocks(3, 2)
    assert not impairments.blocks(0, 3) and not impairments.blocks(3, 1)
    assert Impairments.from_json(impairments.to_json()) == impairments


def test_loss_draws_on_the_senders_and_the_receivers_side_from_the_given_stream():
    impairments = Impairments(loss={1: 0.25})
    rng = random.Random(7)
    lost = [impairments.loses(1, 0, rng) for _ in range(4000)] + [impairments.loses(0, 1, rng) for _ in range(4000)]
    assert 0.22 < sum(lost) / len(lost) < 0.28
    assert not any(impairments.loses(0, 2, rng) for _ in range(1000))  # hosts without loss lose nothing
    both = Impairments(loss={0: 0.5, 1: 0.5})
    assert 0.72 < sum(both.loses(0, 1, rng) for _ in range(4000)) / 4000 < 0.78  # 1 - 0.5 * 0.5
    replay = random.Random(7)
    assert [impairments.loses(1, 0, replay) for _ in range(4000)] == lost[:4000]  # the same seed, the same losses


def test_the_forwarder_loses_packets_of_a_lossy_host_only_and_repeatably(wires):
    counts = []
    for _ in range(2):
        forwarder = forwarder_on(wires, seed=3)
        forwarder.command({"impair": {"loss": {"1": 0.3}}})
        send_through(forwarder, wires, 0, 1, 300)
        send_through(forwarder, wires, 0, 2, 100)
        delivered = received(wires[1][1])
        assert received(wires[2][1]) == 100
        stats = forwarder.stats.report()
        assert stats["loss_drops"] + delivered == 300 and stats["packets"] == delivered + 100
        counts.append(delivered)
    assert counts[0] == counts[1] and 170 < counts[0] < 250


def test_a_cut_link_drops_both_ways_in_flight_included_until_healed(clock, wires):
    forwarder = forwarder_on(wires)
    forwarder.configure(rtt_ms=100)
    send_through(forwarder, wires, 0, 1, 5)  # in flight for 50 ms
    report = forwarder.command({"impair": {"cut": [[0, 1]]}})
    assert report["packets"] == 0
    send_through(forwarder, wires, 1, 0, 5)
    send_through(forwarder, wires, 0, 2, 5)
    clock[0] += 0.05
    forwarder.release()
    assert received(wires[1][1]) == 0 and received(wires[0][1]) == 0 and received(wires[2][1]) == 5
    assert forwarder.stats.report()["partition_drops"] == 10
    forwarder.command({"impair": {}})  # healed; the delay stays
    send_through(forwarder, wires, 1, 0, 5)
    assert received(wires[0][1]) == 0
    clock[0] += 0.05
    forwarder.release()
    assert received(wires[0][1]) == 5


def test_an_isolated_host_reaches_nobody(wires):
    forwarder = forwarder_on(wires)
    forwarder.command({"impair": {"isolated": [2]}})
    for source, target in [(0, 2), (2, 1), (1, 0)]:
        send_through(forwarder, wires, source, target, 3)
    assert [received(theirs) for _, theirs in wires] == [3, 0, 0]
    assert forwarder.stats.report()["partition_drops"] == 6


def test_configure_keeps_the_impairments_and_impairments_keep_the_delay(clock, wires):
    forwarder = forwarder_on(wires)
    forwarder.command({"impair": {"cut": [[0, 1]], "loss": {"2": 1.0}}})
    forwarder.command({"rtt_ms": 20, "mbit": 0})
    assert forwarder.impairments.blocks(0, 1) and forwarder.impairments.loss == {2: 1.0}
    forwarder.command({"impair": {}})
    assert forwarder.one_way == pytest.approx(0.01)


def test_wan_checks_what_it_is_asked_before_sending_it():
    network = Wan(hosts=3)
    for bad in (lambda: network.set_loss(3, 0.1), lambda: network.set_loss(0, 1.5), lambda: network.partition(1, 1)):
        with pytest.raises(ValueError):
            bad()
    assert network.impairments == Impairments()


def _connects(network: Wan, source: int, target: int, port: int) -> bool:
    """Whether host ``source`` opens a TCP connection to host ``target``'s listener within a second."""
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(('{network.address(target)}', {port}), timeout=1).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return subprocess.run([*network.exec_prefix(source), sys.executable, "-c", code], timeout=30).returncode == 0


@pytest.mark.skipif(wan.unavailable() is not None, reason=f"an emulated WAN {wan.unavailable()}")
def test_a_partition_between_real_namespaces_cuts_and_heals():
    with Wan(hosts=3, prefix=f"pwt{time.monotonic_ns() % 100000}") as network:
        listener_code = (
            "import socket, time\n"
            f"s = socket.create_server(('{network.address(1)}', 7070))\n"
            "s.settimeout(0.2)\n"
            "while True:\n"
            "    try:\n"
            "        s.accept()[0].close()\n"
            "    except OSError:\n"
            "        pass\n"
        )
        listener = subprocess.Popen([*network.exec_prefix(1), sys.executable, "-c", listener_code])
        try:
            assert any(_connects(network, 0, 1, 7070) or time.sleep(0.2) for _ in range(20))
            network.partition(0, 1)
            assert not _connects(network, 0, 1, 7070)
            assert _connects(network, 2, 1, 7070)  # only that link is cut
            network.isolate(1)
            assert not _connects(network, 2, 1, 7070)
            network.heal()
            assert _connects(network, 0, 1, 7070)
            assert network.totals["partition_drops"] > 0
        finally:
            listener.kill()
            listener.wait()
