"""The emulated WAN's pure parts: the uplink's token bucket and queue, and the forwarder's routing and timing."""

import socket

import pytest

from petals_cli.testing import wan
from petals_cli.testing.wan import Forwarder, Uplink, ipv4_destination


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
    monkeypatch.setattr(wan.time, "monotonic", lambda: now[0])
    return now


def test_forwarder_delays_by_half_the_round_trip_and_routes_by_address(clock):
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(3)]
    for ours, _ in pairs:
        ours.setblocking(False)
    forwarder = Forwarder([ours.fileno() for ours, _ in pairs], ["10.77.0.1", "10.77.0.2", "10.77.0.3"])
    forwarder.configure(rtt_ms=40, mbit=0)
    packet = ipv4_packet("10.77.0.3")
    pairs[0][1].send(packet)
    pairs[0][1].send(ipv4_packet("10.99.0.1"))
    forwarder.take(0)
    forwarder.release()
    assert forwarder.stats.unroutable == 1 and forwarder.stats.packets == 0
    assert forwarder.timeout() == pytest.approx(0.02 - wan.RELEASE_SLACK)
    clock[0] += 0.02
    forwarder.release()
    assert pairs[2][1].recv(1000) == packet
    assert forwarder.stats.report()["packets"] == 1 and forwarder.timeout() == -1
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
