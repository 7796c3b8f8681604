"""A swarm at scale: tens of paced servers of mixed speeds placing themselves, sessions from several client processes
generating without pause, then a quarter of the servers SIGKILLed.

``Scale(settings, model, workdir).run()`` starts on 127.0.0.1: a bootstrap peer, a monitor (``scale_client monitor``:
every server's span every ``monitor_s`` seconds), ``servers`` metered paced servers (``scale_server``) of the speed
classes in ``mix``, each with ``--blocks N`` (its class's number of blocks: the swarm picks which, as ``--blocks auto``
does; a tiny model fits whole in any memory, so ``auto`` would give every server every block), one after another
(``join="sequential"``: each waits for the one before to be up) or all at once (``"together"``: each chooses its blocks
at one moment, paced's ``--place-at``), forked from one fork server (``forked``: ``testing/forkserver.py``, which
halves their memory); then, once every server is online and every block covered, ``clients`` client processes
(``scale_client client``) with ``sessions`` sessions between them. After ``minutes`` of generation it SIGKILLs
``kill_fraction`` of the servers (a seeded choice) and goes on for ``after_minutes``. Every ``sample_s`` seconds it
samples each process's memory. What it gathered is a ``ScaleRun`` (saved as run.json); ``scale_report.summarize`` makes
figures.

This module owns processes and the schedule; sessions and checking tokens are the clients', figures the report's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from petals_cli.testing.forkserver import ForkServer
from petals_cli.testing.paced import DeviceModel
from petals_cli.testing.soak_records import Peer, process_environment, sample_usage
from petals_cli.testing.swarm import StartProgress, petals_command

START_TIMEOUT = 180.0  # a starting process that gets nowhere for this long failed (StartProgress)
PLACED_TIMEOUT = 300.0  # for every server to be online and every block covered
STOP_TIMEOUT = 60.0
SERVER_MODULE = "petals_cli.testing.scale_server"
PLACE_AT_SECONDS = 1.5  # joining together: they choose blocks this long per server after the first starts

# Speed classes: a device model and the blocks a server of it holds (of 40; scaled to the model's blocks). Slow
# enough that tens of servers and hundreds of sessions on two cores measure the swarm, not this machine: a fast
# server steps 8 sessions through its 16 blocks in 468 ms (17 tokens/s), a slow one 2 through 6 in 590 ms.
SPEEDS: dict[str, tuple[DeviceModel, int]] = {
    "fast": (DeviceModel(overhead_ms=20.0, block_ms=20.0, token_ms=1.0, batch_capacity=8), 16),
    "medium": (DeviceModel(overhead_ms=30.0, block_ms=40.0, token_ms=2.0, batch_capacity=4), 10),
    "slow": (DeviceModel(overhead_ms=50.0, block_ms=80.0, token_ms=5.0, batch_capacity=2), 6),
}


@dataclass(frozen=True)
class ScaleSettings:
    servers: int = 40
    sessions: int = 200
    clients: int = 8
    layers: int = 40
    hidden: int = 64
    mix: tuple[tuple[str, int], ...] = (("fast", 1), ("medium", 1), ("slow", 1))  # servers of each class, in turn
    slowdown: float = 1.0  # multiplies every time of the speed classes
    join: str = "sequential"  # or "together"
    minutes: float = 5.0  # of generation before the kill
    after_minutes: float = 5.0  # of generation after it
    kill_fraction: float = 0.25
    new_tokens: int = 32
    prompt_tokens: int = 8
    check_rate: float = 0.1  # of generations checked against local transformers (and each session's first)
    routing: str = "load"  # scale_client.ROUTING_RULES
    balance_period: float = 0.0  # `petals serve --balance-period`; 0: its default
    forked: bool = True  # servers forked from one fork server (testing/forkserver.py) rather than each exec'd
    monitor_s: float = 2.0
    sample_s: float = 30.0
    seed: int = 0

    def __post_init__(self):
        if self.join not in ("sequential", "together"):
            raise ValueError(f"join is sequential or together, not {self.join!r}")
        unknown = [name for name, _ in self.mix if name not in SPEEDS]
        if unknown or not self.mix or min(count for _, count in self.mix) < 1:
            raise ValueError(f"mix: classes of {sorted(SPEEDS)} with counts >= 1, not {self.mix}")
        if min(self.servers, self.clients, self.sessions, self.layers) < 1 or self.sessions < self.clients:
            raise ValueError("servers, clients, layers >= 1 and at least one session per client")
        held = sum(self.span_blocks(self.server_class(number)) for number in range(self.servers))
        if held < self.layers:
            raise ValueError(f"the servers hold {held} blocks in all: too few for the model's {self.layers}")

    def server_class(self, number: int) -> str:
        """Servers take the mix's classes in turn: fast:2,slow:1 -> fast, fast, slow, fast, ..."""
        cycle = [name for name, count in self.mix for _ in range(count)]
        return cycle[number % len(cycle)]

    def device(self, name: str) -> DeviceModel:
        device, _ = SPEEDS[name]
        scaled = {key: getattr(device, key) * self.slowdown for key in ("overhead_ms", "block_ms", "token_ms")}
        return dataclasses.replace(device, **scaled)

    def span_blocks(self, name: str) -> int:
        _, blocks = SPEEDS[name]
        return max(1, min(self.layers, round(blocks * self.layers / 40)))


