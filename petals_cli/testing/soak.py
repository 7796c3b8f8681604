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
import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path

from petals_cli.testing.soak_faults import Faults
from petals_cli.testing.swarm import StartProgress, petals_command
from petals_cli.testing.wan import Wan

BOOTSTRAP_PORT = 31337
START_TIMEOUT = 180.0
MONITOR_PERIOD = 5.0  # seconds between the monitor's reads of the DHT (at most)
CLIENT_STOP_TIMEOUT = 120.0  # for the generations in progress to finish once the clients are told to stop
SERVER_STOP_TIMEOUT = 60.0
KINDS = ("leave", "kill", "stop", "partition", "loss", "bootstrap", "tamper")  # a join follows every leave and kill


@dataclass(frozen=True)
class SoakSettings:
    minutes: float = 30.0
    spans: tuple[str, ...] = ("0:2", "2:4", "4:6", "6:8")
    replicas: tuple[int, ...] = (3, 3, 2, 2)  # servers of each span at the start
    spare_hosts: int = 3  # hosts for joining and lying servers
    clients: int = 4
    sessions: int = 16  # over all clients
    verify_clients: int = 1  # the first clients run with --verify
    verify_rate: float = 0.1
    new_tokens: int = 32
    prompt_tokens: int = 8
    step_pause: float = 0.05  # seconds each session waits after each token (a person reading; spares 2 cores)
    rtt_ms: float = 20.0
    mbit: float = 100.0
    faults_per_kind: int = 0  # 0: one per 5 minutes of the run (at least one)
    partition_s: float = 30.0
    loss: float = 0.01
    loss_s: float = 60.0
    stop_s: tuple[float, float] = (5.0, 20.0)  # how long a frozen server stays frozen (uniform)
    join_after_s: tuple[float, float] = (15.0, 60.0)  # when a server replaces one that left or was killed
    bootstrap_down_s: float = 10.0
    tamper_s: float = 60.0
    sample_s: float = 30.0
    seed: int = 0
    layers: int = 8
    hidden: int = 64

    def __post_init__(self):
        bounds = [tuple(int(part) for part in span.split(":")) for span in self.spans]
        if [start for start, _ in bounds] != [0] + [end for _, end in bounds[:-1]] or bounds[-1][1] != self.layers:
            raise ValueError(f"spans {self.spans} do not cover the {self.layers} layers one after another")
        if len(self.replicas) != len(self.spans) or min(self.replicas) < 1:
            raise ValueError("one number of servers (at least 1) per span")

    @property
    def duration(self) -> float:
        return 60.0 * self.minutes


@dataclass(frozen=True)
class PlannedFault:
    at: float  # seconds after the start of generation
    kind: str


def plan_faults(settings: SoakSettings, rng: random.Random) -> list[PlannedFault]:
    """Every kind ``faults_per_kind`` times at uniform moments of the run's middle (so that faults end before it
    does), in time order. Pure: the random stream is an argument."""
    count = settings.faults_per_kind or max(1, round(settings.minutes / 5))
    first, last = 0.1 * settings.duration, 0.8 * settings.duration
    planned = [PlannedFault(rng.uniform(first, last), kind) for kind in KINDS for _ in range(count)]
    return sorted(planned, key=lambda fault: fault.at)


@dataclass
class Peer:
    """One process on one host, and what happened to it."""

    name: str
    role: str  # bootstrap, server, tamper, client, monitor
    host: int
    process: subprocess.Popen
    log: Path
    started: float
    span: str = ""
    address_file: Path | None = None
    peer_id: str = ""
    ready: float | None = None
    ended: float | None = None
    end: str = ""  # left, killed, crashed, stopped at the end (a code when not zero)
    frozen: list[list[float]] = field(default_factory=list)  # [SIGSTOP at, SIGCONT at]
    samples: list[dict] = field(default_factory=list)  # {at, rss_kib, fds, p2pd_rss_kib, p2pd_fds}
    busy: bool = False  # a fault is on it now
    told_to_stop: float | None = None  # when it was sent SIGTERM or SIGKILL (a client: its input closed)

    @property
    def alive(self) -> bool:
        return self.ended is None

    def blocks(self) -> range:
        start, end = self.span.split(":")
        return range(int(start), int(end))


@dataclass
class AppliedFault:
    kind: str
    at: float  # Unix time
    target: str  # what it hit, in words
    victims: list[str] = field(default_factory=list)  # peer ids whose failure clients should notice
    clients: list[int] = field(default_factory=list)  # only these clients can notice it (a client's cut link)
    until: float | None = None
    skipped: str = ""


@dataclass
class SoakRun:
    """Everything a soak gathered, for ``soak_report``."""

    settings: SoakSettings
    started: float = 0.0  # Unix time generation started
    ended: float = 0.0
    peers: list[Peer] = field(default_factory=list)
    faults: list[AppliedFault] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # clients' generation, crash and summary lines
    dht: list[dict] = field(default_factory=list)  # the monitor's lines
    client_logs: list[Path] = field(default_factory=list)
    wan_totals: dict = field(default_factory=dict)
    workdir: Path | None = None

    def to_json(self) -> dict:
        """Everything but the process handles, as plain JSON (``from_json`` reads it back for a report)."""
        names = [item.name for item in dataclasses.fields(Peer) if item.name != "process"]
        peers = [{name: _plain(getattr(peer, name)) for name in names} for peer in self.peers]
        return {
            "settings": dataclasses.asdict(self.settings),
            "started": self.started,
            "ended": self.ended,
            "peers": peers,
            "faults": [dataclasses.asdict(fault) for fault in self.faults],
            "records": self.records,
            "dht": self.dht,
            "client_logs": [str(path) for path in self.client_logs],
            "wan_totals": self.wan_totals,
            "workdir": _plain(self.workdir),
        }

    @classmethod
    def from_json(cls, data: dict) -> SoakRun:
        settings = {key: tuple(value) if isinstance(value, list) else value for key, value in data["settings"].items()}
        peers = []
        for item in data["peers"]:
            paths = {"log": Path(item["log"]), "address_file": item["address_file"] and Path(item["address_file"])}
            peers.append(Peer(**{**item, **paths, "process": None}))
        return cls(
            SoakSettings(**settings),
            started=data["started"],
            ended=data["ended"],
            peers=peers,
            faults=[AppliedFault(**fault) for fault in data["faults"]],
            records=data["records"],
            dht=data["dht"],
            client_logs=[Path(path) for path in data["client_logs"]],
            wan_totals=data["wan_totals"],
            workdir=data["workdir"] and Path(data["workdir"]),
        )


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def _piped() -> dict:
    return {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _usage(pid: int) -> tuple[int, int] | None:
    """Resident memory (KiB) and open descriptors of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def sample_usage(pid: int) -> dict:
    """Memory and descriptors of a process and of its libp2p daemon (its child), when it has one."""
    own = _usage(pid)
    if own is None:
        return {}
    sample = {"rss_kib": own[0], "fds": own[1]}
    daemons = [usage for usage in map(_usage, _children(pid)) if usage is not None]
    if daemons:
        sample.update(p2pd_rss_kib=sum(rss for rss, _ in daemons), p2pd_fds=sum(fds for _, fds in daemons))
    return sample


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
        self.environment = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PETALS_CACHE_DIR": str(self.workdir / "cache"),
        }

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
