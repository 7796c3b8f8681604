"""The family registry and the generic adapter, checked per family without a swarm.

Each family's spans (and sub-ranges of a span, which routes may use) must reproduce the local model's hidden
states, with and without a cache, across its sliding window; the registry must name what it supports and take
families from outside packages, directly or through the ``petals.families`` entry-point group.
"""

from importlib.metadata import EntryPoint

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.cache_utils import DynamicLayer

import petals_cli.families as families
from petals_cli.checkpoint import resolve_model, weight_map
from petals_cli.errors import UnsupportedModelError
from petals_cli.families import Family, family_for, register, supported_model_types
from petals_cli.families.builtin import FAMILIES
from petals_cli.families.kv_cache import PreallocatedLayer
from petals_cli.remote_model import AutoDistributedModelForCausalLM
from petals_cli.server.blocks import load_span, read_model_config
from petals_cli.testing import SUPPORTED_FAMILIES, make_tiny_model
from petals_cli.testing.models import INDEX_FILE, SINGLE_FILE, TINY_SLIDING_WINDOW

NUM_LAYERS = 5  # spans stop before the last block: hidden_states[-1] is after the final norm
OUTSIDE_FAMILY = Family(
    name="outside",
    model_types=("outside-model",),
    block_prefix="backbone.blocks",
    embedding_modules=("backbone.embed",),
    final_norm="backbone.norm",
)


@pytest.fixture(scope="module", params=SUPPORTED_FAMILIES)
def tiny(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, num_layers=NUM_LAYERS)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture
def fresh_registry(monkeypatch):
    """An empty, not yet loaded registry, restored after the test."""
    monkeypatch.setattr(families, "_registry", {})
    monkeypatch.setattr(families, "_loaded", False)


def test_every_builtin_family_is_registered_by_its_model_types():
    builtin_types = {"llama", "bloom", "mistral", "qwen2", "qwen3", "mixtral", "falcon", "gemma"}
    assert set(supported_model_types()) >= builtin_types
    for family in FAMILIES:
        for model_type in family.model_types:
            assert family_for(type("Config", (), {"model_type": model_type})()) is family


def test_an_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as error:
        family_for(GPT2Config(n_layer=1))
    assert "'gpt2' is not supported" in str(error.value)
    assert all(model_type in str(error.value) for model_type in ("llama", "mixtral", "falcon", "gemma"))


def test_register_adds_an_outside_family(fresh_registry):
    config = type("Config", (), {"model_type": "outside-model"})()
    with pytest.raises(UnsupportedModelError):
        family_for(config)
    assert register(OUTSIDE_FAMILY) is OUTSIDE_FAMILY
    assert family_for(config) is OUTSIDE_FAMILY
    assert family_for(LlamaConfig()).name == "llama"  # the built-ins stay


def test_an_entry_point_adds_an_outside_family(fresh_registry, monkeypatch):
    group = families.ENTRY_POINT_GROUP
    outside = EntryPoint(name="outside", value=f"{__name__}:OUTSIDE_FAMILY", group=group)
    builtin = EntryPoint(name="builtin", value="petals_cli.families.builtin:FAMILIES", group=group)

    def entry_points(group):
        return [outside, builtin] if group == families.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(families, "entry_points", entry_points)
    assert "outside-model" in supported_model_types()
    assert family_for(type("Config", (), {"model_type": "outside-model"})()) is OUTSIDE_FAMILY


def test_greedy_output_of_the_tiny_model_is_not_one_repeated_token(tiny):
    _, local = tiny
    output = local.generate(torch.tensor([[1, 40, 41, 42, 43]]), max_new_tokens=24, do_sample=False)
    assert len(set(output[0, 5:].tolist())) > 4, output.tolist()


def test_span_and_its_sub_ranges_match_local_hidden_states_with_and_without_a_cache(tiny):
    path, local = tiny
    source = resolve_model(str(path))
    span = load_span(source, read_model_config(source), 1, 4, device="cpu", dtype=torch.float32)
    input_ids = torch.randint(3, 500, (2, 2 * TINY_SLIDING_WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden_states = local(input_ids, output_hidden_states=True).hidden_states
        for start, end in [(1, 4), (1, 2), (2, 3), (3, 4)]:  # the span, and sub-ranges a route may use
            expected = hidden_states[end]
            torch.testing.assert_close(span(hidden_states[start], start, end), expected, atol=1e-5, rtol=1e-5)
            cache, prefill = span.make_cache(start, end), TINY_SLIDING_WINDOW // 2
            steps = [span(hidden_states[start][:, :prefill], start, end, cache)]
            for position in range(prefill, input_ids.shape[1]):  # one token at a time, past the sliding window
                steps.append(span(hidden_states[start][:, position : position + 1], start, end, cache))
            # a cache changes the summation order: float32 rounding, relative to the (large) residual stream
            scale = expected.abs().max().item()
            torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5 * scale, rtol=0)


def _prefill_then_steps(span, cache, hidden, mask, positions, *, prefill: int) -> torch.Tensor:
    """Blocks 1:4 over ``hidden`` with a cache: ``prefill`` tokens at once, then one token per step."""
    outputs = [
        span(hidden[:, :prefill], 1, 4, cache, attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill])
    ]
    for step in range(prefill, hidden.shape[1]):
        extras = dict(attention_mask=mask[:, : step + 1], position_ids=positions[:, step : step + 1])
        outputs.append(span(hidden[:, step : step + 1], 1, 4, cache, **extras))
    return torch.cat(outputs, dim=1)


