"""Bad input to `petals generate` and `petals serve` gives one clear line, a hint and a fixed exit code.

What fails before the network runs in this process (tests/cli/inprocess.py); what needs a swarm, the absence of
one, or a traceback runs `petals` as a child process."""

import os
import subprocess

import pytest

from petals_cli.testing import make_tiny_model
from tests.cli.inprocess import run_here
from tests.conftest import petals_command

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWSgkAoWJFgBH71fVzHEnTqmJ45a7xqon4oLTzn8oSgPsN"
PEERS = ("--initial-peers", UNREACHABLE)


def run(*args, env=None):
    return subprocess.run(petals_command(*args), capture_output=True, text=True, timeout=120, env=env)


def assert_one_error_line(result, exit_code, *fragments):
    assert result.returncode == exit_code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "hint:" in errors[0]
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("errors") / "tiny", num_layers=2))


def test_bad_model_path(tmp_path, monkeypatch, capsys):
    result = run_here(monkeypatch, capsys, "generate", str(tmp_path / "missing"), "--prompt", "x", *PEERS)
    assert_one_error_line(result, 3, "missing")


def test_unreachable_initial_peer_is_retried_saying_so_then_one_error(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", num_layers=2)
    env = {**os.environ, "PETALS_CONNECT_TIMEOUT": "3"}
    result = run("generate", str(model), "--prompt", "x", "--initial-peers", UNREACHABLE, env=env)
    assert_one_error_line(result, 4, "cannot reach", "--initial-peers")
    waiting = [line for line in result.stderr.splitlines() if "waiting for the swarm" in line]
    assert len(waiting) == 1 and UNREACHABLE in waiting[0] and "PETALS_CONNECT_TIMEOUT" in waiting[0], result.stderr


def test_a_server_whose_initial_peer_does_not_answer_waits_saying_so_then_one_error(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", num_layers=2)
    env = {**os.environ, "PETALS_JOIN_TIMEOUT": "3"}
    result = run("serve", str(model), "--blocks", "0:2", "--initial-peers", UNREACHABLE, env=env)
    assert_one_error_line(result, 4, "cannot reach", "--initial-peers")
    waiting = [line for line in result.stderr.splitlines() if "waiting for the swarm" in line]
    assert len(waiting) == 1 and "PETALS_JOIN_TIMEOUT" in waiting[0], result.stderr
    assert "bug" not in result.stderr


def test_no_initial_peers_explains_how_to_start_a_swarm(tmp_path, monkeypatch):
    monkeypatch.delenv("PETALS_INITIAL_PEERS", raising=False)
    model = make_tiny_model(tmp_path / "tiny", num_layers=2)
    result = run("generate", str(model), "--prompt", "x")
    assert_one_error_line(result, 4, "no initial peers", "--new-swarm")


def test_swarm_web_without_initial_peers_says_so_before_serving(monkeypatch, capsys):
    monkeypatch.delenv("PETALS_INITIAL_PEERS", raising=False)
    result = run_here(monkeypatch, capsys, "swarm", "web", "--port", "0")
    assert_one_error_line(result, 4, "no initial peers", "--new-swarm")


def test_serve_rejects_bad_block_ranges_and_missing_swarm_choice(model, monkeypatch, capsys):
    assert_one_error_line(run_here(monkeypatch, capsys, "serve", model, "--blocks", "1:5", "--new-swarm"), 2, "0:2")
    assert_one_error_line(run_here(monkeypatch, capsys, "serve", model, "--blocks", "0:1"), 2, "--new-swarm")


def test_debug_shows_the_traceback(tmp_path):
    import os

    env = {**os.environ, "PETALS_DEBUG": "1"}
    result = run("generate", str(tmp_path / "missing"), "--prompt", "x", "--initial-peers", UNREACHABLE, env=env)
    assert result.returncode == 3
    assert "Traceback" in result.stderr


def test_generate_needs_exactly_one_prompt_source(model, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    both = run_here(monkeypatch, capsys, "generate", model, "--prompt", "x", "--prompts-file", str(prompts), *PEERS)
    assert_one_error_line(both, 2, "--prompts-file")
    assert_one_error_line(run_here(monkeypatch, capsys, "generate", model, *PEERS), 2, "--prompt")
    prompts.write_text("\n")
    empty = run_here(monkeypatch, capsys, "generate", model, "--prompts-file", str(prompts), *PEERS)
    assert_one_error_line(empty, 2, "no prompts")


def test_finetune_and_serve_reject_bad_datasets_prompts_and_adapters(model, tmp_path, monkeypatch, capsys):
    (tmp_path / "data.jsonl").write_text('{"body": "x"}\n')
    result = run_here(monkeypatch, capsys, "finetune", model, "--dataset", str(tmp_path / "data.jsonl"), *PEERS)
    assert_one_error_line(result, 2, "no field 'text'", "body")
    result = run_here(monkeypatch, capsys, "finetune", model, "--dataset", "d.txt", "--steps", "2", "--epochs", "2")
    assert_one_error_line(result, 2, "--steps or --epochs")
    result = run_here(monkeypatch, capsys, "generate", model, "--prompt", "x", "--prompts", str(tmp_path), *PEERS)
    assert_one_error_line(result, 2, "no saved prompts")
    result = run_here(monkeypatch, capsys, "serve", model, "--new-swarm", "--adapters", str(tmp_path))
    assert_one_error_line(result, 2, "adapter_config")


def test_a_hub_id_that_cannot_be_fetched_says_why_and_suggests_a_download(monkeypatch, capsys):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from petals_cli.checkpoint import ModelSource, hub_error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_here(
        monkeypatch, capsys, "generate", "some-org/some-model", "--prompt", "x", "--initial-peers", UNREACHABLE
    )
    assert_one_error_line(
        result, 3, "not in the local Hugging Face cache", "offline", "hf download some-org/some-model"
    )
    assert "local model directory" in result.stderr and "repository id" not in result.stderr
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = hub_error(ModelSource("some-org/some-model"), "config.json", LocalEntryNotFoundError("no network"))
    assert "cannot be reached" in unreachable.message and "check the network" in unreachable.hint


def test_finetune_takes_one_dataset(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n')
    monkeypatch.chdir(tmp_path)
    finetune = ("finetune", str(tmp_path), "--initial-peers", UNREACHABLE)
    two = run_here(monkeypatch, capsys, *finetune, "--dataset", "a.jsonl", "--dataset", "b.jsonl")
    assert_one_error_line(two, 2, "2 different paths (a.jsonl, b.jsonl)")
    same = run_here(monkeypatch, capsys, *finetune, "--dataset", "a.jsonl", "--dataset", "./a.jsonl")
    assert_one_error_line(same, 3, "config.json")  # past the options, to the model (a directory without one)


def test_make_model_speaks_in_its_option_names(tmp_path, capsys):
    from petals_cli.testing.__main__ import main as make_model

    with pytest.raises(SystemExit):
        make_model(["make-model", "--help"])
    help_text = capsys.readouterr().out
    assert "--kv-heads N" in help_text and "falcon-rw" in help_text
    assert not [name for name in ("``", "num_kv_heads", "_config", "INIT_STD", "KV_HEADS") if name in help_text]
    assert make_model(["make-model", str(tmp_path / "tiny"), "--layers", "2", "--shards", "3"]) == 2
    assert_one_error_line(
        subprocess.CompletedProcess([], 2, "", capsys.readouterr().err),
        2,
        "--shards must be between 1 and --layers (2)",
    )
