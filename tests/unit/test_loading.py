"""Loading only what is needed: a span's blocks on a server, the local modules on a client."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from petals_cli.checkpoint import resolve_model
from petals_cli.remote_model import AutoDistributedModelForCausalLM
from petals_cli.server.blocks import load_span, read_model_config
from petals_cli.testing import make_tiny_model


def strip_base_prefix(model_dir, prefix):
    """Rewrite a checkpoint the way base-model checkpoints (e.g. bigscience/bloom) name tensors."""
    index_path = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        if index_path.exists()
        else ["model.safetensors"]
    )
    weight_map = {}
    for file in files:
        tensors = {name.removeprefix(f"{prefix}."): tensor for name, tensor in load_file(model_dir / file).items()}
        save_file(tensors, model_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    if index_path.exists():
        index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("family, prefix", [("llama", "model"), ("bloom", "transformer")])
@pytest.mark.parametrize("stripped", [False, True], ids=["full-names", "base-model-names"])
def test_span_and_local_modules_match_the_full_model(tmp_path, family, prefix, stripped):
    model_dir = make_tiny_model(tmp_path / family, family, num_layers=4, shards=2)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if stripped:
        strip_base_prefix(model_dir, prefix)
    source = resolve_model(str(model_dir))
    span = load_span(source, read_model_config(source), 1, 3, device="cpu", dtype=torch.float32)
    input_ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        hidden_states = reference(input_ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(span(hidden_states[1], 1, 3), hidden_states[3], atol=1e-5, rtol=0)
    local = AutoDistributedModelForCausalLM.load_local_modules(str(model_dir), dtype=torch.float32)
    assert [name for name, _ in local.named_parameters() if ".layers." in name or ".h." in name] == []
    reference_state = reference.state_dict()
    for name, tensor in local.state_dict().items():
        torch.testing.assert_close(tensor, reference_state[name], atol=0, rtol=0)
    assert local.get_output_embeddings().weight.data_ptr() != 0


def test_bfloat16_span_keeps_the_callers_dtype(tmp_path):
    model_dir = make_tiny_model(tmp_path / "llama", "llama", num_layers=2)
    source = resolve_model(str(model_dir))
    span = load_span(source, read_model_config(source), 0, 2, device="cpu", dtype=torch.bfloat16)
    assert span.dtype == torch.bfloat16
    output = span(torch.randn(1, 3, 64), 0, 2)
    assert output.dtype == torch.float32 and torch.isfinite(output).all()
