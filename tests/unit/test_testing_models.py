"""Tests for petals_cli.testing: tiny local models load offline with transformers, shard by layer, and vary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from petals_cli.testing import ensure_tiny_model, make_tiny_model, make_tokenizer
from petals_cli.testing.__main__ import main as cli_main
from petals_cli.testing.models import INDEX_FILE, MARKER_FILE, SINGLE_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("llama", "bloom")
PROMPT = "The river ran quietly"


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_model(request, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def safetensors_names(path: Path) -> dict[str, torch.dtype]:
    names = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as reader:
            file_names = reader.keys()  # safe_open is not iterable itself
            names.update({name: reader.get_slice(name).get_dtype() for name in file_names})
    return names


def test_loads_offline_with_auto_classes(tiny_model):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model, tokenizer = load(tiny_model)
    assert model.config.model_type in FAMILIES
    assert model.config.num_hidden_layers == 6
    assert model.config.vocab_size == len(tokenizer) == 512
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_tokenizer_round_trips_text_and_decodes_every_id(tiny_model):
    _, tokenizer = load(tiny_model)
    text = "Hello world, the train left at 7:05! Ünïcödé too."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all(isinstance(token, str) for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def test_tokenizer_pads_vocab_with_filler_tokens():
    tokenizer = make_tokenizer(1000)  # larger than what the small corpus can train
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 1000
    assert tokenizer.decode([999]) == "<extra_999>"
    with pytest.raises(ValueError, match="at least"):
        make_tokenizer(100)


def test_greedy_output_is_not_one_repeated_token(tiny_model):
    model, tokenizer = load(tiny_model)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids).logits).all()
    output = model.generate(input_ids, max_new_tokens=24, do_sample=False)
    new_tokens = output[0, input_ids.shape[1] :].tolist()
    assert len(new_tokens) == 24
    assert len(set(new_tokens)) > 4, new_tokens


def test_tensor_names_match_save_pretrained(tiny_model, tmp_path):
    model, _ = load(tiny_model)
    model.save_pretrained(tmp_path)
    assert safetensors_names(tiny_model).keys() == safetensors_names(tmp_path).keys()
    if model.config.model_type == "bloom":
        assert "lm_head.weight" not in safetensors_names(tiny_model)  # tied to the input embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_single_layouts_have_identical_weights(family, tmp_path):
    single = make_tiny_model(tmp_path / "single", family, seed=3)
    sharded = make_tiny_model(tmp_path / "sharded", family, seed=3, shards=3)
    assert (single / SINGLE_FILE).exists() and not (single / INDEX_FILE).exists()
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3 and not (sharded / SINGLE_FILE).exists()
    single_state, sharded_state = load(single)[0].state_dict(), load(sharded)[0].state_dict()
    assert single_state.keys() == sharded_state.keys()
    for name, tensor in single_state.items():
        assert torch.equal(tensor, sharded_state[name]), name


def test_other_seed_gives_other_weights(tmp_path):
    first = load(make_tiny_model(tmp_path / "first", seed=1))[0]
    second = load(make_tiny_model(tmp_path / "second", seed=2))[0]
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, second.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("family, layer_prefix", [("llama", "model.layers"), ("bloom", "transformer.h")])
def test_shard_index_keeps_consecutive_layers_in_order(family, layer_prefix, tmp_path):
    path = make_tiny_model(tmp_path, family, num_layers=6, shards=3)
    index = json.loads((path / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert files == [f"model-0000{number}-of-00003.safetensors" for number in (1, 2, 3)]

    def shard_number(name: str) -> int:
        return files.index(weight_map[name]) + 1

    layer_shards = [shard_number(name) for name in weight_map if name.startswith(f"{layer_prefix}.")]
    assert layer_shards == sorted(layer_shards)
    assert {shard_number(name) for name in weight_map if name.startswith(f"{layer_prefix}.0.")} == {1}
    assert {shard_number(name) for name in weight_map if name.startswith(f"{layer_prefix}.5.")} == {3}
    first_name, *_, last_name = weight_map
    assert "embed" in first_name and shard_number(first_name) == 1
    assert shard_number(last_name) == 3 and not last_name.startswith(layer_prefix)  # final norm / lm_head
    sizes = 0
    for file in files:
        with safe_open(str(path / file), "pt") as reader:
            file_names = reader.keys()
            sizes += sum(reader.get_tensor(name).nbytes for name in file_names)
    assert index["metadata"]["total_size"] == sizes


def test_llama_uses_grouped_query_attention_by_default(tmp_path):
    config = json.loads((make_tiny_model(tmp_path) / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is False


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="llama, bloom"):
        make_tiny_model(tmp_path, "gpt2")


def test_ensure_tiny_model_rebuilds_only_when_arguments_change(tmp_path):
    weights = ensure_tiny_model(tmp_path, num_layers=2) / SINGLE_FILE
    os.utime(weights, (0, 0))
    assert ensure_tiny_model(tmp_path, num_layers=2) == tmp_path
    assert weights.stat().st_mtime == 0
    ensure_tiny_model(tmp_path, num_layers=2, seed=1)
    assert weights.stat().st_mtime > 0
    assert json.loads((tmp_path / MARKER_FILE).read_text())["seed"] == 1


def test_cli_help_lists_make_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    assert "make-model" in capsys.readouterr().out


def test_cli_make_model_prints_the_path(tmp_path):
    out_dir = tmp_path / "cli-model"
    arguments = ["make-model", str(out_dir), "--family", "bloom", "--layers", "2", "--hidden", "32", "--heads", "2"]
    arguments += ["--shards", "2", "--dtype", "bfloat16", "--seed", "5"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "petals_cli.testing", *arguments],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out_dir)
    assert json.loads((out_dir / MARKER_FILE).read_text())["seed"] == 5
    assert (out_dir / INDEX_FILE).exists()
    assert set(safetensors_names(out_dir).values()) == {"BF16"}
