"""A soak: a swarm on the emulated WAN, sessions generating one text after another, and faults at random moments.

``Soak(settings).run()`` starts, each on its own host of ``testing/wan.py``: a bootstrap peer with a stable identity
and port, `petals serve` processes holding every span two or three times, client processes (``soak_client``) that
generate greedily and check every token against local transformers (some with ``--verify``), and a monitor that
counts DHT records. Faults then come at random moments (``plan_faults``): a server joins, leaves (SIGTERM), is
SIGKILLed, is frozen (SIGSTOP, later SIGCONT), a client or a server loses its link to a server for a while, a host
loses 1% of its packets, the bootstrap peer restarts, or a lying server (``testing/tamper.py``) serves for a while.
Every few seconds it records each process's memory and open descriptors. What it gathered is a ``SoakRun``;
``soak_report.summarize`` turns it into figures.

Faults are aimed when they happen (at a live server, at the span with fewest replicas), with a seeded random
stream. Clients that do not verify block every lying server's peer id (made in advance): a client that does not
verify trusts its servers, so only verifying clients may meet a liar. This module owns processes, the schedule
and sampling; the network is ``wan``'s, checking tokens is the clients', figures are ``soak_report``'s.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from petals_cli.testing.soak_faults import Faults
from petals_cli.testing.soak_records import (
    Peer,
    SoakRun,
    SoakSettings,
    plan_faults,
    process_environment,
    sample_usage,
)
from petals_cli.testing.swarm import StartProgress, petals_command
from petals_cli.testing.wan import Wan

BOOTSTRAP_PORT = 31337
START_TIMEOUT = 180.0
MONITOR_PERIOD = 5.0  # seconds between the monitor's reads of the DHT (at most)
CLIENT_STOP_TIMEOUT = 120.0  # for the generations in progress to finish once the clients are told to stop
SERVER_STOP_TIMEOUT = 60.0


def _piped() -> dict:
    return {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}


class Soak:
    """Runs one soak; ``run`` returns a ``SoakRun`` and always leaves nothing behind."""

    def __init__(self, settings: SoakSettings, model: Path, workdir: Path, say=lambda text: None):
        self.settings, self.model, self.workdir = settings, Path(model), Path(workdir)
        self.say = lambda text: say(f"{time.strftime('%H:%M:%S')} {text}")
        self.rng = random.Random(settings.seed)
        self.server_hosts = list(range(1, 1 + sum(settings.replicas) + settings.spare_hosts))
        self.client_hosts = [self.server_hosts[-1] + 1 + index for index in range(settings.clients)]
        self.monitor_host = self.client_hosts[-1] + 1
        self.wan = Wan(hosts=self.monitor_host + 1, seed=settings.seed, prefix=f"psk{os.getpid() % 100000}")
        self.result = SoakRun(settings, workdir=self.workdir)
        self.lock = threading.Lock()
        self.events: list[tuple[float, int, str, object]] = []  # heap of (Unix time, sequence, what, action)
        self.sequence = itertools.count()
        self.bootstrap_peer: Peer | None = None
        self.initial_peer = ""
        self.clients: list[Peer] = []
        self.monitor: Peer | None = None
        self.readers: list[threading.Thread] = []
        self.tamper_keys: list[tuple[Path, str]] = []
        self.environment = process_environment(self.workdir)

    # --- processes -----------------------------------------------------------------------------------------

    def launch(self, name: str, role: str, host: int, command: list[str], **options) -> Peer:
        """Start ``command`` on ``host``; a bootstrap peer or a server gets ``--address-file`` (its peer id)."""
        log, address_file = self.workdir / f"{name}.log", None
        if role in ("bootstrap", "server", "tamper"):
            address_file = self.workdir / f"{name}.addr"
            address_file.unlink(missing_ok=True)
            command = [*command, "--address-file", str(address_file)]
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [*self.wan.exec_prefix(host), *command],
                stdout=options.pop("stdout", output),
                stderr=output,
                env=self.environment,
                **options,
            )
        peer = Peer(name, role, host, process, log, time.time(), address_file=address_file)
        self.result.peers.append(peer)
        return peer

    def wait_ready(self, peer: Peer, timeout: float = START_TIMEOUT) -> bool:
        """Whether ``peer`` wrote its address before it exited or stopped getting anywhere for ``timeout`` s."""
        progress = StartProgress(peer.process.pid, peer.log, stall=timeout)
        while not self.poll_ready(peer):
            if peer.process.poll() is not None or progress.stalled():
                return False
            time.sleep(0.1)
        return True

    def poll_ready(self, peer: Peer) -> bool:
        """Whether ``peer`` wrote its address (noting when and its peer id the first time)."""
        if peer.ready is None and peer.address_file is not None:
            with contextlib.suppress(OSError):
                addresses = peer.address_file.read_text().split()
                ours = [address for address in addresses if f"/{self.wan.address(peer.host)}/" in address]
                if ours:
                    peer.ready, peer.peer_id = time.time(), ours[0].rsplit("/p2p/", 1)[1]
        return peer.ready is not None

    def start_bootstrap(self) -> Peer:
        """The bootstrap peer, with the same identity and port every time: the address others know stays valid."""
        number = sum(peer.role == "bootstrap" for peer in self.result.peers)
        command = petals_command("swarm", "bootstrap", "--host", self.wan.address(0), "--port", str(BOOTSTRAP_PORT))
        command += ["--identity", str(self.workdir / "bootstrap.key")]
        return self.launch(f"bootstrap{number}", "bootstrap", 0, command)

    def start_server(self, span: str, host: int, tamper_key: Path | None = None) -> Peer:
        """`petals serve` of ``span`` on ``host``, or a server that lies about every output (with that identity)."""
        number = sum(peer.role in ("server", "tamper") for peer in self.result.peers)
        args = [str(self.model), "--blocks", span, "--host", self.wan.address(host)]
        args += ["--initial-peers", self.initial_peer]
        if tamper_key is None:
            peer = self.launch(f"server{number}", "server", host, petals_command("serve", *args))
        else:
            tampering = ["--mode", "noise", "--scale", "0.05", "--attract"]
            command = [sys.executable, "-m", "petals_cli.testing.tamper", *tampering, "--", *args]
            peer = self.launch(f"tamper{number}", "tamper", host, [*command, "--identity", str(tamper_key)])
        peer.span = span
        return peer

    def start_client(self, index: int) -> Peer:
        settings = self.settings
        sessions = settings.sessions // settings.clients + (index < settings.sessions % settings.clients)
        verify = index < settings.verify_clients
        client_settings = {
            "index": index,
            "model": str(self.model),
            "initial_peers": [self.initial_peer],
            "sessions": sessions,
            "verify_rate": settings.verify_rate if verify else 0.0,
            "blocked": [] if verify else [peer_id for _, peer_id in self.tamper_keys],
            "new_tokens": settings.new_tokens,
            "prompt_tokens": settings.prompt_tokens,
            "step_pause": settings.step_pause,
            "seed": settings.seed,
        }
        command = [sys.executable, "-m", "petals_cli.testing.soak_client", "client", json.dumps(client_settings)]
        peer = self.launch(f"client{index}", "client", self.client_hosts[index], command, **_piped())
        self.result.client_logs.append(peer.log)
        self._read(peer)
        return peer

    def _read(self, peer: Peer) -> None:
        reader = threading.Thread(target=self._read_lines, args=(peer,), daemon=True)
        reader.start()
        self.readers.append(reader)

    def _read_lines(self, peer: Peer) -> None:
        """Keep ``peer``'s JSON lines (a copy goes to its .jsonl file)."""
        with open(self.workdir / f"{peer.name}.jsonl", "a") as saved:
            for line in peer.process.stdout:
                saved.write(line)
                saved.flush()
                with contextlib.suppress(ValueError), self.lock:
                    record = json.loads(line)
                    (self.result.dht if record.get("kind") == "dht" else self.result.records).append(record)

    def start_monitor(self) -> Peer:
        from petals_cli.wire import model_prefix_for

        settings = {"initial_peers": [self.initial_peer], "period": min(self.settings.sample_s, MONITOR_PERIOD)}
        settings.update(prefix=model_prefix_for(str(self.model)), num_blocks=self.settings.layers)
        command = [sys.executable, "-m", "petals_cli.testing.soak_client", "monitor", json.dumps(settings)]
        peer = self.launch("monitor", "monitor", self.monitor_host, command, **_piped())
        self._read(peer)
        return peer

    def make_tamper_keys(self, count: int) -> None:
        """Identities of the lying servers, made now so that clients that do not verify can block them."""
        from hivemind.p2p import P2P, PeerID

        for number in range(count):
            path = self.workdir / f"tamper{number}.key"
            path.unlink(missing_ok=True)
            P2P.generate_identity(str(path))
            self.tamper_keys.append((path, PeerID.from_identity(path.read_bytes()).to_base58()))

    def signal(self, peer: Peer, signum: int, end: str = "") -> None:
        if peer.alive:
            with contextlib.suppress(ProcessLookupError):
                peer.process.send_signal(signum)
            if signum in (signal.SIGTERM, signal.SIGKILL):
                peer.told_to_stop = time.time()
            if end:
                peer.end = end

    # --- the run -----------------------------------------------------------------------------------------------

    def run(self) -> SoakRun:
        settings = self.settings
        (self.workdir / "cache").mkdir(parents=True, exist_ok=True)
        planned = plan_faults(settings, self.rng)
        self.make_tamper_keys(sum(fault.kind == "tamper" for fault in planned))
        try:
            self.wan.start()
            self.wan.configure(settings.rtt_ms, settings.mbit)
            self.start_swarm()
            self.result.started = time.time()
            faults = Faults(self)
            for fault in planned:
                self.at(self.result.started + fault.at, fault.kind, getattr(faults, fault.kind))
            self.loop(self.result.started + settings.duration)
            self.finish()
        finally:
            self.result.ended = self.result.ended or time.time()
            self.close()
            (self.workdir / "run.json").write_text(json.dumps(self.result.to_json()))
        return self.result

    def start_swarm(self) -> None:
        """The bootstrap peer, then the monitor, servers and clients at once; clients are told to go once every
        server is up and in the DHT, and every client has loaded."""
        settings = self.settings
        self.say(f"starting the swarm on {self.wan.hosts} hosts of an emulated WAN (workdir {self.workdir})")
        self.bootstrap_peer = self.start_bootstrap()
        if not self.wait_ready(self.bootstrap_peer, 60):
            raise RuntimeError(f"the bootstrap peer did not start: {self.bootstrap_peer.log}")
        self.initial_peer = self.bootstrap_peer.address_file.read_text().split()[0]
        self.monitor = self.start_monitor()
        hosts = iter(self.server_hosts)
        servers = [
            self.start_server(span, next(hosts))
            for span, count in zip(settings.spans, settings.replicas, strict=True)
            for _ in range(count)
        ]
        self.clients = [self.start_client(index) for index in range(settings.clients)]
        for server in servers:
            if not self.wait_ready(server):
                raise RuntimeError(f"{server.name} did not start: {server.log}")
        self.say(f"{len(servers)} servers up; waiting until the DHT shows them all and the clients have loaded")
        wanted = {server.peer_id for server in servers}
        self.wait_for(lambda: self.result.dht and set(self.result.dht[-1].get("online_peers", ())) >= wanted, 120)
        self.wait_for(
            lambda: sum(record.get("kind") == "ready" for record in self.result.records) == len(self.clients)
        )
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.process.stdin.write("go\n")
                client.process.stdin.flush()
        self.say(f"{settings.clients} clients generating ({settings.sessions} sessions) for {settings.minutes:g} min")

    def wait_for(self, condition, timeout: float = START_TIMEOUT) -> bool:
        """Wait until ``condition()`` (read under the lock) holds, or a client exits, or ``timeout`` passes."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if condition():
                    return True
            if any(client.process.poll() is not None for client in self.clients):
                return False
            time.sleep(0.2)
        return False

    def at(self, when: float, what: str, action) -> None:
        heapq.heappush(self.events, (when, next(self.sequence), what, action))

    def loop(self, until: float) -> None:
        next_sample = time.time()
        while time.time() < until:
            while self.events and self.events[0][0] <= time.time():
                _, _, _, action = heapq.heappop(self.events)
                action()
            for peer in self.result.peers:
                self.watch(peer)
            if time.time() >= next_sample:
                self.sample()
                next_sample += self.settings.sample_s
            time.sleep(0.2)

    def watch(self, peer: Peer) -> None:
        """Note a start or an exit (an exit nobody asked for is a crash, or a failed start before an address)."""
        if not peer.alive:
            return
        self.poll_ready(peer)
        code = peer.process.poll()
        if code is not None:
            peer.ended = time.time()
            if not peer.end:
                lines = peer.log.read_text(errors="replace").strip().splitlines() if peer.log.exists() else []
                last = lines[-1][:300] if lines else ""
                failed = peer.address_file is not None and peer.ready is None
                peer.end = f"{'failed to start' if failed else 'crashed'} (exit code {code}): {last}"
                self.say(f"{peer.name} exited on its own: {peer.end}")

    def sample(self) -> None:
        now = time.time()
        for peer in self.result.peers:
            if peer.alive:
                usage = sample_usage(peer.process.pid)
                if usage:
                    peer.samples.append({"at": now, **usage})

    def finish(self) -> None:
        """Undo the faults still on, sample, stop the clients (each generation in progress finishes) and the monitor,
        then every server and the bootstrap peer."""
        for _, _, what, action in sorted(self.events, key=lambda event: event[:2]):
            if what == "undo":
                action()
        self.events.clear()
        self.sample()
        self.result.ended = time.time()
        self.say("stopping the clients (generations in progress finish)")
        ours = [peer for peer in [*self.clients, self.monitor] if peer is not None]
        for peer in ours:
            with contextlib.suppress(OSError):
                peer.process.stdin.close()
            peer.told_to_stop = time.time()
        self.reap(ours, CLIENT_STOP_TIMEOUT)
        for reader in self.readers:
            reader.join(10)
        rest = [peer for peer in self.result.peers if peer.alive]
        for peer in rest:
            self.signal(peer, signal.SIGTERM)
        self.reap(rest, SERVER_STOP_TIMEOUT)
        self.result.wan_totals = dict(self.wan.totals)

    def reap(self, peers: list[Peer], timeout: float) -> None:
        """Wait for ``peers`` to exit (killing those left after ``timeout``) and say how each ended."""
        deadline = time.time() + timeout
        waiting = [peer for peer in peers if peer.alive]
        while waiting and time.time() < deadline:
            time.sleep(0.1)
            for peer in waiting:
                code = peer.process.poll()
                if code is not None:
                    peer.ended = time.time()
                    peer.end = "stopped at the end" + ("" if code in (0, -signal.SIGTERM) else f", exit code {code}")
            waiting = [peer for peer in waiting if peer.alive]
        for peer in waiting:
            peer.process.kill()
            peer.process.wait()
            peer.ended, peer.end = time.time(), f"did not stop within {timeout:.0f} s (killed)"

    def close(self) -> None:
        for peer in self.result.peers:
            if peer.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    peer.process.send_signal(signal.SIGCONT)
                    peer.process.kill()
                peer.process.wait()
        self.wan.close()
