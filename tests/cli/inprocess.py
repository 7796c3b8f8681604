"""The real `petals` entry point, run in the test's own process: option and input checks cost milliseconds
instead of an interpreter start. For what needs a fresh process (the network, tracebacks, terminals) tests still
start `petals` as a child."""

import logging
import subprocess
import sys

import pytest

from petals_cli.commands import main as main_module


def run_here(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """``petals ARGS`` through ``main()``: its exit code, stdout and stderr, as a CompletedProcess."""
    monkeypatch.setattr(sys, "argv", ["petals", *args])
    # The command's logging set-up would bind a handler to this test's captured stderr, which later tests' logs
    # would hit once it is closed: with a handler already present, `logging.basicConfig` does nothing.
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    with pytest.raises(SystemExit) as exited:
        main_module.main()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exited.value.code, captured.out, captured.err)
