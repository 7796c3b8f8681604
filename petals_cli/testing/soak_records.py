"""The soak's records: its settings, the fault plan, the processes it ran (``Peer``), the faults it applied, the
whole run (``SoakRun``, saved as run.json and read back for its report), and how a process's memory and
descriptors are sampled from /proc. Pure data and /proc reads: ``soak`` runs, ``soak_report`` reads these."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

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


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _usage(pid: int) -> tuple[int, int, float] | None:
    """Resident memory (KiB), open descriptors and CPU seconds (user + system) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        return rss, len(os.listdir(f"/proc/{pid}/fd")), round(cpu, 2)
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def sample_usage(pid: int) -> dict:
    """Memory, descriptors and CPU seconds used so far (user + system) of a process and of its libp2p daemon (its
    child), when it has one."""
    own = _usage(pid)
    if own is None:
        return {}
    sample = {"rss_kib": own[0], "fds": own[1], "cpu_s": own[2]}
    daemons = [usage for usage in map(_usage, _children(pid)) if usage is not None]
    if daemons:
        sample.update(p2pd_rss_kib=sum(usage[0] for usage in daemons), p2pd_fds=sum(usage[1] for usage in daemons),
                      p2pd_cpu_s=round(sum(usage[2] for usage in daemons), 2))  # fmt: skip
    return sample


def process_environment(workdir: Path) -> dict[str, str]:
    """The environment of a long run's processes: one compute thread each that sleeps when idle (tens of them
    share 2 cores), no hub, and their own throughput cache in ``workdir``."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PETALS_CACHE_DIR": str(workdir / "cache"),
    }
