"""`petals generate|chat|bench --speculative`: the same greedy tokens as plain decoding, with the figures of the
drafts in --json, chat's /stats and bench's report; flag combinations that cannot work are one line, exit code 2.

Everything runs in this process through the real entry point (tests/cli/inprocess.py), against one real server
holding all blocks of a tiny model: no interpreter start per command, so the whole file costs a few seconds more
than the server's start.
"""

import io
import json
import sys

import pytest

from petals_cli.errors import ConfigError
from petals_cli.generation import GenerationOptions
from petals_cli.testing import make_tiny_model
from tests.cli.inprocess import run_here
from tests.conftest import Swarm

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWSgkAoWJFgBH71fVzHEnTqmJ45a7xqon4oLTzn8oSgPsN"
PROMPT = "one two three one two three one two"
FIGURES = {"trips", "drafted", "accepted", "acceptance", "accepted_per_trip", "tokens_per_trip"}


def assert_one_error_line(result, *fragments):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative-cli")
    return {
        "target": str(make_tiny_model(root / "target", "llama", num_layers=2)),
        "draft": str(make_tiny_model(root / "draft", "llama", num_layers=1, seed=1)),  # same tokenizer
        "other_vocab": str(make_tiny_model(root / "other", "llama", num_layers=1, vocab_size=384)),
    }


@pytest.mark.parametrize(
    ("command", "flags", "fragment"),
    [
        ("generate", ["--speculative", "model"], "--draft-model PATH"),
        ("generate", ["--draft-model", "{draft}"], "--speculative model"),
        ("generate", ["--speculative", "ngram", "--draft-model", "{draft}"], "--speculative model"),
        ("generate", ["--speculative", "ngram", "--draft-tokens", "0"], "--draft-tokens"),
        ("generate", ["--speculative", "medusa"], "--speculative"),
        ("chat", ["--speculative", "model"], "--draft-model PATH"),
        ("chat", ["--draft-model", "{draft}"], "--speculative model"),
        ("bench", ["--speculative", "model"], "--draft-model PATH"),
        ("bench", ["--speculative", "ngram", "--batch-size", "2"], "--batch-size 2"),
        ("bench", ["--speculative", "ngram", "--compare-local"], "--compare-local"),
        ("bench", ["--speculative", "ngram", "--mode", "forward"], "--mode forward"),
    ],
)
def test_flags_that_cannot_work_together_are_refused_before_connecting(
    command, flags, fragment, models, monkeypatch, capsys
):
    args = [command, models["target"], *(["--prompt", "x"] if command == "generate" else [])]
    args += [flag.format(**models) for flag in flags]
    assert_one_error_line(run_here(monkeypatch, capsys, *args, "--initial-peers", UNREACHABLE), fragment)


def test_generation_options_check_the_speculation_fields():
    assert GenerationOptions().speculative == "" and GenerationOptions().draft_tokens == 8
    with pytest.raises(ConfigError, match="speculative 'medusa'"):
        GenerationOptions(speculative="medusa")
    with pytest.raises(ConfigError, match="draft tokens 0"):
        GenerationOptions(speculative="ngram", draft_tokens=0)


