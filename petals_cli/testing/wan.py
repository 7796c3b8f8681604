"""An emulated wide-area network on one machine: hosts in network namespaces joined by a user-space forwarder.

Each host is a network namespace with loopback and one TUN device addressed ``10.77.0.(i+1)/24`` (or another
``subnet``). One forwarder process in the root namespace holds every TUN's file descriptor and moves IPv4 packets
between them by destination address: each packet first waits in its sender's uplink (a token bucket behind a
bounded drop-tail queue), then for the one-way delay (half the round trip), and is then written to the receiver's
TUN. Impairments drop packets on purpose: a host may lose a share of what it sends and receives (a seeded random
stream decides which), and a link between two hosts may be cut, or a host isolated, so that nothing passes,
packets already in flight included.
A host may sit behind a NAT, as behind a home router: its outbound TCP and UDP flows leave from another port of its
own address (the router's public one), and nothing comes in except replies from the exact endpoints it sent to; a
``cone`` NAT keeps a flow's public port whatever the destination, so hole punching between two of them succeeds,
a ``symmetric`` one takes a new port per destination, so it fails (see ``wan_forwarder.Nat``). ``Wan`` makes and
removes the namespaces, the devices and the forwarder, and changes the delay, the bandwidth, the impairments and the
NATs while the hosts keep running.

This module owns the network only: it knows nothing about swarms or models, and uses only the standard library,
since its forwarder (``wan_forwarder.py``) runs as a script without importing the package. Needs root, ``ip``
and ``/dev/net/tun`` (``unavailable()`` says which is missing); the kernel's netem qdisc is not needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field

from petals_cli.testing import wan_forwarder
from petals_cli.testing.wan_forwarder import (
    DEFAULT_BURST,
    DEFAULT_NAT_TIMEOUT,
    DEFAULT_QUEUE,
    NAT_KINDS,
    Impairments,
)

SUBNET = "10.77.0"
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def unavailable() -> str | None:
    """Why an emulated WAN cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (TUN devices)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as error:
        return f"cannot open /dev/net/tun ({error.strerror})"
    return None


