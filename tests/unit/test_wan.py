"""The emulated WAN: the uplink's token bucket and queue, the forwarder's routing, timing, packet loss,
partitions and NATs; and, where root and /dev/net/tun allow it, partitions and NATs between real namespaces."""

import random
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from petals_cli.testing import wan, wan_forwarder
from petals_cli.testing.wan import Wan
from petals_cli.testing.wan_forwarder import TCP, UDP, Forwarder, Impairments, Nat, Uplink, ipv4_destination


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
    for bad in (
        lambda: network.set_loss(3, 0.1),
        lambda: network.set_loss(0, 1.5),
        lambda: network.partition(1, 1),
        lambda: network.set_nat(3, "cone"),
        lambda: network.set_nat(0, "full-cone"),
        lambda: Wan(hosts=2, nat={2: "cone"}),
        lambda: Wan(hosts=2, nat={1: "cone"}, nat_timeout=0),
    ):
        with pytest.raises(ValueError):
            bad()
    assert network.impairments == Impairments() and network.nat == {}


def internet_checksum(data: bytes) -> int:
    data = data + bytes(len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def segment_packet(protocol: int, source: tuple, destination: tuple, payload: bytes = b"hello", flags: int = 0):
    """An IPv4 TCP or UDP packet from ``source`` to ``destination`` (address, port) with a correct checksum."""
    (source_address, source_port), (destination_address, destination_port) = source, destination
    if protocol == TCP:
        header = struct.pack("!HHIIBBHHH", source_port, destination_port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    else:
        header = struct.pack("!HHHH", source_port, destination_port, 8 + len(payload), 0)
    segment = bytearray(header + payload)
    addresses = socket.inet_aton(source_address) + socket.inet_aton(destination_address)
    value = internet_checksum(addresses + bytes([0, protocol]) + len(segment).to_bytes(2, "big") + segment)
    where = 16 if protocol == TCP else 6
    segment[where : where + 2] = (value or 0xFFFF).to_bytes(2, "big")
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(segment), 0, flags, 64, protocol, 0) + addresses
    return ip + bytes(segment)


def checksum_holds(packet: bytes) -> bool:
    segment = packet[20:]
    pseudo = packet[12:20] + bytes([0, packet[9]]) + len(segment).to_bytes(2, "big")
    return internet_checksum(pseudo + segment) == 0


def ports(packet: bytes) -> tuple[int, int]:
    return struct.unpack("!HH", packet[20:24])


HOST, SERVER, OTHER = "10.77.0.2", "10.77.0.1", "10.77.0.3"


def test_a_cone_nat_keeps_one_public_port_per_private_port_whatever_the_destination():
    nat = Nat("cone")
    first = nat.send(segment_packet(UDP, (HOST, 5000), (SERVER, 9000)), now=0.0)
    second = nat.send(segment_packet(UDP, (HOST, 5000), (OTHER, 9001)), now=0.0)
    other_port = nat.send(segment_packet(UDP, (HOST, 5001), (SERVER, 9000)), now=0.0)
    same_port_tcp = nat.send(segment_packet(TCP, (HOST, 5000), (SERVER, 9000)), now=0.0)
    public = ports(first)[0]
    assert public != 5000 and ports(second)[0] == public and ports(first)[1] == 9000
    assert len({public, ports(other_port)[0], ports(same_port_tcp)[0]}) == 3
    assert all(checksum_holds(packet) for packet in (first, second, other_port, same_port_tcp))
    assert first[:20] == segment_packet(UDP, (HOST, 5000), (SERVER, 9000))[:20]  # addresses stay


def test_a_symmetric_nat_maps_each_destination_endpoint_to_its_own_port():
    nat = Nat("symmetric")
    sent = [nat.send(segment_packet(TCP, (HOST, 5000), remote), now=0.0) for remote in [(SERVER, 1), (SERVER, 2)] * 2]
    assert ports(sent[0])[0] != ports(sent[1])[0]
    assert [ports(packet)[0] for packet in sent[2:]] == [ports(packet)[0] for packet in sent[:2]]
    assert 5000 not in {ports(packet)[0] for packet in sent}


@pytest.mark.parametrize("kind", ["cone", "symmetric"])
def test_a_nat_lets_in_only_what_comes_from_an_endpoint_it_sent_to(kind):
    nat = Nat(kind)
    public = ports(nat.send(segment_packet(UDP, (HOST, 5000), (SERVER, 9000)), now=0.0))[0]
    reply = nat.receive(segment_packet(UDP, (SERVER, 9000), (HOST, public), b"reply"), now=1.0)
    assert ports(reply) == (9000, 5000) and checksum_holds(reply) and reply.endswith(b"reply")
    assert nat.receive(segment_packet(UDP, (SERVER, 9001), (HOST, public)), now=1.0) is None  # another port
    assert nat.receive(segment_packet(UDP, (OTHER, 9000), (HOST, public)), now=1.0) is None  # another host
    assert nat.receive(segment_packet(TCP, (SERVER, 9000), (HOST, public)), now=1.0) is None  # another protocol
    assert nat.receive(segment_packet(UDP, (SERVER, 9000), (HOST, 5000)), now=1.0) is None  # the private port
    nat.send(segment_packet(UDP, (HOST, 5000), (OTHER, 9000)), now=1.0)
    from_other = nat.receive(segment_packet(UDP, (OTHER, 9000), (HOST, public)), now=1.0)
    assert (from_other is not None) == (kind == "cone")  # symmetric: OTHER got another public port


def test_mappings_expire_after_the_idle_timeout_and_traffic_either_way_keeps_them():
    nat = Nat("cone", timeout=10.0)
    public = ports(nat.send(segment_packet(UDP, (HOST, 5000), (SERVER, 9000)), now=0.0))[0]
    reply = segment_packet(UDP, (SERVER, 9000), (HOST, public))
    assert nat.receive(reply, now=9.0) is not None
    assert nat.receive(reply, now=18.5) is not None
    assert nat.receive(reply, now=29.0) is None
    renewed = ports(nat.send(segment_packet(UDP, (HOST, 5000), (SERVER, 9000)), now=29.0))[0]
    assert renewed != public and nat.receive(reply, now=29.0) is None
    nat.send(segment_packet(UDP, (HOST, 6000), (SERVER, 9000)), now=100.0)  # sweeps what expired
    assert list(nat.inbound) == [(UDP, nat.outbound[(UDP, 6000)].public_port)]


def test_checksums_stay_right_through_both_ways_and_an_absent_udp_checksum_stays_absent():
    rng = random.Random(5)
    nat = Nat("cone")
    for _ in range(300):
        protocol, port = rng.choice([TCP, UDP]), rng.randrange(1, 65536)
        payload = rng.randbytes(rng.randrange(0, 40))
        out = nat.send(segment_packet(protocol, (HOST, port), (SERVER, 80), payload), now=0.0)
        back = nat.receive(segment_packet(protocol, (SERVER, 80), (HOST, ports(out)[0]), payload), now=0.0)
        assert checksum_holds(out) and checksum_holds(back) and ports(back)[1] == port
    bare = bytearray(segment_packet(UDP, (HOST, 7000), (SERVER, 80)))
    bare[26:28] = bytes(2)
    assert nat.send(bytes(bare), now=0.0)[26:28] == bytes(2)


def test_a_nat_passes_other_protocols_out_drops_them_in_and_drops_fragments():
    nat = Nat("cone")
    ping = ipv4_packet(SERVER)[:9] + bytes([1]) + ipv4_packet(SERVER)[10:]
    assert nat.send(ping, now=0.0) == ping and nat.receive(ping, now=0.0) is None
    fragment = segment_packet(UDP, (HOST, 5000), (SERVER, 9000), flags=0x2000)  # more fragments follow
    assert nat.send(fragment, now=0.0) is None and nat.outbound == {}
    assert nat.send(fragment[:24], now=0.0) is None  # truncated: no room for the ports and checksum


def test_hole_punching_through_the_forwarder_needs_cones_on_both_sides(wires):
    for kinds, punched in [({"1": "cone", "2": "cone"}, True), ({"1": "cone", "2": "symmetric"}, False)]:
        forwarder = forwarder_on(wires)
        forwarder.command({"nat": {"kinds": kinds}})
        observed = {}
        for host in (1, 2):  # each asks the public host 0 which endpoint it sees
            wires[host][1].send(segment_packet(UDP, (f"10.77.0.{host + 1}", 5000), (SERVER, 3478)))
            forwarder.take(host)
            forwarder.release()
            observed[host] = ports(wires[0][1].recv(2048))[0]
        assert 5000 not in observed.values()
        for host, peer in [(1, 2), (2, 1), (1, 2)]:
            wires[host][1].send(
                segment_packet(UDP, (f"10.77.0.{host + 1}", 5000), (f"10.77.0.{peer + 1}", observed[peer]))
            )
            forwarder.take(host)
            forwarder.release()
        arrived = {host: received(wires[host][1]) for host in (1, 2)}
        report = forwarder.stats.report()
        assert report["nat_drops"] == (1 if punched else 3) and report["packets"] == (4 if punched else 2)
        assert arrived == ({1: 1, 2: 1} if punched else {1: 0, 2: 0})
        assert received(wires[0][1]) == 0


def test_a_nat_command_keeps_the_mappings_of_hosts_whose_nat_stays(wires):
    forwarder = forwarder_on(wires)
    forwarder.command({"nat": {"kinds": {"1": "cone", "2": "cone"}}})
    kept, changed = forwarder.nat[1], forwarder.nat[2]
    report = forwarder.command({"nat": {"kinds": {"1": "cone", "2": "symmetric"}}})
    assert forwarder.nat[1] is kept and forwarder.nat[2] is not changed and forwarder.nat[2].kind == "symmetric"
    assert report["nat_drops"] == 0
    forwarder.command({"nat": {"kinds": {}}})
    assert forwarder.nat == {}
    send_through(forwarder, wires, 0, 1, 2)  # no NAT: everything passes
    assert received(wires[1][1]) == 2


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
@pytest.mark.parametrize("subnet", ["10.77.0", "11.77.0"])  # private, and public-looking (libp2p relays, AutoNAT)
def test_a_partition_between_real_namespaces_cuts_and_heals(subnet):
    with Wan(hosts=3, subnet=subnet, prefix=f"pwt{time.monotonic_ns() % 100000}") as network:
        assert network.address(2) == f"{subnet}.3"
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


needs_wan = pytest.mark.skipif(wan.unavailable() is not None, reason=f"an emulated WAN {wan.unavailable()}")

ECHO_SERVER = """
import socket, threading

def answer_tcp(connection, peer):
    with connection:
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
        connection.sendall(f"{peer[0]} {peer[1]}\\n".encode() + data)

def serve_tcp(server):
    while True:
        connection, peer = server.accept()
        threading.Thread(target=answer_tcp, args=(connection, peer), daemon=True).start()

def serve_udp(sock):
    while True:
        _, peer = sock.recvfrom(2048)
        sock.sendto(f"{peer[0]} {peer[1]}".encode(), peer)

for port in (9000, 9001):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    threading.Thread(target=serve_udp, args=(sock,), daemon=True).start()
server = socket.create_server(("0.0.0.0", 7070))
print("ready", flush=True)
serve_tcp(server)
"""

TCP_CLIENT = """
import socket, sys
data = bytes(range(256)) * (int(sys.argv[2]) // 256)
try:
    with socket.create_connection((sys.argv[1], 7070), timeout=10) as sock:
        local = sock.getsockname()[1]
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
except OSError:
    sys.exit(1)
observed, echoed = answer.split(b"\\n", 1)
print(local, observed.decode(), echoed == data)
"""

UDP_PEER = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[2])))
for line in sys.stdin:  # "ask PORT": which endpoint host 0's server on PORT sees; "punch ADDRESS PORT": for 0.6 s
    words = line.split()
    if words[0] == "ask":
        sock.sendto(b"?", (sys.argv[1], int(words[1])))
        sock.settimeout(0.5)
        try:
            print(sock.recv(100).decode(), flush=True)
        except TimeoutError:
            print("none", flush=True)
        continue
    peer, heard, deadline = (words[1], int(words[2])), set(), time.monotonic() + 0.6
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        sock.sendto(b"punch", peer)
        try:
            data, source = sock.recvfrom(100)
        except TimeoutError:
            continue
        if data == b"punch":
            heard.add(f"{source[0]} {source[1]}")
    print(",".join(sorted(heard)) or "none", flush=True)
