"""`petals bench --local-swarm N` starts its own servers, measures both ways and stops them."""

import json
import subprocess

import pytest

from petals_cli.testing import make_tiny_model
from tests.conftest import petals_command

pytestmark = pytest.mark.slow


def test_bench_with_a_local_swarm_reports_every_figure_both_ways(tmp_path):
    model = make_tiny_model(tmp_path / "tiny-bench", "llama", num_layers=4)
    args = ["bench", str(model), "--local-swarm", "2", "--compare-local", "--json"]
    args += ["--repeats", "1", "--new-tokens", "6", "--seq-len", "8", "--batch-size", "2"]
    result = subprocess.run(petals_command(*args), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    figures = {"inference_steps_per_s", "time_to_first_token_s", "forward_tokens_per_s", "training_tokens_per_s"}
    assert set(report["swarm"]) == set(report["local"]) == set(report["swarm_over_local"]) == figures
    assert report["servers"] == ["0:2", "2:4"]
    for side in ("swarm", "local"):
        for figure in report[side].values():
            assert 0 < figure["low"] <= figure["median"] <= figure["high"]
    assert "petals-bench" not in subprocess.run(["ps", "aux"], capture_output=True, text=True).stdout


def test_bench_without_a_swarm_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PETALS_INITIAL_PEERS", raising=False)
    result = subprocess.run(petals_command("bench", str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--local-swarm" in result.stderr
