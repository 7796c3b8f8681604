"""The saved-prompts format: round trip, and clear errors for files that do not fit."""

import json

import pytest
import torch

from petals_cli.errors import ConfigError
from petals_cli.prompts import METADATA_FILE, TENSORS_FILE, PromptTuning, load_prompts, save_prompts


@pytest.mark.parametrize("method", ["ptune", "deep_ptune"])
def test_saved_prompts_round_trip(tmp_path, method):
    torch.manual_seed(0)
    tuning = PromptTuning(method, pre_seq_len=3, num_blocks=4, hidden_size=8)
    if tuning.deep is not None:
        torch.nn.init.normal_(tuning.deep)
    save_prompts(tuning, tmp_path, model="some/model")
    metadata = json.loads((tmp_path / METADATA_FILE).read_text())
    assert metadata == {
        "format": 1,
        "model": "some/model",
        "method": method,
        "pre_seq_len": 3,
        "num_blocks": 4,
        "hidden_size": 8,
    }
    loaded, _ = load_prompts(tmp_path, num_blocks=4, hidden_size=8)
    assert loaded.method == method and loaded.pre_seq_len == 3
    for original, reloaded in zip(tuning.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(original, reloaded)


def test_prompts_that_do_not_fit_are_config_errors(tmp_path):
    save_prompts(PromptTuning("deep_ptune", 2, 4, 8), tmp_path, model="m")
    with pytest.raises(ConfigError, match="num_blocks 4, this model has 6"):
        load_prompts(tmp_path, num_blocks=6, hidden_size=8)
    (tmp_path / TENSORS_FILE).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_prompts(tmp_path)
    with pytest.raises(ConfigError, match="no saved prompts"):
        load_prompts(tmp_path / "nowhere")
    with pytest.raises(ConfigError):
        PromptTuning("lora", 2, 4, 8)


def test_prepend_puts_the_prefix_before_every_sequence():
    tuning = PromptTuning("ptune", 2, 1, 3)
    embeddings = torch.ones(2, 4, 3)
    out = tuning.prepend(embeddings)
    assert out.shape == (2, 6, 3)
    assert torch.equal(out[1, :2], tuning.prefix.detach()) and torch.equal(out[:, 2:], embeddings)
