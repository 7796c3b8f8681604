"""The emulated WAN's forwarder (``wan.py``): one process that moves IPv4 packets between the hosts' TUN devices.

Each packet first waits in its sender's uplink (a token bucket behind a bounded drop-tail queue), then for the
one-way delay (half the round trip), and is then written to the receiver's TUN; impairments drop packets on purpose
(a host's share of losses, cut links, isolated hosts). A host may sit behind a NAT (``Nat``), a home router whose
public address is the host's own: it rewrites the TCP and UDP source port of what the host sends and the
destination port of what comes back, and drops what arrives unasked; a packet between two NATed hosts leaves
through the sender's NAT when it is read and enters the receiver's when it is delivered. ``Wan`` runs this file as
a script (``python wan_forwarder.py CONFIG``) and sends it commands on its standard input, so it uses only the
standard library and never imports the package.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import random
import select
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

MAX_PACKET = 65536
READ_BATCH = 64  # packets read from one TUN before the others get their turn
RELEASE_SLACK = 0.0005  # epoll sleeps in whole milliseconds: release what is due within half of one
DEFAULT_BURST = 16 * 1024  # the token bucket's depth in bytes (as a tbf qdisc's burst), at least one MTU
DEFAULT_QUEUE = 512 * 1024  # bytes waiting in an uplink before the next packet is dropped (drop-tail)


@dataclass
class Uplink:
    """A host's way out: a token bucket filling at ``rate`` bytes/s up to ``burst`` bytes, behind a drop-tail
    queue of at most ``queue`` bytes. ``rate`` 0 is unlimited. Time is an argument (seconds), never read inside."""

    rate: float = 0.0
    burst: int = DEFAULT_BURST
    queue: int = DEFAULT_QUEUE
    _tokens: float = field(default=-1.0, init=False)
    _last: float = field(default=0.0, init=False)  # when the last admitted packet leaves
    _waiting: deque = field(default_factory=deque, init=False)  # (leaves at, bytes) of packets not yet sent
    _waiting_bytes: int = field(default=0, init=False)

    def admit(self, now: float, size: int) -> float | None:
        """When a packet of ``size`` bytes arriving at ``now`` leaves, or None if the full queue drops it."""
        if self.rate <= 0:
            return now
        while self._waiting and self._waiting[0][0] <= now:
            self._waiting_bytes -= self._waiting.popleft()[1]
        if self._waiting_bytes + size > self.queue:
            return None
        start = max(now, self._last)
        if self._tokens < 0:  # the first packet finds a full bucket
            tokens = float(self.burst)
        else:
            tokens = min(float(self.burst), self._tokens + (start - self._last) * self.rate)
        leaves = start if tokens >= size else start + (size - tokens) / self.rate
        self._tokens, self._last = max(tokens - size, 0.0), leaves
        self._waiting.append((leaves, size))
        self._waiting_bytes += size
        return leaves

    @property
    def waiting_bytes(self) -> int:
        return self._waiting_bytes


def ipv4_destination(packet: bytes) -> bytes | None:
    """The destination address of an IPv4 packet (4 bytes), or None for anything else."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return packet[16:20]


@dataclass
class Impairments:
    """What the forwarder drops on purpose, by host index: ``loss`` maps a host to the probability that each packet
    it sends or receives is lost (a packet between two lossy hosts passes both draws); ``cut`` holds pairs of hosts
    that cannot reach each other; an ``isolated`` host reaches nobody. Pure: the random stream is an argument."""

    loss: dict[int, float] = field(default_factory=dict)
    cut: set[frozenset[int]] = field(default_factory=set)
    isolated: set[int] = field(default_factory=set)

    def blocks(self, source: int, target: int) -> bool:
        """Whether nothing may pass from ``source`` to ``target`` (a cut link or an isolated host)."""
        return source in self.isolated or target in self.isolated or frozenset((source, target)) in self.cut

    def loses(self, source: int, target: int, rng: random.Random) -> bool:
        """Whether this packet is lost on the sender's or the receiver's side."""
        return any(self.loss.get(host, 0.0) > 0 and rng.random() < self.loss[host] for host in (source, target))

    def to_json(self) -> dict:
        return {
            "loss": {str(host): probability for host, probability in sorted(self.loss.items()) if probability > 0},
            "cut": sorted(sorted(pair) for pair in self.cut),
            "isolated": sorted(self.isolated),
        }

    @classmethod
    def from_json(cls, data: dict) -> Impairments:
        return cls(
            loss={int(host): float(probability) for host, probability in data.get("loss", {}).items()},
            cut={frozenset(int(host) for host in pair) for pair in data.get("cut", [])},
            isolated={int(host) for host in data.get("isolated", [])},
        )


