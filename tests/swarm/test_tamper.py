"""The tampering server (``petals_cli.testing.tamper``) really serves, and really lies when told to."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_tiny_model
from petals_cli.testing.tamper import tampered
from tests.conftest import Swarm

INPUT_IDS = torch.tensor([[5, 17, 42, 9, 23, 61, 8]])
NEW_TOKENS = 2


def logits_through(model):
    """Logits of a forward pass, and of each step of a greedy generation (the prompt, then one new token)."""
    with torch.no_grad():
        forward = model(INPUT_IDS).logits
    generated = model.generate(
        INPUT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return forward, generated.logits


@pytest.fixture(scope="module")
def swarms(tmp_path_factory):
    """Two one-server swarms of the same tiny model: one that always shifts, one that never tampers."""
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", num_layers=2)
    lying = Swarm(model=model, workdir=tmp_path_factory.mktemp("lying"))
    honest = Swarm(model=model, workdir=tmp_path_factory.mktemp("honest"))
    try:
        servers = [
            lying.start("0:2", wait=False, tamper=("--mode", "shift", "--scale", "1.0", "--probability", "1")),
            honest.start("0:2", wait=False, tamper=("--mode", "shift", "--scale", "1.0", "--probability", "0")),
        ]
        for swarm, server in zip((lying, honest), servers, strict=True):
            swarm.wait_ready(server)
        yield model, lying, honest
    finally:
        lying.stop()
        honest.stop()


def through_swarm(model, swarm):
    distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
    try:
        return logits_through(distributed)
    finally:
        distributed.close()


@pytest.mark.slow
def test_a_tampering_server_gives_other_logits_and_with_probability_0_the_local_ones(swarms):
    model, lying, honest = swarms
    local_forward, local_steps = logits_through(AutoModelForCausalLM.from_pretrained(model).eval())
    assert len(local_steps) == NEW_TOKENS

    lied_forward, lied_steps = through_swarm(model, lying)
    assert lied_forward.shape == local_forward.shape
    assert not torch.allclose(lied_forward, local_forward, atol=1e-2)  # the forward request
    for lied, local in zip(lied_steps, local_steps, strict=True):  # the prompt's step, then a one-token step
        assert lied.shape == local.shape and not torch.allclose(lied, local, atol=1e-2)

    honest_forward, honest_steps = through_swarm(model, honest)
    torch.testing.assert_close(honest_forward, local_forward, atol=1e-4, rtol=0)
    for honest_step, local in zip(honest_steps, local_steps, strict=True):
        torch.testing.assert_close(honest_step, local, atol=1e-4, rtol=0)

    for swarm in (lying, honest):
        assert "TAMPERING server: mode=shift" in swarm.servers[0].log()


def test_tampering_keeps_shape_and_dtype_and_leaves_its_input_alone():
    hidden = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    before = hidden.clone()
    for mode in ("noise", "zero", "shift"):
        result = tampered(hidden, mode, 0.5, noise_seed=1)
        assert result.shape == hidden.shape and result.dtype == hidden.dtype and not torch.equal(result, hidden)
    assert torch.equal(hidden, before)
    zeroed = tampered(hidden, "zero", 0.5)
    assert torch.equal(zeroed[:, :-1], hidden[:, :-1]) and not zeroed[:, -1].any()


@pytest.mark.parametrize("options", [["--mode", "bogus"], ["--mode", "zero", "--probability", "1.5"]])
def test_bad_tamper_options_are_one_error_line_and_exit_2_before_any_server(tmp_path, options):
    command = [sys.executable, "-m", "petals_cli.testing.tamper", *options, "--", str(tmp_path / "none")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "TAMPERING" not in result.stderr  # it stopped before patching anything or starting `petals serve`
