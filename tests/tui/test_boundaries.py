"""The TUI reads `petals_cli.swarm` only: its widgets never reach the DHT, the client or the network."""

import ast
from pathlib import Path

import pytest

TUI = Path(__file__).resolve().parents[2] / "petals_cli" / "tui"
ALLOWED = ("petals_cli.swarm", "petals_cli.tui", "petals_cli.errors")


@pytest.mark.parametrize("path", sorted(TUI.glob("*.py")), ids=lambda path: path.name)
def test_tui_imports_only_the_swarm_module_of_the_core(path):
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    core = {name for name in modules if name.startswith("petals_cli") and name != "petals_cli.tui"}
    assert all(name.startswith(ALLOWED) for name in core), core
    assert not {name for name in modules if name.split(".")[0] in ("hivemind", "torch")}


def test_stylesheet_is_next_to_the_app():
    assert (TUI / "top.tcss").is_file()
