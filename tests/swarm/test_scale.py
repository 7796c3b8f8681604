"""The scale benchmark's harness run small (three paced servers placing themselves, two client processes): no
wrong token, every block covered once the servers joined, the reported bound the formula's for the placement it
saw, and one server SIGKILLed. Behaviour only: no figure of speed or balance is asserted."""

import pytest

from petals_cli.testing import make_tiny_model
from petals_cli.testing.scale import Scale, ScaleSettings
from petals_cli.testing.scale_report import summarize

pytestmark = pytest.mark.slow
SETTINGS = ScaleSettings(
    servers=3,
    sessions=4,
    clients=2,
    layers=8,
    mix=(("fast", 1),),  # 3 blocks each of 8 (16 of 40, rounded): 9 blocks, one of them held twice
    join="together",
    minutes=0.3,
    after_minutes=0.2,
    kill_fraction=0.34,
    new_tokens=8,
    check_rate=1.0,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-scale", "llama", num_layers=SETTINGS.layers)
    run = Scale(SETTINGS, model, tmp_path_factory.mktemp("scale")).run()
    assert all(peer.process.poll() is not None for peer in run.peers)  # nothing left behind
    return summarize(run)


def test_sessions_generate_exact_tokens_over_a_placement_that_covers_every_block(report):
    assert report["tokens"] > 0 and report["checked_tokens"] > 0
    assert report["wrong_tokens"] == 0
    assert report["placement_at_start"]["coverage_min"] >= 1
    assert report["killed"] == 1


def test_the_reported_bound_is_the_weakest_blocks_summed_paced_capacity(report):
    placement = report["placement_at_kill"]
    capacity = [0.0] * SETTINGS.layers
    for name, span in placement["spans"].items():
        start, end = map(int, span.split(":"))
        device = SETTINGS.device(SETTINGS.server_class(int(name.removeprefix("server"))))
        batch = device.batch_capacity  # a full batch of one-token steps through the whole span
        tokens_per_s = batch / (
            (device.overhead_ms + (end - start) * (device.block_ms + device.token_ms * batch)) / 1000
        )
        for block in range(start, end):
            capacity[block] += tokens_per_s
    assert placement["bound_tokens_s"] == pytest.approx(min(capacity), abs=0.01)
