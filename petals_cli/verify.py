"""Spot checks of remote computation: when two replicas' outputs count as the same, and who was outvoted.

The client re-runs a sample of steps and requests on another replica (``client/checks.py``) and compares here. Honest
replicas never agree bit for bit: the step engine batches steps of other sessions with ours, and a replica that
catches up runs many tokens at once where the first ran them one by one, so matrix products round differently.
Two outputs agree when, for every token, the norm of their difference is at most ``tolerance(dtype)`` times the
norm of the reference: 1e-3 for float32 (rounding differences of float32 across batch shapes are about 1e-6;
a change of a token's hidden state by 0.1% of its size is caught), 2e-2 for float16 and 5e-2 for bfloat16 (their
8 and 11 bits of mantissa round far more). Pure: no network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TOLERANCES = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def tolerance(*dtypes: torch.dtype) -> float:
    """The relative error allowed between outputs computed in ``dtypes`` (the loosest of them)."""
    return max(TOLERANCES.get(dtype, 5e-2) for dtype in dtypes)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per token (every dim but the last): |output - reference| / |reference|, in float32."""
    output, reference = output.float(), reference.float()
    scale = reference.norm(dim=-1).clamp_min(1e-6)
    error = (output - reference).norm(dim=-1) / scale
    return torch.nan_to_num(error, nan=math.inf, posinf=math.inf)


@dataclass(frozen=True)
class Comparison:
    """Two outputs compared: the worst token's relative error and the first token (along dim 1) that disagreed."""

    max_error: float
    tolerance: float
    first_bad: int | None  # None: they agree

    @property
    def agree(self) -> bool:
        return self.first_bad is None


def compare(output: torch.Tensor, reference: torch.Tensor) -> Comparison:
    """Compare ``output`` with ``reference`` ([batch, tokens, hidden], or any shape whose last dim is features)."""
    limit = tolerance(output.dtype, reference.dtype)
    if output.shape != reference.shape:
        return Comparison(math.inf, limit, 0)
    error = relative_error(output, reference)
    if error.dim() >= 2:  # [batch, tokens, ...]: the worst of every token position
        worst_per_token = error.reshape(error.shape[0], error.shape[1], -1).amax(dim=(0, 2))
    else:  # a weight's gradient [rows, features] gives one error per row
        worst_per_token = error.reshape(-1)
    bad = (worst_per_token > limit).nonzero()
    worst = float(worst_per_token.max()) if worst_per_token.numel() else 0.0
    return Comparison(worst, limit, int(bad[0, 0]) if bad.numel() else None)


@dataclass
class VerificationCounts:
    """What one client's checks found so far (``checks.Verifier.counts``; ``model.petals_verification``)."""

    checks: int = 0  # checks that a replica confirmed
    outputs: int = 0  # token outputs (per span) those checks covered
    caught: list[str] = field(default_factory=list)  # peer ids outvoted and banned, in order

    def to_json(self) -> dict:
        return {"checks": self.checks, "outputs_checked": self.outputs, "caught": list(self.caught)}

    def summary(self) -> str:
        caught = f"caught {len(self.caught)}: {', '.join(self.caught)}" if self.caught else "no server caught"
        return f"verification: {self.checks} checks confirmed ({self.outputs} token outputs); {caught}"


def checks_needed(rate: float, tamper: float, confidence: float = 0.95) -> int:
    """Steps after which a server that tampers with each step with probability ``tamper`` has been caught with
    probability ``confidence``, when each step is checked with probability ``rate`` and a check also covers every
    step since the previous one (a catching-up replica recomputes them): the first tampered step T is geometric
    in ``tamper``, the first check at or after it comes W steps later, geometric in ``rate``, and
    P(caught by step n) = sum over t <= n of tamper (1 - tamper)^(t-1) (1 - (1 - rate)^(n - t + 1))."""
    if not (0 < rate <= 1 and 0 < tamper <= 1 and 0 < confidence < 1):
        raise ValueError("rate and tamper in (0, 1], confidence in (0, 1)")
    n, caught = 0, 0.0
    while caught < confidence:
        n += 1
        caught = sum(tamper * (1 - tamper) ** (t - 1) * (1 - (1 - rate) ** (n - t + 1)) for t in range(1, n + 1))
        if n > 1_000_000:
            break
    return n
