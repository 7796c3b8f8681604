"""The soak's faults: whom each one hits when it comes, how it is applied and undone, and what is recorded.

One method per kind of ``KINDS`` (and ``join``, which follows every leave and kill). Targets are drawn from
the soak's seeded random stream among the servers that are up and under no other fault, so that two faults never
overlap on one server. Every fault becomes an ``AppliedFault`` (the peer ids whose failure clients should notice,
and which clients could notice it); one that finds no target is recorded as skipped. Undoing is an event of kind
``undo``, which the soak runs early when the run ends first.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from petals_cli.testing.soak import Soak
    from petals_cli.testing.soak_records import AppliedFault, Peer


class Faults:
    def __init__(self, soak: Soak):
        self.soak = soak
        self.rng = soak.rng
        self.tamper_keys = iter(soak.tamper_keys)

    # --- targets ---------------------------------------------------------------------------------------------

    def servers(self, role: str = "server") -> list[Peer]:
        """Servers of ``role`` that are up, announced and under no other fault."""
        return [
            peer
            for peer in self.soak.result.peers
            if peer.role == role and peer.alive and peer.ready is not None and not peer.busy
        ]

    def free_host(self) -> int | None:
        taken = {peer.host for peer in self.soak.result.peers if peer.alive}
        free = [host for host in self.soak.server_hosts if host not in taken]
        return self.rng.choice(free) if free else None

    def record(self, kind: str, target: str, seconds: float | None = None, **details) -> AppliedFault:
        """Note a fault applied now (lasting ``seconds`` when it is undone later)."""
        from petals_cli.testing.soak_records import AppliedFault

        now = time.time()
        fault = AppliedFault(kind, now, target, until=None if seconds is None else now + seconds, **details)
        self.soak.result.faults.append(fault)
        skipped = f" (skipped: {fault.skipped})" if fault.skipped else ""
        self.soak.say(f"+{now - self.soak.result.started:.0f}s {kind}: {target}{skipped}")
        return fault

    def skip(self, kind: str, why: str) -> None:
        self.record(kind, "-", skipped=why)

    def undo_at(self, seconds: float, action) -> None:
        self.soak.at(time.time() + seconds, "undo", action)

    @staticmethod
    def named(peer: Peer) -> str:
        return f"{peer.name} [{peer.span}] {peer.peer_id[-8:]}"

    # --- the kinds -------------------------------------------------------------------------------------------

    def leave(self) -> None:
        self._end_one("leave", signal.SIGTERM, "left (SIGTERM)")

    def kill(self) -> None:
        self._end_one("kill", signal.SIGKILL, "killed (SIGKILL)")

    def _end_one(self, kind: str, signum: int, end: str) -> None:
        candidates = self.servers()
        if not candidates:
            return self.skip(kind, "no server up and free of other faults")
        victim = self.rng.choice(candidates)
        self.soak.signal(victim, signum, end)
        self.record(kind, self.named(victim), victims=[victim.peer_id])
        self.soak.at(time.time() + self.rng.uniform(*self.soak.settings.join_after_s), "join", self.join)

    def join(self) -> None:
        """A new server for the span with the fewest servers up (or starting)."""
        host = self.free_host()
        if host is None:
            return self.skip("join", "no free host")
        live = [peer for peer in self.soak.result.peers if peer.role == "server" and peer.alive]
        spans = self.soak.settings.spans
        span = min(spans, key=lambda span: (sum(peer.span == span for peer in live), self.rng.random()))
        server = self.soak.start_server(span, host)
        self.record("join", f"{server.name} [{span}] on host {host}")

    def stop(self) -> None:
        candidates = self.servers()
        if not candidates:
            return self.skip("stop", "no server up and free of other faults")
        victim = self.rng.choice(candidates)
        seconds = self.rng.uniform(*self.soak.settings.stop_s)
        victim.busy = True
        self.soak.signal(victim, signal.SIGSTOP)
        victim.frozen.append([time.time(), None])
        self.record("stop", f"{self.named(victim)} for {seconds:.0f} s", seconds, victims=[victim.peer_id])

        def thaw() -> None:
            self.soak.signal(victim, signal.SIGCONT)
            victim.frozen[-1][1] = time.time()
            victim.busy = False

        self.undo_at(seconds, thaw)

    def partition(self) -> None:
        """Half the time a client's link to a server, else the link between servers of consecutive spans."""
        soak, seconds = self.soak, self.soak.settings.partition_s
        servers = self.servers()
        if not servers:
            return self.skip("partition", "no server up and free of other faults")
        spans = list(soak.settings.spans)
        pairs = [
            (first, second)
            for first in servers
            for second in servers
            if first.span in spans[:-1] and second.span == spans[spans.index(first.span) + 1]
        ]
        if self.rng.random() < 0.5 or not pairs:
            client, server = self.rng.choice(soak.clients), self.rng.choice(servers)
            ends, hosts = [server], (client.host, server.host)
            target, clients = f"{client.name} <-> {self.named(server)}", [soak.clients.index(client)]
        else:
            ends = list(self.rng.choice(pairs))
            hosts = (ends[0].host, ends[1].host)
            target, clients = f"{self.named(ends[0])} <-> {self.named(ends[1])}", []
        for peer in ends:
            peer.busy = True
        soak.wan.partition(*hosts)
        victims = [peer.peer_id for peer in ends]
        self.record("partition", f"{target} for {seconds:.0f} s", seconds, victims=victims, clients=clients)

        def heal() -> None:
            soak.wan.heal(*hosts)
            for peer in ends:
                peer.busy = False

        self.undo_at(seconds, heal)

    def loss(self) -> None:
        soak, settings = self.soak, self.soak.settings
        lossless = [peer for peer in [*self.servers(), *soak.clients] if not soak.wan.impairments.loss.get(peer.host)]
        if not lossless:
            return self.skip("loss", "every host loses packets already")
        peer = self.rng.choice(lossless)
        host = peer.host
        soak.wan.set_loss(host, settings.loss)
        target = f"{settings.loss:.0%} of packets on host {host} ({peer.name}) for {settings.loss_s:.0f} s"
        self.record("loss", target, settings.loss_s)
        self.undo_at(settings.loss_s, lambda: soak.wan.set_loss(host, 0.0))

    def bootstrap(self) -> None:
        """SIGTERM the bootstrap peer, then start it again (same identity and port) after ``bootstrap_down_s``."""
        soak, seconds = self.soak, self.soak.settings.bootstrap_down_s
        old = soak.bootstrap_peer
        soak.signal(old, signal.SIGTERM, "restarted (SIGTERM)")
        fault = self.record("bootstrap", f"SIGTERM, down for {seconds:.0f} s after it exits, then restarted")
        try:
            old.process.wait(20)
        except subprocess.TimeoutExpired:
            old.process.kill()
            old.process.wait()
        old.ended = time.time()
        fault.until = old.ended + seconds

        def restart() -> None:
            soak.bootstrap_peer = soak.start_bootstrap()

        self.undo_at(seconds, restart)

    def tamper(self) -> None:
        """A server that adds noise to every output joins (announcing 100x its throughput) and later leaves."""
        soak, seconds = self.soak, self.soak.settings.tamper_s
        host, key = self.free_host(), next(self.tamper_keys, None)
        if host is None or key is None:
            return self.skip("tamper", "no free host" if key else "no identity left")
        span = self.rng.choice(soak.settings.spans)
        liar = soak.start_server(span, host, tamper_key=key[0])
        liar.peer_id = key[1]
        self.record("tamper", f"{liar.name} [{span}] {key[1][-8:]} for {seconds:.0f} s", seconds, victims=[key[1]])
        self.undo_at(seconds, lambda: soak.signal(liar, signal.SIGTERM, "left (SIGTERM)"))