def open_tun(name: str) -> int:
    """A non-blocking descriptor of a new TUN device ``name`` (IP packets, no extra header); the device goes
    away when the last descriptor closes."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


@dataclass
class Wan:
    """``hosts`` namespaces named ``<prefix>-h<i>`` and their forwarder; use as a context manager (or ``start``
    and ``close``, which is safe to call twice and after a partial start). ``nat`` puts hosts behind a NAT from
    the start (``{1: "cone", 2: "symmetric"}``); its mappings expire ``nat_timeout`` seconds after their last
    packet."""

    hosts: int
    mtu: int = 1500
    subnet: str = SUBNET  # the hosts' /24: libp2p treats private ranges (the default) as never publicly reachable
    prefix: str = field(default_factory=lambda: f"pwan{os.getpid()}")
    seed: int = 0  # seeds which packets the forwarder loses
    namespaces: list[str] = field(default_factory=list)
    forwarder: subprocess.Popen | None = None
    nat: dict[int, str] = field(default_factory=dict)  # the NAT kind of each host behind one, as last sent
    nat_timeout: float = DEFAULT_NAT_TIMEOUT
    impairments: Impairments = field(default_factory=Impairments)  # as last sent to the forwarder
    totals: dict = field(default_factory=dict)  # every packet counter of every answer so far, summed

    def __post_init__(self) -> None:
        for host, kind in self.nat.items():
            self._check_nat(host, kind)
        if self.nat_timeout <= 0:
            raise ValueError(f"a NAT's mappings need a positive timeout, not {self.nat_timeout}")

    def namespace(self, index: int) -> str:
        return f"{self.prefix}-h{index}"

    def address(self, index: int) -> str:
        return f"{self.subnet}.{index + 1}"

    def exec_prefix(self, index: int) -> list[str]:
        """Prepend to a command to run it on host ``index``."""
        return ["ip", "netns", "exec", self.namespace(index)]

    def start(self) -> Wan:
        fds: list[int] = []
        try:
            for index in range(self.hosts):
                fds.append(self._make_host(index))
            addresses = [self.address(i) for i in range(self.hosts)]
            config = json.dumps({"fds": fds, "addresses": addresses, "seed": self.seed})
            self.forwarder = subprocess.Popen(
                [sys.executable, os.path.abspath(wan_forwarder.__file__), config],
                pass_fds=fds,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        finally:
            for fd in fds:  # the forwarder holds its own copies now
                os.close(fd)
        self.configure()
        if self.nat:
            self._send_nat()
        return self

    def _make_host(self, index: int) -> int:
        namespace, device = self.namespace(index), f"{self.prefix}h{index}"
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        # no IPv6 router solicitations for the forwarder to drop (best effort: it drops them anyway)
        quiet_ipv6 = "for conf in all default; do echo 1 > /proc/sys/net/ipv6/conf/$conf/disable_ipv6; done"
        subprocess.run([*self.exec_prefix(index), "sh", "-c", quiet_ipv6], check=False, capture_output=True)
        fd = open_tun(device)
        try:
            _ip("link", "set", "dev", device, "netns", namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{self.address(index)}/24", "dev", device)
            _ip("-n", namespace, "link", "set", "dev", device, "mtu", str(self.mtu), "up")
            # a default route, as a machine behind a router has (relays and hole punching work without one too)
            _ip("-n", namespace, "route", "add", "default", "dev", device)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def configure(self, rtt_ms: float = 0.0, mbit: float = 0.0, queue_kib: int = DEFAULT_QUEUE // 1024) -> dict:
        """Set the round trip between any two hosts and every uplink's bandwidth (0: unlimited); returns the
        forwarder's counters since the last call. Impairments stay as they are."""
        burst = max(DEFAULT_BURST, self.mtu)
        return self._send({"rtt_ms": rtt_ms, "mbit": mbit, "burst": burst, "queue": max(queue_kib * 1024, burst)})

    def set_loss(self, host: int, probability: float) -> dict:
        """Lose each packet that ``host`` sends or receives with ``probability`` (0: none) from now on."""
        self._check_host(host)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"a loss probability is between 0 and 1, not {probability}")
        self.impairments.loss[host] = probability
        return self._impair()

    def partition(self, first: int, second: int) -> dict:
        """Cut the link between two hosts: nothing passes either way (in flight included) until ``heal``."""
        self._check_host(first)
        self._check_host(second)
        if first == second:
            raise ValueError("a partition is between two different hosts")
        self.impairments.cut.add(frozenset((first, second)))
        return self._impair()

    def isolate(self, host: int) -> dict:
        """Cut every link of ``host`` until ``heal(host)``."""
        self._check_host(host)
        self.impairments.isolated.add(host)
        return self._impair()

    def heal(self, first: int | None = None, second: int | None = None) -> dict:
        """Restore the link between two hosts, every link of one host (its isolation and each cut naming it), or,
        with no argument, every link; packet loss stays as set."""
        cut, isolated = self.impairments.cut, self.impairments.isolated
        if first is None:
            cut.clear()
            isolated.clear()
        elif second is None:
            isolated.discard(first)
            cut.difference_update({pair for pair in cut if first in pair})
        else:
            cut.discard(frozenset((first, second)))
        return self._impair()

    def set_nat(self, host: int, kind: str | None) -> dict:
        """Put ``host`` behind a NAT of ``kind`` (``"cone"`` or ``"symmetric"``), or, with None, behind none; a
        new kind starts without mappings, so the host's open flows break."""
        if kind is None:
            self._check_host(host)
            self.nat.pop(host, None)
        else:
            self._check_nat(host, kind)
            self.nat[host] = kind
        return self._send_nat()

    def _check_nat(self, host: int, kind: str) -> None:
        self._check_host(host)
        if kind not in NAT_KINDS:
            raise ValueError(f"a NAT is one of {', '.join(NAT_KINDS)}, not {kind!r}")

    def _send_nat(self) -> dict:
        kinds = {str(host): kind for host, kind in sorted(self.nat.items())}
        return self._send({"nat": {"kinds": kinds, "timeout": self.nat_timeout}})

    def _check_host(self, host: int) -> None:
        if not 0 <= host < self.hosts:
            raise ValueError(f"no host {host} in a WAN of {self.hosts}")

    def _impair(self) -> dict:
        return self._send({"impair": self.impairments.to_json()})

    def _send(self, command: dict) -> dict:
        """One command to the forwarder; its counters since the last one (also added to ``totals``)."""
        if self.forwarder is None or self.forwarder.poll() is not None:
            raise RuntimeError("the WAN's forwarder is not running")
        self.forwarder.stdin.write(json.dumps(command) + "\n")
        self.forwarder.stdin.flush()
        line = self.forwarder.stdout.readline()
        if not line:
            raise RuntimeError("the WAN's forwarder exited")
        report = json.loads(line)
        for key, value in report.items():
            if isinstance(value, int):
                self.totals[key] = self.totals.get(key, 0) + value
        return report

    def close(self) -> None:
        """End the processes left in our namespaces, the forwarder (and with it the TUNs), then the namespaces."""
        for namespace in self.namespaces:
            listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
            for pid in listed.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        if self.forwarder is not None:
            with contextlib.suppress(OSError):
                self.forwarder.stdin.close()
            try:
                self.forwarder.wait(5)
            except subprocess.TimeoutExpired:
                self.forwarder.kill()
                self.forwarder.wait()
            self.forwarder = None
        while self.namespaces:
            subprocess.run(["ip", "netns", "del", self.namespaces.pop()], capture_output=True)

    def __enter__(self) -> Wan:
        return self.start()

    def __exit__(self, *_) -> None:
        self.close()