"""


@pytest.fixture(scope="module")
def natted():
    """Host 0 public (echo servers that tell each client its observed endpoint), hosts 1 and 2 behind cone NATs,
    host 3 behind a symmetric one."""
    if wan.unavailable() is not None:
        pytest.skip(f"an emulated WAN {wan.unavailable()}")
    prefix = f"pwn{time.monotonic_ns() % 100000}"
    with Wan(hosts=4, prefix=prefix, nat={1: "cone", 2: "cone", 3: "symmetric"}) as network:
        server = subprocess.Popen(
            [*network.exec_prefix(0), sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout.readline() == "ready\n"
            yield network
        finally:
            server.kill()
            server.wait()


def tcp_exchange(network: Wan, host: int, size: int = 100_000) -> tuple[int, str, int, bool] | None:
    """Host ``host`` sends ``size`` bytes to host 0's echo server: (its local port, the address and port host 0
    saw, whether the data came back whole), or None if it could not connect."""
    command = [*network.exec_prefix(host), sys.executable, "-c", TCP_CLIENT, network.address(0), str(size)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return None
    local, address, port, whole = done.stdout.split()
    return int(local), address, int(port), whole == "True"


def udp_peer(network: Wan, host: int, port: int) -> subprocess.Popen:
    command = [*network.exec_prefix(host), sys.executable, "-c", UDP_PEER, network.address(0), str(port)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(peer: subprocess.Popen, line: str) -> str:
    peer.stdin.write(line + "\n")
    peer.stdin.flush()
    return peer.stdout.readline().strip()


@needs_wan
def test_a_natted_host_connects_out_from_another_port_but_nobody_connects_in(natted):
    for host in (1, 3):
        local, address, port, whole = tcp_exchange(natted, host)
        assert whole and address == natted.address(host) and port != local
    listen = "import socket, time\nserver = socket.create_server(('', 7070))\ntime.sleep(60)\n"
    listener = subprocess.Popen([*natted.exec_prefix(1), sys.executable, "-c", listen])
    try:
        assert any(_connects(natted, 1, 1, 7070) or time.sleep(0.1) for _ in range(20))  # it listens
        natted.set_nat(1, "cone")  # the same NAT: it keeps its mappings, the counters start again
        with ThreadPoolExecutor(2) as pool:  # from a public host and from another NATed one, at once
            assert not any(pool.map(lambda source: _connects(natted, source, 1, 7070), (0, 2)))
        assert natted.set_nat(1, "cone")["nat_drops"] > 0
    finally:
        listener.kill()
        listener.wait()


@needs_wan
def test_a_cone_keeps_a_public_port_across_destinations_and_a_symmetric_nat_does_not(natted):
    for host, kind in [(1, "cone"), (3, "symmetric")]:
        peer = udp_peer(natted, host, 5000)
        try:
            first, second = ask(peer, "ask 9000").split(), ask(peer, "ask 9001").split()
        finally:
            peer.kill()
            peer.wait()
        assert first[0] == second[0] == natted.address(host) and "5000" not in (first[1], second[1])
        assert (first[1] == second[1]) == (kind == "cone")


@needs_wan
def test_udp_hole_punching_succeeds_between_cones_and_fails_with_a_symmetric_side(natted):
    pairs = {(1, 2): True, (1, 3): False}  # both at once, from different ports of host 1
    peers = {
        pair: (udp_peer(natted, pair[0], 5100 + pair[1]), udp_peer(natted, pair[1], 5100 + pair[1])) for pair in pairs
    }
    try:
        observed = {pair: [ask(peer, "ask 9000") for peer in both] for pair, both in peers.items()}
        for pair, both in peers.items():
            for peer, other in zip(both, reversed(observed[pair]), strict=True):
                peer.stdin.write(f"punch {other}\n")
                peer.stdin.flush()
        heard = {pair: [peer.stdout.readline().strip() for peer in both] for pair, both in peers.items()}
    finally:
        for both in peers.values():
            for peer in both:
                peer.kill()
                peer.wait()
    assert heard[(1, 2)] == list(reversed(observed[(1, 2)]))  # each heard the other from its observed endpoint
    assert heard[(1, 3)] == ["none", "none"]


@needs_wan
def test_nat_mappings_and_filtering_live_alongside_loss_and_cuts(natted):
    peer = udp_peer(natted, 2, 5300)
    try:
        natted.set_loss(2, 0.05)
        local, address, port, whole = tcp_exchange(natted, 2, 64_000)  # resent segments pass the NAT too
        assert whole and port != local
        natted.set_loss(2, 0.0)
        before = ask(peer, "ask 9000")
        natted.partition(0, 2)
        assert ask(peer, "ask 9000") == "none"
        natted.heal()
        assert ask(peer, "ask 9000") == before  # the mapping outlived the cut
    finally:
        natted.set_loss(2, 0.0)
        natted.heal()
        peer.kill()
        peer.wait()
