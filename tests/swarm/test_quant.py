"""A server with --quant int8 (bitsandbytes on the CPU) serves its blocks, announces it, stays close to float."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")


def test_an_int8_server_is_announced_and_close_to_float(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", num_layers=4, hidden_size=256, num_heads=4, init_std=0.02)
    swarm = Swarm(model=model, workdir=tmp_path / "swarm")
    (tmp_path / "swarm").mkdir()
    try:
        swarm.start("0:2")
        swarm.start("2:4", "--quant", "int8")
        distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
        try:
            client = distributed.petals_client
            snapshot = client.run(client.snapshot(distributed.petals_prefix, 4))
            quantization = {(info.start_block, info.quantization) for info in snapshot.servers.values()}
            assert quantization == {(0, "none"), (2, "int8")}
            input_ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
            with torch.no_grad():
                remote = distributed(input_ids).logits
                local = AutoModelForCausalLM.from_pretrained(model).eval()(input_ids).logits
            assert not torch.equal(remote, local)  # the weights really are quantised
            assert (remote - local).norm() < 0.05 * local.norm()
        finally:
            distributed.close()
    finally:
        swarm.stop()
    assert "quantised 14 linear layers to int8" in swarm.servers[1].log()
