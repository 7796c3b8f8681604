"""Quantised spans (bitsandbytes int8 / NF4, on the CPU here): smaller weights, outputs close to float32."""

import pytest
import torch
from torch import nn

from petals_cli.checkpoint import resolve_model
from petals_cli.config import ServerConfig
from petals_cli.errors import ConfigError
from petals_cli.server.blocks import load_span, read_model_config
from petals_cli.server.quant import check_quant, weight_bytes
from petals_cli.testing import make_tiny_model

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # wide enough for many quantisation blocks (64 values) per row; weights scaled like a real model's
    path = make_tiny_model(
        tmp_path_factory.mktemp("quant") / "tiny", num_layers=2, hidden_size=256, num_heads=4, init_std=0.02
    )
    return resolve_model(str(path))


@pytest.mark.parametrize(("mode", "tolerance", "shrink"), [("int8", 0.03, 0.3), ("nf4", 0.3, 0.2)])
def test_a_quantised_span_is_smaller_and_close_to_float32(source, mode, tolerance, shrink):
    model = read_model_config(source)
    full = load_span(source, model, 0, 2, device="cpu", dtype=torch.float32)
    quantised = load_span(source, model, 0, 2, device="cpu", dtype=torch.float32, quant=mode)
    assert not any(type(module) is nn.Linear for module in quantised.modules())
    assert quantised.dtype == torch.float32  # activations stay float32
    linear_bytes = sum(weight_bytes(m) for m in full.modules() if type(m) is nn.Linear)
    quantised_bytes = weight_bytes(quantised) - (weight_bytes(full) - linear_bytes)
    assert quantised_bytes < shrink * linear_bytes
    hidden = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, output = full(hidden, 0, 2), quantised(hidden, 0, 2)
    change = (expected - hidden).norm()  # what the blocks add to the residual stream
    assert (output - expected).norm() < tolerance * change
    assert not torch.equal(output, expected)


def test_a_quantised_span_passes_gradients_to_its_inputs(source):
    quantised = load_span(source, read_model_config(source), 0, 2, device="cpu", dtype=torch.float32, quant="int8")
    hidden = torch.randn(1, 4, 256, requires_grad=True)
    quantised(hidden, 0, 2).sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_unknown_quant_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="int8, nf4"):
        ServerConfig(model="m", new_swarm=True, quant="int4")
    check_quant("int8")  # bitsandbytes is installed here
