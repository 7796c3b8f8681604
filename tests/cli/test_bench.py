"""`petals bench --local-swarm N` starts its own servers, measures both ways and stops them; figures whose runs
disagree are flagged."""

import json
import subprocess

import pytest

from petals_cli.testing import make_tiny_model
from tests.conftest import petals_command


@pytest.mark.slow
def test_bench_with_a_local_swarm_reports_every_figure_both_ways(tmp_path):
    model = make_tiny_model(tmp_path / "tiny-bench", "llama", num_layers=4)
    args = ["bench", str(model), "--local-swarm", "2", "--compare-local", "--json"]
    args += ["--repeats", "1", "--new-tokens", "6", "--seq-len", "8", "--batch-size", "2", "--sessions", "3"]
    result = subprocess.run(petals_command(*args), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Measuring" not in result.stderr and "\x1b[" not in result.stderr  # no spinner in a pipe
    report = json.loads(result.stdout)
    figures = {"inference_steps_per_s", "time_to_first_token_s", "forward_tokens_per_s", "training_tokens_per_s"}
    figures |= {"sessions_tokens_per_s", "sessions_step_p50_ms", "sessions_step_p95_ms"}  # 3 sessions at once
    assert set(report["swarm"]) == set(report["local"]) == set(report["swarm_over_local"]) == figures
    assert report["servers"] == ["0:2", "2:4"]
    for side in ("swarm", "local"):
        for figure in report[side].values():
            assert 0 < figure["low"] <= figure["median"] <= figure["high"]
            assert figure["spread"] == pytest.approx((figure["high"] - figure["low"]) / figure["median"], abs=1e-3)
    assert isinstance(report["unstable"], list) and report["spread_limit"] > 0
    machine = {"cpus", "torch_threads", "omp_wait_policy", "load_average", "local_torch_threads"}
    assert machine <= set(report["machine"])
    assert "petals-bench" not in subprocess.run(["ps", "aux"], capture_output=True, text=True).stdout


@pytest.mark.slow
def test_bench_without_a_swarm_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PETALS_INITIAL_PEERS", raising=False)
    result = subprocess.run(petals_command("bench", str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--local-swarm" in result.stderr


def test_spread_is_the_range_over_the_median_and_too_wide_a_spread_is_flagged(capsys):
    from petals_cli.commands.bench import _render
    from petals_cli.measurements import SPREAD_LIMIT, BenchReport, Measurement

    steady = Measurement.of("forward", "tokens/s", [100.0, 95.0, 105.0])
    assert (steady.median, steady.low, steady.high, steady.spread) == (100.0, 95.0, 105.0, 0.1)
    assert not steady.unstable
    erratic = Measurement.of("forward", "tokens/s", [100.0, 30.0, 500.0])
    assert erratic.spread == 4.7 and erratic.unstable
    assert Measurement.of("time", "s", [0.0, 0.0]).spread == 0.0
    assert not Measurement.of("t", "s", [1.0, 1.0 + SPREAD_LIMIT]).unstable

    report = BenchReport("m", {"repeats": 3}, machine={"cpus": 2, "load_average": 3.5})
    report.swarm = {"forward_tokens_per_s": steady}
    report.local = {"forward_tokens_per_s": erratic}
    assert report.unstable() == ["local.forward_tokens_per_s"]
    assert report.to_json()["unstable"] == ["local.forward_tokens_per_s"]
    assert report.to_json()["local"]["forward_tokens_per_s"]["spread"] == 4.7
    _render(report)
    shown = capsys.readouterr().out
    assert "100 ±5%" in shown and "±235% !" in shown
    assert "warning:" in shown and "load 3.5 on 2 CPUs" in shown

    report.local = {"forward_tokens_per_s": steady}
    assert report.unstable() == []
    _render(report)
    shown = capsys.readouterr().out
    assert "warning" not in shown and "!" not in shown
