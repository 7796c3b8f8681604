"""A server's measured speed: inference steps and forward tokens per second for one of its blocks.

Measured on the server's own device and dtype with its real block, cached per model x device x dtype (so a
restart does not measure again), and announced with its span. Network speed is never guessed: it is
taken from ``--network-rps`` when given, and otherwise left out (0 = unknown).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from petals_cli.families.base import SpanRunner

logger = logging.getLogger(__name__)
CACHE_FILE = "throughput.json"
PROMPT_TOKENS = 16
STEPS = 16
FORWARD_TOKENS = 128


@dataclass(frozen=True)
class Throughput:
    inference_rps: float  # one-token steps per second through one block
    forward_rps: float  # tokens per second through one block in a forward pass
    network_rps: float = 0.0  # 0 = unknown

    @property
    def effective(self) -> float:
        """What the swarm can count on per block: compute, capped by the network when that is known."""
        return min(self.inference_rps, self.network_rps) if self.network_rps > 0 else self.inference_rps


def cache_path() -> Path:
    root = os.environ.get("PETALS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "petals")
    return Path(root) / CACHE_FILE


def get_throughput(span: SpanRunner, key: str, *, network_rps: float = 0.0, refresh: bool = False) -> Throughput:
    """The cached figure for ``key`` (model, device, dtype), measuring it when absent or when ``refresh``."""
    path = cache_path()
    try:
        cached = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        cached = {}
    if refresh or key not in cached:
        measured = measure(span)
        cached[key] = {"inference_rps": measured.inference_rps, "forward_rps": measured.forward_rps}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(cached, indent=1, sort_keys=True))
            os.replace(temporary, path)
        except OSError:
            logger.warning("cannot write the throughput cache at %s", path)
    entry = cached[key]
    return Throughput(float(entry["inference_rps"]), float(entry["forward_rps"]), network_rps)


@torch.inference_mode()
def measure(span: SpanRunner) -> Throughput:
    """Time the span's first block: ``STEPS`` one-token steps after a short prompt, and one forward pass."""
    first = span.start
    hidden_size = span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, PROMPT_TOKENS, hidden_size, generator=generator).to(span.device)
    cache = span.make_cache(first, first + 1, capacity=PROMPT_TOKENS + STEPS)  # as a session's cache is
    span(prompt, first, first + 1, cache)
    step = prompt[:, -1:]
    _synchronize(span.device)
    started = time.perf_counter()
    for _ in range(STEPS):
        span(step, first, first + 1, cache)
    _synchronize(span.device)
    inference_rps = STEPS / (time.perf_counter() - started)
    tokens = torch.randn(1, FORWARD_TOKENS, hidden_size, generator=generator).to(span.device)
    span(tokens, first, first + 1)  # warm-up
    _synchronize(span.device)
    started = time.perf_counter()
    span(tokens, first, first + 1)
    _synchronize(span.device)
    forward_rps = FORWARD_TOKENS / (time.perf_counter() - started)
    logger.info("measured %.1f steps/s and %.0f tokens/s per block", inference_rps, forward_rps)
    return Throughput(round(inference_rps, 3), round(forward_rps, 3))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput_key(model: str, device: str, dtype: torch.dtype, quant: str = "none") -> str:
    precision = str(dtype).replace("torch.", "") + ("" if quant == "none" else f"+{quant}")
    return f"{model}|{device}|{precision}|torch-{torch.__version__}"