@dataclass
class ScaleRun:
    """Everything a run gathered, for ``scale_report``."""

    settings: ScaleSettings
    peers: list[Peer] = field(default_factory=list)
    classes: dict[str, str] = field(default_factory=dict)  # server name -> speed class
    placed: float = 0.0  # Unix time every server was online and every block covered
    started: float = 0.0  # clients told to go
    killed_at: float = 0.0
    killed: list[str] = field(default_factory=list)  # peer ids
    ended: float = 0.0
    records: list[dict] = field(default_factory=list)  # the clients' lines
    dht: list[dict] = field(default_factory=list)  # the monitor's lines
    meters: dict[str, list[dict]] = field(default_factory=dict)  # server name -> its meter lines
    workdir: str = ""

    def to_json(self) -> dict:
        names = [item.name for item in dataclasses.fields(Peer) if item.name != "process"]
        peers = [{name: _plain(getattr(peer, name)) for name in names} for peer in self.peers]
        data = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        return {**data, "settings": dataclasses.asdict(self.settings), "peers": peers}

    @classmethod
    def from_json(cls, data: dict) -> ScaleRun:
        settings = dict(data["settings"])
        settings["mix"] = tuple(tuple(item) for item in settings["mix"])
        peers = []
        for item in data["peers"]:
            paths = {"log": Path(item["log"]), "address_file": item["address_file"] and Path(item["address_file"])}
            peers.append(Peer(**{**item, **paths, "process": None}))
        return cls(**{**data, "settings": ScaleSettings(**settings), "peers": peers})


def _plain(value):
    return str(value) if isinstance(value, Path) else value


