"""Many servers of one kind from one set of imports, for benchmarks only: a fork server.

    python -m petals_cli.testing.forkserver MODULE

imports ``MODULE`` (and with it torch, transformers and hivemind) once, then reads one JSON line per process to start
on its stdin, ``{"argv": [...], "log": PATH}``, forks, and in the child runs ``MODULE.main(argv)`` with stdout and
stderr appended to ``log``. It answers each request with ``{"started": PID}`` and, once a child ends (it reaps
them), ``{"ended": PID, "code": C}`` (``-N``: killed by signal N). Closing its stdin stops it; the children go on.

Why: a server's imports are ~200 MB of private memory (torch alone ~150 MB), written once at import and never again.
Forked children share those pages with the fork server until they write to them, so 40 servers of the scale
benchmark fit in about half the memory that 40 fresh interpreters take. Each child is still a process of its own,
with its own libp2p daemon, DHT node and event loop: what the benchmark measures does not change.

``ForkedProcess`` is the benchmark's handle on such a child (the subset of ``subprocess.Popen`` it uses);
``ForkServer`` starts the fork server and hands them out.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path


def _child(module, argv: list[str], log: str) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 lives as long as the process
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        random.seed()  # every child would otherwise draw the fork server's random numbers
        gc.unfreeze()
        module.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap() -> list[tuple[int, int]]:
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, os.waitstatus_to_exitcode(status)))


def serve(module_name: str) -> None:
    module = importlib.import_module(module_name)
    gc.collect()
    gc.freeze()  # the collector then never writes to the imported objects: their pages stay shared longer
    say = sys.stdout
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.2)
        for pid, code in _reap():
            say.write(json.dumps({"ended": pid, "code": code}) + "\n")
            say.flush()
        if not readable:
            continue
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(module, [str(arg) for arg in request["argv"]], str(request["log"]))
        say.write(json.dumps({"started": pid}) + "\n")
        say.flush()


class ForkedProcess:
    """A child of the fork server: ``pid``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``returncode``."""

    def __init__(self, pid: int, ended: threading.Condition, codes: dict[int, int]):
        self.pid, self._ended, self._codes = pid, ended, codes
        self.stdin = self.stdout = None

    @property
    def returncode(self) -> int | None:
        with self._ended:
            return self._codes.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ended:
            while self.pid not in self._codes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
                self._ended.wait(left)
            return self._codes[self.pid]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """``python -m petals_cli.testing.forkserver MODULE`` as a child of this process; ``start`` forks from it."""

    def __init__(self, module: str, *, log: Path, env: dict[str, str] | None = None):
        with open(log, "ab") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "petals_cli.testing.forkserver", module],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env=env,
            )
        self._ended, self._codes = threading.Condition(), {}
        self._started: list[int] = []
        self._started_ready = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def start(self, argv: list[str], log: Path, timeout: float = 120.0) -> ForkedProcess:
        """Fork a child running ``MODULE.main(argv)``; the first call waits for the module's imports."""
        with self._started_ready:
            self.process.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            self.process.stdin.flush()
            if not self._started_ready.wait_for(lambda: self._started or self.process.poll() is not None, timeout):
                raise RuntimeError(f"the fork server did not start a process within {timeout:.0f} s")
            if not self._started:
                raise RuntimeError(f"the fork server exited (code {self.process.returncode})")
            return ForkedProcess(self._started.pop(0), self._ended, self._codes)

    def _read(self) -> None:
        for line in self.process.stdout:
            with contextlib.suppress(ValueError, KeyError):
                message = json.loads(line)
                if "started" in message:
                    with self._started_ready:
                        self._started.append(int(message["started"]))
                        self._started_ready.notify_all()
                else:
                    with self._ended:
                        self._codes[int(message["ended"])] = int(message["code"])
                        self._ended.notify_all()
        with self._started_ready:
            self._started_ready.notify_all()

    def close(self) -> None:
        """Stop forking (the children it started go on; stop those first)."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
