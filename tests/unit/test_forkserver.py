"""The benchmarks' fork server: children run the module's main with their own argv, log and random numbers; their
exits (codes, signals) reach the handles."""

import json
import signal
import subprocess

import pytest

from petals_cli.testing.forkserver import ForkServer


def test_forked_children_run_main_and_report_how_they_ended(tmp_path):
    server = ForkServer("tests.unit.forked_main", log=tmp_path / "forkserver.log")
    try:
        exits = server.start([str(tmp_path / "a.json"), "3"], tmp_path / "a.log")
        sleeps = server.start([str(tmp_path / "b.json"), "sleep"], tmp_path / "b.log")
        assert exits.wait(30) == 3 and exits.poll() == 3
        assert "child says 3" in (tmp_path / "a.log").read_text()
        with pytest.raises(subprocess.TimeoutExpired):
            sleeps.wait(0.5)
        assert sleeps.poll() is None
        sleeps.kill()
        assert sleeps.wait(30) == -signal.SIGKILL
        first, second = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
        assert first["argv"][1:] == ["3"] and second["argv"][1:] == ["sleep"]
        assert first["draw"] != second["draw"]  # reseeded: not the fork server's random stream in both
    finally:
        server.close()
    assert server.process.returncode == 0
