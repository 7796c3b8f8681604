"""A local swarm: real `petals serve` processes on 127.0.0.1, started through the CLI and always reaped.

Used by the tests, the benchmarks and `petals bench --local-swarm N`. ``stop`` sends SIGTERM, waits, then
SIGKILLs whatever is left, so no server outlives its owner.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# A starting server may take as long as it keeps getting somewhere (on a machine running several suites at once,
# importing torch alone can take a minute); it has failed to start once its CPU time and its log have not grown
# for SERVER_START_TIMEOUT seconds, or after SERVER_START_LIMIT seconds in all.
SERVER_START_TIMEOUT = 90.0
SERVER_START_LIMIT = 600.0


class StartProgress:
    """Whether a starting process is still getting somewhere: its CPU time (which grows while it imports and loads,
    however slowly a loaded machine lets it) or its log's size grew within the last ``stall`` seconds."""

    def __init__(self, pid: int, log_file: Path, stall: float = SERVER_START_TIMEOUT):
        self.pid, self.log_file, self.stall = pid, log_file, stall
        self.started = self.since = time.monotonic()
        self.mark: tuple = ()

    def stalled(self) -> bool:
        now, mark = time.monotonic(), (_cpu_ticks(self.pid), _size(self.log_file))
        if mark != self.mark:
            self.mark, self.since = mark, now
        return now - self.since > self.stall or now - self.started > SERVER_START_LIMIT


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid`` in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def petals_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "petals_cli.commands", *args]


@dataclass
class ServerProcess:
    blocks: str
    process: subprocess.Popen
    address_file: Path
    log_file: Path

    def addresses(self) -> list[str]:
        return self.address_file.read_text().split()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@dataclass
class Swarm:
    """Real servers for one model; ``initial_peers`` is the address of the first live one."""

    model: Path
    workdir: Path
    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def initial_peers(self) -> list[str]:
        """The address of the first server still running."""
        for server in self.servers:
            if server.process.poll() is None and server.address_file.exists():
                return server.addresses()[:1]
        raise RuntimeError("no server of this swarm is running")

    def start(
        self,
        blocks: str,
        *extra: str,
        model: Path | None = None,
        wait: bool = True,
        tamper: tuple[str, ...] = (),
        faulty: tuple[str, ...] = (),
        paced: tuple[str, ...] = (),
    ) -> ServerProcess:
        """Start a server of ``blocks`` (``extra``: more `petals serve` options). ``tamper``, e.g.
        ``("--mode", "noise")``, makes it a lying server: the options of ``petals_cli.testing.tamper``; ``faulty``,
        e.g. ``("--hang-after", "3")``, one that hangs or lags: those of ``petals_cli.testing.faulty``; ``paced``,
        e.g. ``("--device", "laptop")``, one no faster than that device: those of ``petals_cli.testing.paced``
        (at most one of the three)."""
        index = len(self.servers)
        address_file = self.workdir / f"server{index}.addr"
        log_file = self.workdir / f"server{index}.log"
        swarm_args = ["--initial-peers", *self.initial_peers] if self.servers else ["--new-swarm"]
        args = [str(model or self.model), "--blocks", blocks, "--address-file", str(address_file), *swarm_args]
        command = petals_command("serve", *args, *extra)
        environment = None
        testing = {"tamper": tamper, "faulty": faulty, "paced": paced}
        chosen = [(module, options) for module, options in testing.items() if options]
        if len(chosen) > 1:
            raise ValueError("a server is either tampering, faulty or paced, not several at once")
        if chosen:
            ((module, options),) = chosen
            command = [sys.executable, "-m", f"petals_cli.testing.{module}", *options, "--", *args, *extra]
            # importing petals_cli.testing loads torch before serve could ask OpenMP not to spin
            environment = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        with open(log_file, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        server = ServerProcess(blocks, process, address_file, log_file)
        self.servers.append(server)
        if wait:
            self.wait_ready(server)
        return server

    def wait_ready(self, server: ServerProcess) -> None:
        progress = StartProgress(server.process.pid, server.log_file)
        while not (server.address_file.exists() and server.address_file.read_text().strip()):
            if server.process.poll() is not None:
                raise RuntimeError(f"server {server.blocks} exited:\n{server.log()}")
            if progress.stalled():
                raise TimeoutError(f"server {server.blocks} did not start:\n{server.log()}")
            time.sleep(0.05)

    def start_many(self, *spans: str) -> None:
        """Start the first server, then the rest in parallel."""
        if not self.servers:
            self.start(spans[0])
            spans = spans[1:]
        started = [self.start(blocks, wait=False) for blocks in spans]
        for server in started:
            self.wait_ready(server)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in self.servers:
            try:
                server.process.wait(10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def even_spans(num_blocks: int, num_servers: int) -> list[str]:
    """START:END specs splitting the blocks as evenly as possible over the servers."""
    num_servers = max(1, min(num_servers, num_blocks))
    bounds = [round(index * num_blocks / num_servers) for index in range(num_servers + 1)]
    return [f"{bounds[index]}:{bounds[index + 1]}" for index in range(num_servers)]
