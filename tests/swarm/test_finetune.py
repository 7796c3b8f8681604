"""Prompt tuning through a real swarm: gradients, training, checkpoints, generation and failover."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm
from tests.swarm.checks import causal_lm_loss, local_prompted_logits

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
PRE_SEQ_LEN = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", num_layers=NUM_LAYERS)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many("0:2", "2:4", "1:4")
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        yield model, swarm, local, tokenizer
    finally:
        swarm.stop()


@pytest.mark.parametrize("method", ["ptune", "deep_ptune"])
def test_prompt_gradients_through_the_swarm_equal_local_autograd(setup, method):
    model, swarm, local, tokenizer = setup
    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        str(model), initial_peers=swarm.initial_peers, tuning_mode=method, pre_seq_len=PRE_SEQ_LEN
    )
    try:
        tuning = distributed.prompt_tuning
        torch.manual_seed(5)
        with torch.no_grad():
            for parameter in tuning.parameters():
                parameter.normal_(0, 0.3)
        input_ids = torch.randint(0, 500, (2, 7))
        loss = distributed(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        reference = [parameter.detach().clone().requires_grad_(True) for parameter in tuning.parameters()]
        local_loss = causal_lm_loss(
            local_prompted_logits(local, input_ids, reference[0], reference[1] if method == "deep_ptune" else None),
            input_ids,
        )
        local_loss.backward()
        torch.testing.assert_close(loss.detach(), local_loss.detach(), atol=1e-5, rtol=1e-5)
        for parameter, expected in zip(tuning.parameters(), reference, strict=True):
            assert expected.grad.abs().sum() > 0
            torch.testing.assert_close(parameter.grad, expected.grad, atol=1e-5, rtol=1e-4)
        assert distributed.trainable_parameters() == list(tuning.parameters())
        assert len(distributed.trainable_parameters()) == (2 if method == "deep_ptune" else 1)
    finally:
        distributed.close()