TCP, UDP = 6, 17
NAT_KINDS = ("cone", "symmetric")
DEFAULT_NAT_TIMEOUT = 120.0  # seconds a mapping lives without traffic either way
FIRST_PUBLIC_PORT = 61000  # a NAT hands out ports from here up, then wraps round to LOWEST_PUBLIC_PORT
LOWEST_PUBLIC_PORT = 1024


def transport_start(packet: bytes) -> int | None:
    """Where the TCP or UDP header of an IPv4 packet starts, or None for a fragment or a truncated packet (whose
    ports cannot be read); the caller has checked the protocol."""
    if packet[6] & 0x3F or packet[7]:  # more fragments follow, or this one is not the first
        return None
    start = (packet[0] & 0x0F) * 4
    return start if start >= 20 and len(packet) >= start + (20 if packet[9] == TCP else 8) else None


def adjusted_checksum(checksum: int, old: int, new: int) -> int:
    """An Internet checksum after one 16-bit word it covers changed from ``old`` to ``new`` (RFC 1624, eqn. 3)."""
    total = (~checksum & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def with_port(packet: bytes, start: int, at: int, port: int) -> bytearray:
    """A copy of a TCP or UDP packet whose port at ``start + at`` (0: source, 2: destination) is ``port``, its
    checksum updated; a UDP checksum of 0 (none) stays 0."""
    out = bytearray(packet)
    where = start + at
    old = (out[where] << 8) | out[where + 1]
    out[where : where + 2] = port.to_bytes(2, "big")
    where = start + (16 if out[9] == TCP else 6)
    checksum = (out[where] << 8) | out[where + 1]
    if checksum or out[9] == TCP:
        checksum = adjusted_checksum(checksum, old, port)
        if checksum == 0 and out[9] == UDP:  # 0 would mean "no checksum": one's complement zero has two forms
            checksum = 0xFFFF
        out[where : where + 2] = checksum.to_bytes(2, "big")
    return out


@dataclass
class NatMapping:
    """One public port of a NAT: the private port behind it and the remote endpoints (address, port) it was used
    to reach, the only ones let in through it."""

    protocol: int
    private_port: int
    public_port: int
    key: tuple
    used: float  # when traffic last passed either way
    remotes: set[tuple[bytes, int]] = field(default_factory=set)


class Nat:
    """A home router in front of one host, on the host's own address. ``cone`` maps one public port per private
    port and protocol whatever the destination (endpoint-independent mapping); ``symmetric`` maps a new one per
    destination endpoint. Both filter by address and port: a packet comes in only through a mapping that sent to
    exactly its source endpoint, so hole punching works between two cones (each sends to the endpoint that a third
    host saw) and fails when either side is symmetric. A mapping lives ``timeout`` seconds after the last packet
    through it, either way, and lets in every remote it reached as long; TCP FIN and RST do not end it. Only
    unfragmented TCP and UDP are translated: other protocols (ICMP) leave untranslated and never come in, and
    fragments are dropped. Time is an argument."""

    def __init__(self, kind: str, timeout: float = DEFAULT_NAT_TIMEOUT):
        if kind not in NAT_KINDS:
            raise ValueError(f"a NAT is one of {NAT_KINDS}, not {kind!r}")
        self.kind, self.timeout = kind, timeout
        self.outbound: dict[tuple, NatMapping] = {}  # by (protocol, private port[, remote address, remote port])
        self.inbound: dict[tuple[int, int], NatMapping] = {}  # by (protocol, public port)
        self._cursor = FIRST_PUBLIC_PORT
        self._next_sweep = 0.0

    def send(self, packet: bytes, now: float) -> bytes | bytearray | None:
        """``packet`` from the host as it leaves the NAT, or None if the NAT drops it."""
        protocol = packet[9]
        if protocol != TCP and protocol != UDP:
            return packet
        start = transport_start(packet)
        if start is None:
            return None
        private_port = (packet[start] << 8) | packet[start + 1]
        remote = (bytes(packet[16:20]), (packet[start + 2] << 8) | packet[start + 3])
        key = (protocol, private_port) if self.kind == "cone" else (protocol, private_port, remote)
        mapping = self.outbound.get(key)
        if mapping is None or mapping.used + self.timeout < now:
            mapping = self._map(key, protocol, private_port, now)
            if mapping is None:
                return None
        mapping.used = now
        mapping.remotes.add(remote)
        return with_port(packet, start, 0, mapping.public_port)

    def receive(self, packet: bytes, now: float) -> bytes | bytearray | None:
        """``packet`` for the host as it passes the NAT, or None if the NAT drops it."""
        protocol = packet[9]
        if protocol != TCP and protocol != UDP:
            return None
        start = transport_start(packet)
        if start is None:
            return None
        mapping = self.inbound.get((protocol, (packet[start + 2] << 8) | packet[start + 3]))
        if mapping is None or mapping.used + self.timeout < now:
            return None
        if (bytes(packet[12:16]), (packet[start] << 8) | packet[start + 1]) not in mapping.remotes:
            return None
        mapping.used = now
        return with_port(packet, start, 2, mapping.private_port)

    def _map(self, key: tuple, protocol: int, private_port: int, now: float) -> NatMapping | None:
        """A new mapping for ``key`` (replacing an expired one), or None when every public port is taken."""
        if now >= self._next_sweep:
            self._next_sweep = now + self.timeout
            for expired in [mapping for mapping in self.inbound.values() if mapping.used + self.timeout < now]:
                self._forget(expired)
        if key in self.outbound:
            self._forget(self.outbound[key])
        for _ in range(65536 - LOWEST_PUBLIC_PORT):
            port = self._cursor
            self._cursor = port + 1 if port < 65535 else LOWEST_PUBLIC_PORT
            if port != private_port and (protocol, port) not in self.inbound:
                mapping = NatMapping(protocol, private_port, port, key, now)
                self.outbound[key] = self.inbound[(protocol, port)] = mapping
                return mapping
        return None

    def _forget(self, mapping: NatMapping) -> None:
        self.outbound.pop(mapping.key, None)
        self.inbound.pop((mapping.protocol, mapping.public_port), None)


@dataclass
class ForwarderStats:
    packets: int = 0
    bytes: int = 0
    queue_drops: int = 0
    loss_drops: int = 0  # lost on purpose (``Impairments.loss``)
    partition_drops: int = 0  # dropped on a cut link or at an isolated host, in flight included
    nat_drops: int = 0  # dropped by a host's NAT: unasked inbound packets, fragments, no public port left
    unroutable: int = 0
    write_errors: int = 0
    lateness_sum: float = 0.0
    lateness_max: float = 0.0
    cpu_started: float = field(default_factory=time.process_time)
    wall_started: float = field(default_factory=time.monotonic)

    def report(self) -> dict:
        wall = max(time.monotonic() - self.wall_started, 1e-9)
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "queue_drops": self.queue_drops,
            "loss_drops": self.loss_drops,
            "partition_drops": self.partition_drops,
            "nat_drops": self.nat_drops,
            "unroutable": self.unroutable,
            "write_errors": self.write_errors,
            "late_ms_mean": round(1000 * self.lateness_sum / max(self.packets, 1), 3),
            "late_ms_max": round(1000 * self.lateness_max, 3),
            "cpu_share": round((time.process_time() - self.cpu_started) / wall, 4),
        }


