"""Dataset reading, tokenising and batching for `petals finetune` (no swarm)."""

import json
import logging

import pytest
import torch

from petals_cli.config import FinetuneConfig
from petals_cli.errors import ConfigError
from petals_cli.finetune import batch_for_step, load_texts, steps_per_epoch, tokenize_texts, total_steps
from petals_cli.testing.tokenizer import save_tokenizer

TEXTS = ["the first line", "a second, longer line of text", "third"]


def test_jsonl_csv_text_and_saved_datasets_give_the_same_texts(tmp_path):
    import datasets

    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"body": text, "n": 1}) + "\n" for text in TEXTS))
    (tmp_path / "data.csv").write_text("body,n\n" + "".join(f'"{text}",1\n' for text in TEXTS))
    (tmp_path / "data.txt").write_text("\n".join(TEXTS) + "\n\n")
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    assert load_texts(str(tmp_path / "data.jsonl"), "body") == TEXTS
    assert load_texts(str(tmp_path / "data.csv"), "body") == TEXTS
    assert load_texts(str(tmp_path / "data.txt")) == TEXTS
    assert load_texts(str(tmp_path / "saved"), "body") == TEXTS


def test_bad_datasets_are_clear_config_errors(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="no field 'text'.*body"):
        load_texts(str(tmp_path / "data.jsonl"))
    with pytest.raises(ConfigError, match="no such file"):
        load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="save_to_disk"):
        load_texts(str(tmp_path / "plain"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError):
        load_texts(str(tmp_path / "empty.txt"))


def test_tokenising_joins_texts_with_eos_and_cuts_equal_sequences(tmp_path, caplog):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path, 512)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    sequences = tokenize_texts(TEXTS, tokenizer, seq_len=4)
    joined = []
    for text in TEXTS:
        joined += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert sequences.shape == (len(joined) // 4, 4)
    assert sequences.flatten().tolist() == joined[: sequences.numel()]
    with caplog.at_level(logging.WARNING):
        short = tokenize_texts(["third"], tokenizer, seq_len=1000)
    assert short.shape[0] == 1 and short.shape[1] < 1000
    assert f"--seq-len 1000 is longer than the whole dataset ({short.shape[1]} tokens," in caplog.text


def test_batches_cover_each_epoch_once_and_are_reproducible():
    sequences = torch.arange(10).unsqueeze(1).repeat(1, 3)
    per_epoch = steps_per_epoch(10, 4)
    assert per_epoch == 3
    epoch = torch.cat([batch_for_step(sequences, step, 4, seed=1) for step in range(per_epoch)])
    assert sorted(epoch[:, 0].tolist()) == list(range(10))
    assert batch_for_step(sequences, 4, 4, seed=1).tolist() == batch_for_step(sequences, 4, 4, seed=1).tolist()
    second_epoch = torch.cat([batch_for_step(sequences, step, 4, seed=1) for step in range(3, 6)])
    assert second_epoch[:, 0].tolist() != epoch[:, 0].tolist()


def test_steps_come_from_steps_or_epochs():
    assert total_steps(FinetuneConfig(model="m", dataset="d", batch_size=4, steps=7), 10) == 7
    assert total_steps(FinetuneConfig(model="m", dataset="d", batch_size=4, epochs=2), 10) == 6
    assert total_steps(FinetuneConfig(model="m", dataset="d", batch_size=4), 10) == 3
    with pytest.raises(ConfigError):
        FinetuneConfig(model="m", dataset="d", steps=2, epochs=2)
    with pytest.raises(ConfigError):
        FinetuneConfig(model="m", dataset="d", method="lora2")
    for wrong in ({"lora_r": 0}, {"lora_r": 65}, {"lora_alpha": 0.0}, {"lora_target_modules": ()}):
        with pytest.raises(ConfigError):
            FinetuneConfig(model="m", dataset="d", method="lora", **wrong)
    with pytest.raises(ConfigError):
        FinetuneConfig(model="m", dataset="d", save_every=2)


class _Interrupted(Exception):
    pass


def _interrupt(*args, **kwargs):
    raise _Interrupted


@pytest.mark.parametrize("interrupted_save", [1, 2])
@pytest.mark.parametrize("interrupted_write", ["save_prompts", "torch_save"])
def test_a_checkpoint_interrupted_while_saving_is_either_absent_or_resumable(
    tmp_path, monkeypatch, interrupted_save, interrupted_write
):
    """A kill at any point of saving leaves a directory that `--resume` either refuses (no state) or accepts."""
    import petals_cli.finetune as finetune_module
    from petals_cli.finetune import STATE_FILE, _read_state, save_checkpoint
    from petals_cli.prompts import PromptTuning

    class Holder:  # what save_checkpoint reads of a model
        prompt_tuning = PromptTuning("deep_ptune", 4, num_blocks=2, hidden_size=8)

    optimizer = torch.optim.AdamW(Holder.prompt_tuning.parameters(), lr=0.1)
    config = FinetuneConfig(model="m", dataset="d", method="deep_ptune", pre_seq_len=4, resume=str(tmp_path))
    for save in (1, 2):
        if save == interrupted_save:
            target = (finetune_module, "save_prompts") if interrupted_write == "save_prompts" else (torch, "save")
            monkeypatch.setattr(*target, _interrupt)
            with pytest.raises(_Interrupted):
                save_checkpoint(Holder, optimizer, save, [0.5] * save, str(tmp_path), "m")
            break
        save_checkpoint(Holder, optimizer, save, [0.5] * save, str(tmp_path), "m")
    if (tmp_path / STATE_FILE).exists():
        assert _read_state(config)["step"] == interrupted_save - 1
    else:
        assert interrupted_save == 1


def test_an_unreadable_dataset_is_one_error_naming_the_parsers_reason(tmp_path, capfd, caplog):
    """datasets logs the failure itself, twice (its handler and the root's); only our ConfigError may speak."""
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "twice.jsonl").write_text('{"text": "a", "text": "b"}\n')  # the same field twice in one object
    level = logging.getLogger("datasets").level
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(ConfigError, match="cannot read it .*JSON parse error") as error,
    ):
        load_texts(str(tmp_path / "broken.jsonl"))
    assert ".jsonl file holds one JSON object per line" in error.value.hint
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="specified twice"):
        load_texts(str(tmp_path / "twice.jsonl"))
    assert capfd.readouterr().err == ""
    assert not [record for record in caplog.records if record.name.startswith("datasets")]
    assert logging.getLogger("datasets").level == level


def test_finetune_without_output_warns_before_anything_loads(tmp_path, caplog):
    from petals_cli.config import ClientConfig
    from petals_cli.errors import ModelNotFoundError
    from petals_cli.finetune import finetune

    for output, warned in (("", True), (str(tmp_path / "prompts"), False)):
        caplog.clear()
        config = FinetuneConfig(model=str(tmp_path / "no-model"), dataset="d.jsonl", output=output)
        with pytest.raises(ModelNotFoundError):
            finetune(config, ClientConfig())
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert warnings == (
            ["no --output: the trained prompts will not be saved (pass --output DIR to keep them)"] * warned
        )
