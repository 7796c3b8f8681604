"""Every option of every command, given a bad value, is refused as a bad option: exit code 2 and one line naming
what is wrong, before anything is loaded or dialled.

The commands run in this process through the real entry point (`main`), so the sweep costs seconds, not a
process start per option. A tripwire on the first network action (starting the P2P daemon), on `swarm top`'s app,
on `swarm web`'s HTTP server and on `bench`'s local servers turns a bad value that slipped through into a failure
here instead of a hang.
"""

import os

import pytest
import torch
import typer

from petals_cli.commands import main as main_module
from petals_cli.testing import make_tiny_model
from tests.cli.inprocess import run_here

PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWSgkAoWJFgBH71fVzHEnTqmJ45a7xqon4oLTzn8oSgPsN"
MISSING = "/nonexistent/petals-test"
PEERS = ("--initial-peers", PEER)

# command -> the arguments that make it runnable, with {model}, {data} filled in per test
BASE = {
    "serve": ("{model}", "--new-swarm"),
    "generate": ("{model}", "--prompt", "x", *PEERS),
    "chat": ("{model}", *PEERS),
    "finetune": ("{model}", "--dataset", "{data}", *PEERS),
    "bench": ("{model}", *PEERS),
    "api": ("{model}", *PEERS),
    "swarm status": PEERS,
    "swarm top": PEERS,
    "swarm web": PEERS,
    "swarm bootstrap": (),
}
# option -> (a bad value, a fragment of the one error line); per command where commands differ
BAD = {
    "--initial-peers": ("localhost:31337", "not a multiaddr"),
    "--swarm-key": (MISSING, "--swarm-key"),
    "--allowed-servers": ("server-1", "not a peer id"),
    "--blocked-servers": ("server-1", "not a peer id"),
    "--prompts": (MISSING, "prompts"),
    "--seed": ("one", "--seed"),
    "--wire-dtype": ("float8", "--wire-dtype"),
    "--verify": ("1.5", "--verify"),
    "--max-new-tokens": ("0", "--max-new-tokens"),
    "--temperature": ("-1", "--temperature"),
    "--top-p": ("5", "--top-p"),
    "--batch-size": ("0", "--batch-size"),
    "--seq-len": ("0", "--seq-len"),
    "--host": ("my.host", "not an IP address"),
    "--announce-host": ("my.host", "not an IP address"),
    "--port": ("99999", "--port 99999"),
    "--identity": (f"{MISSING}/key", "--identity"),
    "--address-file": (f"{MISSING}/swarm.addr", "--address-file"),
    "--speculative": ("medusa", "--speculative"),
    "--draft-tokens": ("0", "--draft-tokens"),
    "--draft-model": (MISSING, "--draft-model"),  # without --speculative model
}
BAD_FOR = {
    "serve": {
        "--blocks": ("5:2", "reversed"),
        "--num-blocks": ("-1", "--num-blocks"),
        "--device": ("tpu", "--device 'tpu'"),
        "--dtype": ("float8", "--dtype"),
        "--quant": ("int3", "--quant"),
        "--cache-tokens": ("-1", "--cache-tokens"),
        "--max-session-length": ("0", "--max-session-length"),
        "--alloc-timeout": ("-1", "--alloc-timeout"),
        "--session-idle-timeout": ("0", "--session-idle-timeout"),
        "--max-request-mib": ("0", "--max-request-mib"),
        "--max-sessions-per-peer": ("0", "--max-sessions-per-peer"),
        "--step-timeout": ("0", "--step-timeout"),
        "--kept-graphs-mib": ("-1", "--kept-graphs-mib"),
        "--balance-quality": ("-0.5", "--balance-quality"),
        "--balance-period": ("-1", "--balance-period"),
        "--network-rps": ("-1", "--network-rps"),
        "--adapters": (MISSING, "--adapters"),
    },
    "generate": {
        "--prompts-file": (MISSING, "prompts"),
        "--top-k": ("-1", "--top-k"),
        "--repetition-penalty": ("0", "repetition penalty 0"),
        "--route-wait": ("-1", "--route-wait"),
    },
    "chat": {"--max-length": ("0", "--max-length")},
    "finetune": {
        "--dataset": (MISSING, MISSING),
        "--method": ("lora2", "--method"),
        "--text-field": ("body", "no field 'body'"),
        "--pre-seq-len": ("0", "--pre-seq-len"),
        "--lr": ("0", "--lr"),
        "--steps": ("-1", "--steps"),
        "--epochs": ("-1", "--epochs"),
        "--save-every": ("-1", "--save-every"),
        "--output": ("{data}", "--output"),  # an existing file, not a directory
        "--resume": (MISSING, "--resume"),
        "--lora-r": ("65", "--lora-r"),
        "--lora-alpha": ("0", "--lora-alpha"),
        "--lora-target-modules": ("", "--lora-target-modules"),
    },
    "bench": {
        "--mode": ("fast", "--mode"),
        "--new-tokens": ("0", "--new-tokens"),
        "--repeats": ("0", "--repeats"),
        "--local-swarm": ("-1", "--local-swarm"),
        "--sessions": ("0", "--sessions"),
    },
    "swarm top": {"--interval": ("0", "--interval")},
    "swarm web": {"--interval": ("0.5", "--interval"), "--port": ("99999", "--port")},
    "api": {"--max-concurrent": ("0", "--max-concurrent"), "--port": ("99999", "--port")},
}
# Options whose every value is acceptable (free text, or a name the swarm itself may or may not know).
FREE = {
    "--prompt", "--system", "--stop", "--public-name", "--model-prefix", "--revision", "--adapter", "--model",
    "--api-key",
}  # fmt: skip
FLAGS_SEEN_ONLY = {"--help", "--install-completion", "--show-completion"}


