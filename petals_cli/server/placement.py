"""Deciding a server's span at start-up and moving it later: the I/O around ``selection``'s pure choices.

``--blocks START:END`` is taken as given. ``--blocks N`` (or ``--num-blocks N``) and ``--blocks auto`` (as
many blocks as fit in the device's free memory next to the cache budget) pick the span that strengthens the
swarm's weakest blocks, after a random delay and settled against the claims of servers that chose at the same
moment, so servers started together do not all pick the same one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from hivemind.utils import get_dht_time

from petals_cli.config import parse_blocks
from petals_cli.errors import ConfigError
from petals_cli.families.base import text_config
from petals_cli.server.selection import block_throughputs, choose_span, earlier_claims
from petals_cli.wire import SwarmSnapshot

logger = logging.getLogger(__name__)
MEMORY_FRACTION = 0.8  # of the free memory a server lets itself use for blocks and caches


def parse_placement(spec: str, num_blocks: int) -> tuple[tuple[int, int] | None, int | None]:
    """'START:END' -> a fixed span; 'N' -> N blocks placed by the swarm; 'auto' -> (None, None)."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return None, None
    if re.fullmatch(r"\d+", spec):
        count = int(spec)
        if not 0 < count <= num_blocks:
            raise ConfigError(f"--blocks {spec}: the model has {num_blocks} blocks")
        return None, count
    return parse_blocks(spec, num_blocks), None


QUANT_BITS = {"none": None, "int8": 8, "nf4": 4.5}  # nf4: 4 bits plus one float scale per 64 weights


def blocks_that_fit(
    config, num_blocks: int, dtype: torch.dtype, device: str, cache_tokens: int, quant: str = "none"
) -> int:
    """How many blocks (with the whole cache budget spread over them) fit in the device's free memory."""
    config = text_config(config)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    element = torch.finfo(dtype).bits // 8
    weight_bits = QUANT_BITS[quant] or torch.finfo(dtype).bits
    block_bytes = (
        (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate) * weight_bits // 8
    )
    cache_bytes_per_block = cache_tokens * 2 * kv_heads * head_dim * element
    free = free_memory(device)
    count = int(MEMORY_FRACTION * free // (block_bytes + cache_bytes_per_block))
    if count < 1:
        raise ConfigError(f"not even one block fits in the free memory of {device}; lower --cache-tokens")
    fits = "all of them fit" if count >= layers else f"{count} fit"
    logger.info("%.1f GiB free on %s for the model's %d blocks: %s", free / 2**30, device, layers, fits)
    return min(count, num_blocks)


def free_memory(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("cannot tell the free memory of this machine; pass --blocks START:END")


CLAIM_SETTLE = 1.0  # at least this long between claiming blocks and reading the swarm again to settle the claim
CLAIM_ROUNDS = 8  # a joiner re-chooses at most this many times (each time a joiner that claimed before took its gap)


def start_delay(max_delay: float) -> float:
    """How long a server waits before reading the swarm: random, so servers started together read it apart
    (``petals_cli.testing.paced --place-at`` replaces it to make joiners decide at the same moment)."""
    return random.uniform(0, max_delay)


async def choose_initial_span(
    read_swarm: Callable[[], Awaitable[SwarmSnapshot]],
    claim: Callable[[tuple[int, int], float], Awaitable[None]],
    length: int,
    *,
    own: str,
    max_delay: float,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    dht_time: Callable[[], float] = get_dht_time,
    delay: float | None = None,
) -> tuple[int, int]:
    """Wait a random moment, read the swarm (``read_swarm`` leaves out servers that do not answer and this one),
    pick the span of ``length`` blocks it needs most and ``claim`` it (announce it JOINING with the claim's time).

    Joiners that read the swarm at the same moment choose the same gap. So a claim is settled before loading: after
    waiting long enough for every joiner that read with us to have claimed too (twice our own read's time, at
    least ``CLAIM_SETTLE``), read again counting only the claims made before ours (``earlier_claims``); if the
    span we would choose now differs, claim that instead (keeping our claim's time, so the order stays put) and
    settle again. The earliest claimant never changes its mind, the next one then settles, and so on.

    ``sleep``, ``clock``, ``dht_time`` and ``delay`` (instead of ``start_delay``'s draw) are the swarm simulator's
    (``testing/simswarm.py``), which runs this coroutine in simulated time."""
    await sleep(start_delay(max_delay) if delay is None else delay)
    span, claimed_at = None, 0.0
    for _ in range(CLAIM_ROUNDS):
        started = clock()
        snapshot = await read_swarm()
        read_seconds = clock() - started
        if claimed_at:
            snapshot = earlier_claims(snapshot, claimed_at, own)
        chosen = choose_span(block_throughputs(snapshot), length)
        if chosen == span:
            break
        if span is not None:
            logger.info("blocks %d:%d were claimed first by another joining server; claiming %d:%d", *span, *chosen)
        span, claimed_at = chosen, claimed_at or dht_time()
        await claim(span, claimed_at)
        await sleep(max(CLAIM_SETTLE, 2 * read_seconds))
    servers = len(snapshot.servers)
    logger.info("chose blocks %d:%d (%d other server%s hold this model)", *span, servers, "" if servers == 1 else "s")
    return span