def test_a_left_padded_batch_in_a_span_matches_each_sequence_alone(tiny):
    path, local = tiny
    source = resolve_model(str(path))
    span = load_span(source, read_model_config(source), 1, 4, device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    lengths, total, new_tokens = (7, 4), 7, 3
    sequences = [torch.randint(3, 500, (1, length + new_tokens), generator=generator) for length in lengths]
    with torch.no_grad():
        alone = [local(ids, output_hidden_states=True).hidden_states for ids in sequences]
        # left-pad the prompts to one batch; pad embeddings are arbitrary (here: the first token's)
        hidden = torch.cat(
            [
                torch.cat([states[1][:, :1].expand(1, total - length, -1), states[1]], dim=1)
                for states, length in zip(alone, lengths, strict=True)
            ]
        )
        mask = torch.stack([torch.arange(total + new_tokens) >= total - length for length in lengths]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = _prefill_then_steps(span, span.make_cache(1, 4), hidden, mask, positions, prefill=total)
    for row, (states, length) in enumerate(zip(alone, lengths, strict=True)):
        expected = states[4][0]
        scale = expected.abs().max().item()
        torch.testing.assert_close(output[row, total - length :], expected, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("capacity", [None, 5])  # a session's max_length, and one it outgrows (buffers grow)
def test_a_preallocated_cache_gives_exactly_what_a_growing_cache_gives(tiny, capacity):
    """Servers write keys/values in place (kv_cache.PreallocatedLayer); outputs must be bit-identical."""
    path, _ = tiny
    source = resolve_model(str(path))
    span = load_span(source, read_model_config(source), 1, 4, device="cpu", dtype=torch.float32)
    total = 2 * TINY_SLIDING_WINDOW + 3
    hidden = torch.randn(2, total, span.config.hidden_size, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, total, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outputs = []
    for cache in (span.make_cache(1, 4), span.make_cache(1, 4, capacity=capacity or total)):
        with torch.no_grad():
            outputs.append(_prefill_then_steps(span, cache, hidden, mask, positions, prefill=4))
        assert cache.get_seq_length() == total
    assert any(isinstance(layer, PreallocatedLayer) for layer in cache.layers) or not any(
        type(layer) is DynamicLayer for layer in span.make_cache(1, 4).layers
    )
    assert torch.equal(outputs[0], outputs[1])


def test_a_preallocated_layer_crops_and_selects_like_a_dynamic_one():
    keys = torch.randn(3, 2, 6, 4)
    values = torch.randn(3, 2, 6, 4)
    dynamic, preallocated = DynamicLayer(), PreallocatedLayer(capacity=8)
    for layer in (dynamic, preallocated):
        layer.update(keys[:, :, :4], values[:, :, :4])
        layer.crop(-1)
        layer.update(keys[:, :, 4:], values[:, :, 4:])
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.update(keys[:2, :, :1], values[:2, :, :1])
    assert preallocated.get_seq_length() == dynamic.get_seq_length() == 6
    assert torch.equal(preallocated.keys, dynamic.keys) and torch.equal(preallocated.values, dynamic.values)
    with pytest.raises(ValueError, match="batch/heads"):
        preallocated.update(keys[:, :, :1], values[:, :, :1])


def test_client_modules_equal_the_local_model(tiny):
    path, local = tiny
    client = AutoDistributedModelForCausalLM.load_local_modules(str(path), dtype=torch.float32)
    input_ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        # Gemma scales embeddings inside its embedding module: the client applies it, once.
        torch.testing.assert_close(client.get_input_embeddings()(input_ids), local.get_input_embeddings()(input_ids))
    reference = local.state_dict()
    for name, tensor in client.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=0, rtol=0)


def test_mixtral_spans_load_from_fused_and_per_expert_checkpoints(tmp_path):
    path = make_tiny_model(tmp_path / "mixtral", "mixtral", num_layers=3, shards=2)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in weight_map(resolve_model(str(path)))
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    input_ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        hidden_states = local(input_ids, output_hidden_states=True).hidden_states
    source = resolve_model(str(path))
    spans = [load_span(source, read_model_config(source), 0, 2, device="cpu", dtype=torch.float32)]
    (path / INDEX_FILE).unlink()  # rewrite in transformers 5's fused names, as state_dict() has them
    for shard in path.glob("model-*.safetensors"):
        shard.unlink()
    save_file({name: tensor.contiguous() for name, tensor in local.state_dict().items()}, str(path / SINGLE_FILE))
    spans.append(load_span(source, read_model_config(source), 0, 2, device="cpu", dtype=torch.float32))
    with torch.no_grad():
        for span in spans:
            torch.testing.assert_close(span(hidden_states[0], 0, 2), hidden_states[2], atol=1e-4, rtol=1e-5)
