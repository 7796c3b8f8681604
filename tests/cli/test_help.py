"""Every command's --help renders, and the top-level help stays light (no torch, transformers, hivemind)."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from petals_cli.commands.main import app

COMMANDS = [
    [],
    ["serve"],
    ["generate"],
    ["bench"],
    ["chat"],
    ["finetune"],
    ["api"],
    ["swarm"],
    ["swarm", "status"],
    ["swarm", "top"],
    ["swarm", "web"],
    ["swarm", "bootstrap"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "petals")
def test_help_renders(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_every_registered_command_is_covered():
    registered = {command.name or command.callback.__name__ for command in app.registered_commands}
    registered |= {group.name for group in app.registered_groups}
    assert registered == {command[0] for command in COMMANDS if command}


def test_top_level_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from petals_cli.commands.main import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [name for name in ('torch', 'transformers', 'hivemind') if name in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize("group", [[], ["swarm"]], ids=["petals", "swarm"])
def test_command_lists_are_one_line_per_command_at_80_columns(group, monkeypatch, capsys):
    """The list of commands is what a new user reads first: each description one line at 80 columns."""
    from petals_cli.commands.main import main

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys, "argv", ["petals", *group, "--help"])
    with pytest.raises(SystemExit):
        main()
    text = capsys.readouterr().out
    rows = text.split("Commands")[1].splitlines()[1:]
    rows = [row.strip("│ ") for row in rows if row.startswith("│")]
    names = list(dict.fromkeys(c[len(group)] for c in COMMANDS if c[: len(group)] == group and len(c) > len(group)))
    # a wrapped description would add a row of its own
    assert sorted(row.split()[0] for row in rows) == sorted(names), text
    if not group:
        assert "LoRA" in next(row for row in rows if row.startswith("finetune")), text


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip()


def test_every_swarm_subcommand_is_covered():
    from petals_cli.commands.swarm import swarm_app

    registered = {command.name or command.callback.__name__ for command in swarm_app.registered_commands}
    assert registered == {command[1] for command in COMMANDS if command[:1] == ["swarm"] and len(command) == 2}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "petals")
def test_help_names_values_plainly_and_lists_choices(command, monkeypatch, capsys):
    from petals_cli.commands.main import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["petals", *command, "--help"])
    with pytest.raises(SystemExit) as exited:
        main()
    text = capsys.readouterr().out
    assert exited.value.code == 0 and "Usage" in text
    assert not [noise for noise in ("<bool>", "<str>", "<int>", "<float>", "{model}") if noise in text], text
    if command == ["serve"]:
        assert "{MODEL}" in text and "INTEGER" in text and "<none|int8|nf4>" in text and "<auto|float32|" in text
