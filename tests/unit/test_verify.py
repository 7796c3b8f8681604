"""When two replicas' outputs agree, and how many steps catch a server that lies now and then."""

import random

import pytest
import torch

from petals_cli.verify import checks_needed, compare, tolerance


def test_outputs_agree_within_the_dtypes_tolerance_and_the_first_bad_token_is_named():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 6, 32, generator=generator) * 50
    assert compare(reference + 1e-5 * reference.abs().mean(), reference).agree
    altered = reference.clone()
    altered[1, 4] += 0.01 * altered[1, 4].norm() / 32**0.5  # a change 1% the size of one token, in one row
    comparison = compare(altered, reference)
    assert not comparison.agree and comparison.first_bad == 4 and comparison.max_error == pytest.approx(0.01, rel=1e-3)
    assert compare(altered.bfloat16(), reference.bfloat16()).agree  # within bfloat16's looser tolerance
    assert tolerance(torch.float32) < tolerance(torch.float16) < tolerance(torch.bfloat16)
    assert not compare(reference[:, :5], reference).agree  # another shape never agrees
    assert not compare(torch.full_like(reference, float("nan")), reference).agree


def test_weight_gradients_compare_row_by_row():
    gradient = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    assert compare(gradient.clone(), gradient).agree
    wrong = gradient.clone()
    wrong[2] *= 1.5
    assert compare(wrong, gradient).first_bad == 2


def test_the_predicted_number_of_steps_catches_a_liar_95_percent_of_the_time():
    """checks_needed against a simulation of its own model: a check at each step with probability ``rate``
    covers every step since the previous check."""
    assert checks_needed(1.0, 1.0) == 1 and checks_needed(0.1, 0.01) == 308 and checks_needed(0.2, 0.05) == 64
    rate, tamper = 0.3, 0.1
    limit = checks_needed(rate, tamper)
    rng, caught = random.Random(0), 0
    for _ in range(4000):
        tampered = False
        for _step in range(limit):
            tampered = tampered or rng.random() < tamper
            if rng.random() < rate and tampered:
                caught += 1
                break
    assert 0.94 <= caught / 4000 <= 0.97  # at least 95% (n is the first count that reaches it)


def test_the_counts_say_what_the_checks_found():
    from petals_cli.verify import VerificationCounts

    counts = VerificationCounts()
    assert counts.summary() == "verification: 0 checks confirmed (0 token outputs); no server caught"
    counts.checks, counts.outputs = 3, 40
    counts.caught.append("QmLiar")
    assert counts.to_json() == {"checks": 3, "outputs_checked": 40, "caught": ["QmLiar"]}
    assert counts.summary().endswith("caught 1: QmLiar")
