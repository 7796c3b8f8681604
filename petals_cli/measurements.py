"""What a benchmark reports: each figure's median and spread over runs, the report of a run, the machine it ran on.

Plain records and arithmetic (``bench`` measures; the CLI renders). A figure whose runs span more than
``SPREAD_LIMIT`` of its median is flagged as unstable, and so is any ratio built from it.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field

import torch

SPREAD_LIMIT = 0.3  # runs spanning more of their median (over ±15%) are flagged: a ratio of such figures means little


@dataclass(frozen=True)
class Measurement:
    name: str
    unit: str
    median: float
    low: float
    high: float
    spread: float = 0.0  # (high - low) / median

    @classmethod
    def of(cls, name: str, unit: str, samples: list[float]) -> Measurement:
        median, low, high = statistics.median(samples), min(samples), max(samples)
        spread = (high - low) / median if median > 0 else 0.0
        return cls(name, unit, round(median, 4), round(low, 4), round(high, 4), round(spread, 3))

    @property
    def unstable(self) -> bool:
        return self.spread > SPREAD_LIMIT


@dataclass
class BenchReport:
    model: str
    config: dict
    swarm: dict[str, Measurement] = field(default_factory=dict)
    local: dict[str, Measurement] = field(default_factory=dict)
    servers: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)  # CPUs, torch threads, OpenMP wait policy, load when it began

    def ratios(self) -> dict[str, float]:
        """swarm / local for every figure measured both ways (for times, local / swarm: above 1 is better)."""
        ratios = {}
        for name, measured in self.swarm.items():
            if name in self.local and self.local[name].median > 0 and measured.median > 0:
                higher_is_better = measured.unit not in ("s", "ms")  # times: lower is better
                ratio = measured.median / self.local[name].median
                ratios[name] = round(ratio if higher_is_better else 1 / ratio, 3)
        return ratios

    def unstable(self) -> list[str]:
        """``side.figure`` for every figure whose runs differ by more than ``SPREAD_LIMIT`` of its median."""
        sides = {"swarm": self.swarm, "local": self.local}
        return [
            f"{side}.{name}" for side, figures in sides.items() for name, value in figures.items() if value.unstable
        ]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "config": self.config,
            "servers": self.servers,
            "machine": self.machine,
            "swarm": {name: asdict(value) for name, value in self.swarm.items()},
            "local": {name: asdict(value) for name, value in self.local.items()},
            "swarm_over_local": self.ratios(),
            "spread_limit": SPREAD_LIMIT,
            "unstable": self.unstable(),
        }


def machine() -> dict:
    """What the figures depend on beyond the model: cores, threads, how idle threads wait, how busy the machine was."""
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