def commands() -> dict[str, dict[str, bool]]:
    """Every command of the app -> its options (long name -> whether it is a flag)."""
    found = {}

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        if not hasattr(command, "commands"):
            options = {}
            for param in command.params:
                names = [name for name in getattr(param, "opts", []) if name.startswith("--")]
                if names and param.param_type_name == "option":
                    options[names[0]] = bool(getattr(param, "is_flag", False))
            found[" ".join(path)] = options

    walk(typer.main.get_command(main_module.app), [])
    return found


def cases():
    for command, options in commands().items():
        for option, is_flag in options.items():
            if not is_flag and option not in FREE and option not in FLAGS_SEEN_ONLY:
                yield pytest.param(command, option, id=f"{command} {option}")


def test_the_sweep_covers_every_option_of_every_command():
    for command, options in commands().items():
        assert command in BASE, f"add `petals {command}` to BASE"
        for option, is_flag in options.items():
            known = is_flag or option in FREE or option in BAD or option in BAD_FOR.get(command, {})
            assert known, f"`petals {command} {option}`: give it a bad value in BAD_FOR (or list it in FREE)"


class Accepted(BaseException):
    """Raised by the tripwires: the command got past its option checks (not caught by the error map)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-options")
    data = root / "data.jsonl"
    data.write_text('{"text": "one two three"}\n' * 4)
    return {"model": str(make_tiny_model(root / "tiny", num_layers=2)), "data": str(data)}


@pytest.fixture
def tripwires(monkeypatch):
    import petals_cli.daemon
    import petals_cli.testing.swarm
    import petals_cli.tui
    import petals_cli.web.app

    def tripped(*args, **kwargs):
        raise Accepted("the command went on with a bad value")

    monkeypatch.setattr(petals_cli.daemon, "create_p2p", tripped)
    monkeypatch.setattr(petals_cli.tui, "run_top", tripped)
    monkeypatch.setattr(petals_cli.web.app, "serve", tripped)
    monkeypatch.setattr(petals_cli.testing.swarm.Swarm, "start", tripped)
    for variable in [name for name in os.environ if name.startswith("PETALS_") and name != "PETALS_CACHE_DIR"]:
        monkeypatch.delenv(variable)


def check(command, option, value, fragment, files, monkeypatch, capsys):
    base = [part.format(**files) for part in BASE[command]]
    if option == "--initial-peers":
        base = [part for part in base if part not in ("--new-swarm", *PEERS)]
    args = [*command.split(), *base, option, value.format(**files)]
    result = run_here(monkeypatch, capsys, *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, f"petals {' '.join(args)} -> {result.returncode}:\n{result.stderr}"
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment.format(**files) in errors[0], errors[0]


@pytest.mark.parametrize(("command", "option"), list(cases()))
def test_a_bad_value_is_a_bad_option_in_one_line(command, option, files, tripwires, monkeypatch, capsys):
    value, fragment = BAD_FOR.get(command, {}).get(option) or BAD[option]
    check(command, option, value, fragment, files, monkeypatch, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_a_bad_option(files, tripwires, monkeypatch, capsys):
    check("serve", "--device", "cuda", "no such device", files, monkeypatch, capsys)
