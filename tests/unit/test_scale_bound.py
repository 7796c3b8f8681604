"""The scale benchmark's throughput bound: a server's paced capacity, the min over blocks, and a flow reaching it."""

import random

import pytest

from petals_cli.testing.paced import DeviceModel
from petals_cli.testing.scale_bound import PacedSpan, block_capacities, pipeline_bound, spread_flow

FAST = DeviceModel(overhead_ms=20.0, block_ms=10.0, token_ms=1.0, batch_capacity=8)
SLOW = DeviceModel(overhead_ms=40.0, block_ms=30.0, token_ms=5.0, batch_capacity=2)


def test_a_servers_capacity_is_full_batches_through_its_whole_span():
    server = PacedSpan("a", 0, 4, FAST)
    assert server.tokens_per_second == pytest.approx(8 / ((20 + 4 * (10 + 8 * 1)) / 1000))  # 8 per 92 ms


def test_the_bound_of_a_known_placement_is_its_weakest_blocks_summed_capacity():
    fast, slow, other = PacedSpan("f", 0, 4, FAST), PacedSpan("s", 2, 6, SLOW), PacedSpan("o", 4, 6, FAST)
    c_fast, c_slow, c_other = fast.tokens_per_second, slow.tokens_per_second, other.tokens_per_second
    capacities = block_capacities([fast, slow, other], 6)
    assert capacities == pytest.approx(
        [c_fast, c_fast, c_fast + c_slow, c_fast + c_slow, c_slow + c_other] + [c_slow + c_other]
    )
    assert pipeline_bound([fast, slow, other], 6) == pytest.approx(min(c_fast, c_slow + c_other))
    assert pipeline_bound([fast, slow], 8) == 0.0  # blocks 6 and 7: nobody


def random_swarm(rng: random.Random, num_blocks: int) -> list[PacedSpan]:
    servers = []
    for number in range(rng.randrange(1, 12)):
        start = rng.randrange(num_blocks)
        end = rng.randrange(start + 1, num_blocks + 1)
        servers.append(PacedSpan(str(number), start, end, rng.choice([FAST, SLOW])))
    return servers


@pytest.mark.parametrize("seed", range(200))
def test_a_flow_of_the_bound_exists_within_every_servers_capacity(seed):
    rng = random.Random(seed)
    num_blocks = rng.randrange(1, 10)
    servers = random_swarm(rng, num_blocks)
    bound = pipeline_bound(servers, num_blocks)
    loads = spread_flow(servers, num_blocks, bound)
    for server, load in zip(servers, loads, strict=True):
        assert -1e-9 <= load <= server.tokens_per_second + 1e-9
    if bound > 0:
        with pytest.raises(ValueError):
            spread_flow(servers, num_blocks, bound * 1.01)  # and none above it: the weakest block is a cut
