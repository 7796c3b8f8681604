"""Shared fixtures: tiny models made locally, and real swarms of `petals serve` processes on 127.0.0.1.

Every server is a real child process started through the CLI; ``Swarm`` (petals_cli.testing.swarm) reaps
all of them (SIGTERM, then SIGKILL) whatever happens in the test.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from petals_cli.testing.swarm import ServerProcess, Swarm, petals_command

__all__ = ["ServerProcess", "Swarm", "petals_command"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PETALS_CACHE_DIR", tempfile.mkdtemp(prefix="petals-test-cache-"))  # throughput cache


@pytest.fixture
def swarm_factory(tmp_path_factory):
    """Make swarms inside a test; all their servers are stopped at the end."""
    swarms: list[Swarm] = []

    def make(model: Path) -> Swarm:
        swarm = Swarm(model=Path(model), workdir=tmp_path_factory.mktemp("swarm"))
        swarms.append(swarm)
        return swarm

    yield make
    for swarm in swarms:
        swarm.stop()
