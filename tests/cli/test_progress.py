"""Progress feedback (weights bar, connecting spinner) goes to a terminal's stderr, and never into pipes."""

import subprocess

import pexpect

from petals_cli.testing import make_tiny_model
from tests.cli.test_errors import UNREACHABLE
from tests.conftest import petals_command


def test_feedback_shows_on_a_terminal_only(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", num_layers=2)
    command = petals_command("generate", str(model), "--prompt", "x", "--initial-peers", UNREACHABLE)
    child = pexpect.spawn(command[0], command[1:], encoding="utf-8", timeout=120, dimensions=(40, 160))
    child.expect("Loading local weights of")
    child.expect("Connecting to the swarm")
    child.expect("cannot reach")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 4
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 4
    assert "Loading local weights" not in piped.stderr + piped.stdout
    assert "Connecting" not in piped.stderr + piped.stdout
