"""Shell completions are generated from the app, current, and work in a real bash."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELLS = ("bash", "zsh", "fish")


def generated(shell: str) -> str:
    environment = {**os.environ, "_PETALS_COMPLETE": f"source_{shell}"}
    command = [sys.executable, "-c", "from petals_cli.commands.main import main; main()"]
    return subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_files_are_current(shell):
    assert (ROOT / "completions" / f"petals.{shell}").read_text() == generated(shell), "run `make completions`"


def complete(words: str) -> list[str]:
    petals = shutil.which("petals") or str(Path(sys.executable).parent / "petals")
    script = (
        f"source {ROOT / 'completions' / 'petals.bash'}\n"
        f"COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n"
        f'[[ "{words}" == *" " ]] && COMP_WORDS+=("") && COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n'
        "_petals_completion petals\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    environment = {**os.environ, "PATH": f"{Path(petals).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=environment, check=True)
    return result.stdout.split()


def test_bash_completes_commands_and_subcommands():
    assert "swarm" in complete("petals sw")
    assert {"status", "top", "bootstrap"} <= set(complete("petals swarm "))
