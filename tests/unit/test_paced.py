"""The paced server's device model, its pacer (with a fake clock, then a real one) and what ``install`` patches."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from petals_cli.server import engine, host
from petals_cli.server.compute import SpanCompute
from petals_cli.server.engine import StepEngine
from petals_cli.server.throughput import FORWARD_TOKENS, cache_path
from petals_cli.testing import paced
from petals_cli.testing.paced import PRESETS, DeviceModel, Pacer


def test_the_formula_counts_a_fixed_overhead_then_each_block_and_each_token_per_block():
    device = DeviceModel(overhead_ms=2.0, block_ms=3.0, token_ms=0.5)
    assert device.seconds(blocks=4, tokens=1) == pytest.approx((2.0 + 4 * (3.0 + 0.5)) / 1000)
    assert device.seconds(blocks=4, tokens=100) == pytest.approx((2.0 + 4 * (3.0 + 50.0)) / 1000)
    assert device.seconds(blocks=4, tokens=10, passes=2) == pytest.approx(2 * device.seconds(4, 10))
    assert device.inference_rps() == pytest.approx(1000 / 5.5)
    assert device.forward_rps(128) == pytest.approx(128 * 1000 / (2.0 + 3.0 + 64.0))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_batches_cheaply_and_pays_for_prompts(name):
    device = PRESETS[name]
    one, batch = device.seconds(8, 1), device.seconds(8, device.batch_capacity)
    assert one < batch < 1.5 * one  # a full batch of one-token steps costs little more than one step
    assert device.seconds(8, 512) > 2 * one  # a long prompt costs more than a step
    assert 1 <= device.batch_capacity <= engine.MAX_BATCH


def test_the_presets_are_ordered_from_fast_to_slow():
    fast, slow, laptop = PRESETS["fast-gpu"], PRESETS["slow-gpu"], PRESETS["laptop"]
    for blocks, tokens in ((1, 1), (16, 1), (16, 8), (16, 256)):
        assert fast.seconds(blocks, tokens) < slow.seconds(blocks, tokens) < laptop.seconds(blocks, tokens)


def test_a_device_model_refuses_negative_times_and_an_empty_batch():
    with pytest.raises(ValueError):
        DeviceModel(overhead_ms=-1.0, block_ms=1.0, token_ms=0.0)
    with pytest.raises(ValueError):
        DeviceModel(overhead_ms=1.0, block_ms=1.0, token_ms=0.0, batch_capacity=0)


def test_options_take_a_preset_and_replace_the_numbers_given():
    argv = ["--device", "laptop", "--block-ms", "7", "--", "./model", "--blocks", "0:2"]
    device, serve_args, options = paced.parse(argv)
    assert device == DeviceModel(5.0, 7.0, 1.0, 2) and serve_args == ["./model", "--blocks", "0:2"]
    assert options == paced.Options()
    argv = ["--overhead-ms", "0", "--batch-capacity", "3", "--place-at", "1.5e9", "--slow-on-usr1", "4", "--", "./m"]
    device, _, options = paced.parse(argv)
    assert device == DeviceModel(0.0, PRESETS["slow-gpu"].block_ms, PRESETS["slow-gpu"].token_ms, 3)
    assert options == paced.Options(place_at=1.5e9, slow_on_usr1=4.0)


@pytest.mark.parametrize(
    "argv",
    [["--device", "laptop"], ["--block-ms", "-1", "--", "m"], ["--token-ms", "nan", "--", "m"],
     ["--batch-capacity", "0", "--", "m"], ["--device", "tpu", "--", "m"], ["--place-at", "soon", "--", "m"],
     ["--slow-on-usr1", "0.5", "--", "m"]],
)  # fmt: skip
def test_bad_options_exit_with_code_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        paced.parse(argv)
    assert exit_info.value.code == 2 and "paced -h" in capsys.readouterr().err


class FakeClock:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_the_pacer_waits_out_what_the_compute_left_of_the_modelled_time():
    clock = FakeClock()
    pacer = Pacer(DeviceModel(10.0, 5.0, 1.0), clock=lambda: clock.now, sleep=clock.sleep)

    def compute(seconds):
        clock.now += seconds
        return "output"

    assert pacer.run(lambda: compute(0.004), blocks=2, tokens=3) == "output"
    assert clock.slept == [pytest.approx(0.026 - 0.004)]  # 10 + 2 x (5 + 3) ms, 4 ms of it computing
    clock.slept.clear()
    pacer.run(lambda: compute(0.5), blocks=2, tokens=3)  # slower than the device: nothing added
    assert clock.slept == []
    with pytest.raises(RuntimeError):
        pacer.run(lambda: (_ for _ in ()).throw(RuntimeError("failed")), blocks=2, tokens=3)
    assert clock.slept == []


def test_twenty_paced_calls_at_once_wait_instead_of_burning_cpu():
    """What lets tens of paced servers share two cores: their compute threads sleep out the modelled time."""
    pacer = Pacer(DeviceModel(overhead_ms=300.0, block_ms=0.0, token_ms=0.0))
    durations = []

    def one_call():
        started = time.monotonic()
        pacer.run(lambda: sum(range(1000)), blocks=1, tokens=1)  # a little real compute
        durations.append(time.monotonic() - started)

    threads = [threading.Thread(target=one_call) for _ in range(20)]
    cpu_before, wall_before = time.process_time(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - wall_before
    assert min(durations) >= 0.3  # each call took the modelled time ...
    assert wall < 0.3 * 20 / 2  # ... together, not one after another
    assert cpu < 0.25 * wall, f"{cpu:.3f}s of CPU over {wall:.3f}s"  # spinning would cost about one core


class FakeSpan:
    """What ``throughput.measure`` uses of a span, computing nothing."""

    start, device, config = 0, torch.device("cpu"), SimpleNamespace(hidden_size=8)

    def make_cache(self, *args, **kwargs):
        return None

    def __call__(self, hidden, start, end, cache=None):
        return hidden


@pytest.fixture
def restored(monkeypatch, tmp_path):
    """``install`` patches classes and modules of this process: undo it after the test."""
    for owner, name in ((SpanCompute, "run_group"), (SpanCompute, "forward"), (SpanCompute, "backward"),
                        (StepEngine, "__init__"), (host, "get_throughput")):  # fmt: skip
        monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setenv("PETALS_CACHE_DIR", str(tmp_path))


def test_install_caps_the_engines_batches_and_measures_the_throughput_paced_without_the_cache(restored):
    device = DeviceModel(overhead_ms=2.0, block_ms=3.0, token_ms=0.01, batch_capacity=3)
    paced.install(Pacer(device))
    assert StepEngine(lambda group: []).max_batch == 3
    throughput = host.get_throughput(FakeSpan(), "model|cpu|float32", network_rps=7.0)
    assert device.inference_rps() / 2 < throughput.inference_rps <= device.inference_rps()
    assert device.forward_rps(FORWARD_TOKENS) / 2 < throughput.forward_rps <= device.forward_rps(FORWARD_TOKENS)
    assert throughput.network_rps == 7.0
    assert not cache_path().exists()  # an unpaced server of the same model measures its own figure


def test_a_capacity_above_the_engines_own_limit_does_not_raise_it(restored):
    paced.install(Pacer(DeviceModel(1.0, 1.0, 0.0, batch_capacity=engine.MAX_BATCH + 8)))
    assert StepEngine(lambda group: []).max_batch == engine.MAX_BATCH