@pytest.fixture(scope="module")
def swarm(models, tmp_path_factory):
    swarm = Swarm(model=models["target"], workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start("0:2")
        yield swarm
    finally:
        swarm.stop()


def petals(swarm, monkeypatch, capsys, *args):
    return run_here(monkeypatch, capsys, *args, "--initial-peers", *swarm.initial_peers)


def generate_json(swarm, monkeypatch, capsys, *flags) -> dict:
    args = ["generate", str(swarm.model), "--prompt", PROMPT, "--max-new-tokens", "12", "--json", *flags]
    result = petals(swarm, monkeypatch, capsys, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_generate_speculates_to_the_tokens_of_plain_greedy_decoding(swarm, models, tmp_path, monkeypatch, capsys):
    plain = generate_json(swarm, monkeypatch, capsys)
    assert "speculation" not in plain  # the JSON of a plain run is as it was
    ngram = generate_json(swarm, monkeypatch, capsys, "--speculative", "ngram", "--draft-tokens", "4")
    drafted = generate_json(swarm, monkeypatch, capsys, "--speculative", "model", "--draft-model", models["draft"])
    for speculative in (ngram, drafted):
        assert speculative["token_ids"] == plain["token_ids"] and speculative["text"] == plain["text"]
        assert set(speculative["speculation"]) == FIGURES and speculative["speculation"]["trips"] >= 1
    assert drafted["speculation"]["drafted"] > 0  # a draft model drafts at least on the first trip
    assert ngram["speculation"]["drafted"] > 0  # the prompt repeats itself: its last n-gram has a continuation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\nsomething else\n")
    args = ["generate", str(swarm.model), "--prompts-file", str(prompts), "--max-new-tokens", "12", "--json"]
    result = petals(swarm, monkeypatch, capsys, *args, "--speculative", "ngram")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    assert lines[0]["token_ids"] == plain["token_ids"]  # each prompt alone, each with its own figures
    assert all(set(line["speculation"]) == FIGURES for line in lines)


@pytest.mark.slow
def test_a_draft_model_with_another_vocabulary_is_one_line(swarm, models, monkeypatch, capsys):
    args = ["generate", str(swarm.model), "--prompt", "x", "--speculative", "model"]
    result = petals(swarm, monkeypatch, capsys, *args, "--draft-model", models["other_vocab"])
    assert_one_error_line(result, "vocabulary has 384 tokens")


@pytest.mark.slow
def test_chat_stats_show_the_speculation_of_the_conversation(swarm, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n/stats\nand again\n/stats\n/reset\n/stats\n"))
    args = ["chat", str(swarm.model), "--max-new-tokens", "8", "--speculative", "ngram", "--draft-tokens", "3"]
    result = petals(swarm, monkeypatch, capsys, *args)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("speculation ngram")]
    assert len(lines) == 3 and lines[2] == "speculation ngram: no reply yet", result.stderr
    trips = [int(line.split(": ")[1].split(" trips")[0]) for line in lines[:2]]
    assert 1 <= trips[0] < trips[1], lines  # added up over the conversation's replies, forgotten at /reset
    assert "tokens drafted" in lines[1] and "tokens per trip" in lines[1]

    monkeypatch.setattr(sys, "stdin", io.StringIO("/stats\n"))
    result = petals(swarm, monkeypatch, capsys, "chat", str(swarm.model))
    assert result.returncode == 0 and "speculation off" in result.stderr, result.stderr


@pytest.mark.slow
def test_chat_replies_with_speculation_equal_plain_greedy_replies_on_every_turn(swarm, monkeypatch, capsys):
    replies = {}
    for flags in ([], ["--speculative", "ngram", "--draft-tokens", "2"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\nand again\n"))
        result = petals(swarm, monkeypatch, capsys, "chat", str(swarm.model), "--max-new-tokens", "8", *flags)
        assert result.returncode == 0, result.stderr
        replies[bool(flags)] = result.stdout
    assert replies[True] == replies[False]


@pytest.mark.slow
def test_bench_reports_the_speculation_figures(swarm, monkeypatch, capsys):
    # 8 drafts a trip for 8 new tokens: drafts near the end are cut to the room the session has left
    args = ["bench", str(swarm.model), "--mode", "inference", "--repeats", "1", "--new-tokens", "8", "--seq-len", "8"]
    result = petals(swarm, monkeypatch, capsys, *args, "--speculative", "ngram", "--draft-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"]["speculative"] == "ngram" and report["config"]["draft_tokens"] == 8
    assert {"inference_tokens_per_s", "speculation_tokens_per_trip"} <= set(report["swarm"])
    assert "inference_steps_per_s" not in report["swarm"]  # a trip is not one token: tokens/s instead
    # The model as its own draft: its drafts are the tokens greedy decoding gives, so trips bring several tokens (a
    # figure that speculation not happening, or not being counted, would leave at 1)
    itself = ["--speculative", "model", "--draft-model", str(swarm.model), "--json"]
    result = petals(swarm, monkeypatch, capsys, *args, *itself)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["swarm"]
    assert figures["speculation_tokens_per_trip"]["median"] > 1.5 and figures["speculation_acceptance"]["median"] > 0.5