class Scale:
    """Runs one scale benchmark; ``run`` returns a ``ScaleRun`` and always leaves nothing behind."""

    def __init__(self, settings: ScaleSettings, model: Path, workdir: Path, say=lambda text: None):
        self.settings, self.model, self.workdir = settings, Path(model), Path(workdir)
        self.say = lambda text: say(f"{time.strftime('%H:%M:%S')} {text}")
        self.result = ScaleRun(settings, workdir=str(self.workdir))
        self.lock = threading.Lock()
        self.readers: list[threading.Thread] = []
        self.initial_peer = ""
        self.environment = process_environment(self.workdir)
        self.forks: ForkServer | None = None
        self.place_at: float | None = None  # servers joining together choose their blocks at this moment

    # --- processes -----------------------------------------------------------------------------------------

    def launch(self, name: str, role: str, command: list[str], *, piped: bool = False) -> Peer:
        log, address_file = self.workdir / f"{name}.log", None
        if role in ("bootstrap", "server"):
            address_file = self.workdir / f"{name}.addr"
            command = [*command, "--address-file", str(address_file)]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True} if piped else {}
        if role == "server" and self.settings.forked:
            if self.forks is None:
                self.forks = ForkServer(SERVER_MODULE, log=self.workdir / "forkserver.log", env=self.environment)
            process = self.forks.start(command[3:], log)  # command: python -m SERVER_MODULE ARGS
        else:
            with open(log, "ab") as output:
                process = subprocess.Popen(
                    command, stdout=pipes.pop("stdout", output), stderr=output, env=self.environment, **pipes
                )
        peer = Peer(name, role, 0, process, log, time.time(), address_file=address_file)
        self.result.peers.append(peer)
        if piped:
            reader = threading.Thread(target=self._read_lines, args=(peer,), daemon=True)
            reader.start()
            self.readers.append(reader)
        return peer

    def _read_lines(self, peer: Peer) -> None:
        with open(self.workdir / f"{peer.name}.jsonl", "a") as saved:
            for line in peer.process.stdout:
                saved.write(line)
                with contextlib.suppress(ValueError), self.lock:
                    record = json.loads(line)
                    (self.result.dht if record.get("kind") == "dht" else self.result.records).append(record)

    def poll_ready(self, peer: Peer) -> bool:
        if peer.ready is None and peer.address_file is not None:
            with contextlib.suppress(OSError, IndexError):
                peer.peer_id = peer.address_file.read_text().split()[0].rsplit("/p2p/", 1)[1]
                peer.ready = time.time()
        return peer.ready is not None

    def wait_ready(self, peer: Peer) -> None:
        progress = StartProgress(peer.process.pid, peer.log, stall=START_TIMEOUT)
        while not self.poll_ready(peer):
            if peer.process.poll() is not None or progress.stalled():
                raise RuntimeError(f"{peer.name} did not start: see {peer.log}")
            time.sleep(0.1)

    def start_server(self, number: int) -> Peer:
        settings = self.settings
        name = settings.server_class(number)
        device = settings.device(name)
        pacing = ["--overhead-ms", str(device.overhead_ms), "--block-ms", str(device.block_ms)]
        pacing += ["--token-ms", str(device.token_ms), "--batch-capacity", str(device.batch_capacity)]
        serve = [str(self.model), "--blocks", str(settings.span_blocks(name)), "--host", "127.0.0.1"]
        serve += ["--initial-peers", self.initial_peer]
        if settings.balance_period:
            serve += ["--balance-period", str(settings.balance_period)]
        if self.place_at is not None:
            pacing += ["--place-at", str(self.place_at)]
        meter = str(self.workdir / f"server{number}.meters.jsonl")
        command = [sys.executable, "-m", SERVER_MODULE, meter, *pacing, "--", *serve]
        peer = self.launch(f"server{number}", "server", command)
        self.result.classes[peer.name] = name
        return peer

    def start_client(self, index: int) -> Peer:
        settings = self.settings
        sessions = settings.sessions // settings.clients + (index < settings.sessions % settings.clients)
        client = {"index": index, "model": str(self.model), "initial_peers": [self.initial_peer]}
        client.update(sessions=sessions, new_tokens=settings.new_tokens, prompt_tokens=settings.prompt_tokens)
        client.update(check_rate=settings.check_rate, routing=settings.routing, seed=settings.seed)
        command = [sys.executable, "-m", "petals_cli.testing.scale_client", "client", json.dumps(client)]
        return self.launch(f"client{index}", "client", command, piped=True)

    def start_monitor(self) -> Peer:
        from petals_cli.wire import model_prefix_for

        monitor = {"initial_peers": [self.initial_peer], "period": self.settings.monitor_s}
        monitor.update(prefix=model_prefix_for(str(self.model)), num_blocks=self.settings.layers)
        command = [sys.executable, "-m", "petals_cli.testing.scale_client", "monitor", json.dumps(monitor)]
        return self.launch("monitor", "monitor", command, piped=True)

    # --- the run -----------------------------------------------------------------------------------------------

    def run(self) -> ScaleRun:
        settings = self.settings
        (self.workdir / "cache").mkdir(parents=True, exist_ok=True)
        try:
            servers = self.start_swarm()
            clients = [self.start_client(index) for index in range(settings.clients)]
            self.wait_for(lambda: sum(r.get("kind") == "ready" for r in self.result.records) == len(clients))
            for client in clients:
                client.process.stdin.write("go\n")
                client.process.stdin.flush()
            self.result.started = time.time()
            self.say(
                f"{settings.clients} clients generating ({settings.sessions} sessions) for {settings.minutes:g} min"
            )
            self.idle(self.result.started + 60 * settings.minutes)
            self.kill(servers)
            self.idle(self.result.killed_at + 60 * settings.after_minutes)
            self.result.ended = time.time()
            self.finish(clients)
        finally:
            self.close()
            (self.workdir / "run.json").write_text(json.dumps(self.result.to_json()))
        return self.result

    def start_swarm(self) -> list[Peer]:
        """The bootstrap peer and the monitor, then the servers; returns once every server is online and every
        block covered."""
        settings = self.settings
        self.say(f"starting {settings.servers} paced servers ({settings.join}; workdir {self.workdir})")
        bootstrap = self.launch("bootstrap", "bootstrap", petals_command("swarm", "bootstrap", "--host", "127.0.0.1"))
        self.wait_ready(bootstrap)
        self.initial_peer = bootstrap.address_file.read_text().split()[0]
        self.start_monitor()
        servers = []
        if settings.join == "together":  # all read the swarm at one moment, once all have had time to start
            self.place_at = time.time() + PLACE_AT_SECONDS * settings.servers
        for number in range(settings.servers):
            servers.append(self.start_server(number))
            if settings.join == "sequential":
                self.wait_ready(servers[-1])
        for server in servers:
            self.wait_ready(server)
        wanted = {server.peer_id for server in servers}
        if not self.wait_for(lambda: self._placed(wanted), PLACED_TIMEOUT):
            raise RuntimeError(f"the servers were not all online with every block covered in {PLACED_TIMEOUT:.0f} s")
        self.result.placed = time.time()
        self.say(f"{len(servers)} servers online, every block covered")
        return servers

    def _placed(self, wanted: set[str]) -> bool:
        if not self.result.dht or "servers" not in self.result.dht[-1]:
            return False
        online = {peer: span for peer, span in self.result.dht[-1]["servers"].items() if span[2] == "online"}
        covered = {block for start, end, _ in online.values() for block in range(start, end)}
        return set(online) >= wanted and len(covered) == self.settings.layers

    def wait_for(self, condition, timeout: float = START_TIMEOUT) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if condition():
                    return True
            time.sleep(0.2)
        return False

    def idle(self, until: float) -> None:
        next_sample = time.time()
        while time.time() < until:
            if time.time() >= next_sample:
                self.sample()
                next_sample += self.settings.sample_s
            for peer in self.result.peers:
                if peer.alive and peer.process.poll() is not None:
                    peer.ended, peer.end = time.time(), f"exited on its own (exit code {peer.process.returncode})"
                    self.say(f"{peer.name} {peer.end}")
            time.sleep(0.2)

    def sample(self) -> None:
        for peer in self.result.peers:
            usage = sample_usage(peer.process.pid) if peer.alive else {}
            if usage:
                peer.samples.append({"at": time.time(), **usage})

    def kill(self, servers: list[Peer]) -> None:
        alive = [server for server in servers if server.alive]
        count = min(len(alive), round(self.settings.kill_fraction * len(servers)))
        victims = random.Random(self.settings.seed).sample(alive, count)
        self.result.killed_at = time.time()
        for victim in victims:
            victim.process.kill()
            victim.ended, victim.end, victim.told_to_stop = time.time(), "SIGKILLed", time.time()
            self.result.killed.append(victim.peer_id)
        self.say(f"SIGKILLed {count} servers: {', '.join(victim.name for victim in victims)}")

    def finish(self, clients: list[Peer]) -> None:
        """Stop the clients (each generation in progress stops at its next token) and the monitor, then the rest;
        read the servers' meters."""
        self.sample()
        self.say("stopping")
        ours = [peer for peer in self.result.peers if peer.role in ("client", "monitor") and peer.alive]
        for peer in ours:
            with contextlib.suppress(OSError):
                peer.process.stdin.close()
        self.reap(ours, STOP_TIMEOUT)
        for reader in self.readers:
            reader.join(10)
        rest = [peer for peer in self.result.peers if peer.alive]
        for peer in rest:
            peer.process.send_signal(signal.SIGTERM)
        self.reap(rest, STOP_TIMEOUT)
        for peer in self.result.peers:
            meters = self.workdir / f"{peer.name}.meters.jsonl"
            if meters.exists():
                lines = meters.read_text().splitlines()
                self.result.meters[peer.name] = [json.loads(line) for line in lines if line.endswith("}")]

    def reap(self, peers: list[Peer], timeout: float) -> None:
        deadline = time.time() + timeout
        for peer in peers:
            try:
                code = peer.process.wait(max(0.1, deadline - time.time()))
                peer.end = "stopped at the end" + ("" if code in (0, -signal.SIGTERM) else f", exit code {code}")
            except subprocess.TimeoutExpired:
                peer.process.kill()
                peer.process.wait()
                peer.end = f"did not stop within {timeout:.0f} s (killed)"
            peer.ended = time.time()

    def close(self) -> None:
        for peer in self.result.peers:
            if peer.process.poll() is None:
                peer.process.kill()
                peer.process.wait()
        if self.forks is not None:
            self.forks.close()