class Forwarder:
    """Routes packets between TUN descriptors by destination address, with per-uplink bandwidth, a delay and
    impairments, and NATs in front of some hosts (``seed`` seeds the stream that decides which packets are lost)."""

    def __init__(self, fds: list[int], addresses: list[str], seed: int = 0):
        self.fds = fds
        self.route = {socket.inet_aton(address): index for index, address in enumerate(addresses)}
        self.one_way = 0.0
        self.uplinks = [Uplink() for _ in fds]
        self.impairments = Impairments()
        self.nat: dict[int, Nat] = {}  # by host, for the hosts behind one
        self.rng = random.Random(seed)
        # heap of (release at, sequence, source, target, packet)
        self.pending: list[tuple[float, int, int, int, bytes]] = []
        self.sequence = itertools.count()
        self.stats = ForwarderStats()

    def configure(
        self, rtt_ms: float = 0.0, mbit: float = 0.0, burst: int = DEFAULT_BURST, queue: int = DEFAULT_QUEUE
    ):
        """New delay and bandwidth for packets read from now on; starts new counters."""
        self.one_way = rtt_ms / 2000
        self.uplinks = [Uplink(rate=mbit * 125_000, burst=burst, queue=queue) for _ in self.fds]
        self.stats = ForwarderStats()

    def impair(self, impairments: Impairments) -> None:
        """Drop from now on what ``impairments`` say (replacing the previous ones); delay and bandwidth stay."""
        self.impairments = impairments

    def set_nat(self, kinds: dict[int, str], timeout: float = DEFAULT_NAT_TIMEOUT) -> None:
        """Put the hosts of ``kinds`` (and only those) behind a NAT of that kind; a host whose NAT stays the same
        keeps its mappings, one whose NAT changes starts with none."""
        kept = {host: nat for host, nat in self.nat.items() if kinds.get(host) == nat.kind and nat.timeout == timeout}
        self.nat = {host: kept.get(host) or Nat(kind, timeout) for host, kind in kinds.items()}

    def command(self, command: dict) -> dict:
        """Apply one control message (``{"impair": {...}}``, ``{"nat": {"kinds": {host: kind}, "timeout": s}}`` or
        configure's arguments); the counters since the last one, which start again from zero."""
        report = self.stats.report()
        if "impair" in command:
            self.impair(Impairments.from_json(command["impair"]))
            self.stats = ForwarderStats()
        elif "nat" in command:
            nat = command["nat"]
            kinds = {int(host): kind for host, kind in nat.get("kinds", {}).items()}
            self.set_nat(kinds, float(nat.get("timeout", DEFAULT_NAT_TIMEOUT)))
            self.stats = ForwarderStats()
        else:
            self.configure(**command)
        return report

    def take(self, source: int) -> None:
        """Read what waits on ``source``'s TUN and schedule each packet's release."""
        fd, uplink, nat = self.fds[source], self.uplinks[source], self.nat.get(source)
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            target = self.route.get(ipv4_destination(packet) or b"")
            if target is None:
                self.stats.unroutable += 1
                continue
            if nat is not None:  # the host's own router, before anything on the wire
                packet = nat.send(packet, time.monotonic())
                if packet is None:
                    self.stats.nat_drops += 1
                    continue
            if self.impairments.blocks(source, target):
                self.stats.partition_drops += 1
                continue
            if self.impairments.loses(source, target, self.rng):
                self.stats.loss_drops += 1
                continue
            leaves = uplink.admit(time.monotonic(), len(packet))
            if leaves is None:
                self.stats.queue_drops += 1
                continue
            heapq.heappush(self.pending, (leaves + self.one_way, next(self.sequence), source, target, packet))

    def release(self) -> None:
        """Write every packet whose time has come to its target's TUN."""
        now = time.monotonic()
        stats, nat = self.stats, self.nat
        while self.pending and self.pending[0][0] <= now + RELEASE_SLACK:
            due, _, source, target, packet = heapq.heappop(self.pending)
            if self.impairments.blocks(source, target):  # cut while in flight: lost on the wire
                stats.partition_drops += 1
                continue
            if nat and target in nat:  # the receiver's router decides when the packet reaches it
                packet = nat[target].receive(packet, now)
                if packet is None:
                    stats.nat_drops += 1
                    continue
            try:
                os.write(self.fds[target], packet)
            except OSError:  # the receiver's queue is full or its device is gone: the packet is lost
                stats.write_errors += 1
                continue
            late = max(now - due, 0.0)
            stats.packets += 1
            stats.bytes += len(packet)
            stats.lateness_sum += late
            stats.lateness_max = max(stats.lateness_max, late)

    def timeout(self) -> float:
        """Seconds epoll may sleep: until the next release (less the slack), or -1 (forever) when none waits."""
        if not self.pending:
            return -1
        return max(self.pending[0][0] - time.monotonic() - RELEASE_SLACK, 0.0)

    def serve(self, control: int, answer) -> None:
        """Forward until ``control`` closes; each JSON line read from it is a ``command``, answered on ``answer``
        with the counters since the last one."""
        poller = select.epoll()
        sources = {fd: index for index, fd in enumerate(self.fds)}
        for fd in self.fds:
            poller.register(fd, select.EPOLLIN)
        poller.register(control, select.EPOLLIN)
        buffered = b""
        while True:
            for fd, _ in poller.poll(self.timeout()):
                if fd != control:
                    self.take(sources[fd])
                    continue
                chunk = os.read(control, 65536)
                if not chunk:
                    return
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    answer.write(json.dumps(self.command(json.loads(line))) + "\n")
                    answer.flush()
            self.release()


def _forwarder_main(config_json: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the owner stops us in order
    with contextlib.suppress(OSError):  # a wire does not wait for a CPU: run ahead of the hosts' computing
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    config = json.loads(config_json)
    Forwarder(config["fds"], config["addresses"], config.get("seed", 0)).serve(sys.stdin.fileno(), sys.stdout)


if __name__ == "__main__":
    _forwarder_main(sys.argv[1])
