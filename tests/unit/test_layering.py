"""The import directions of DESIGN.md, checked on the source (no imports executed)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "petals_cli"
CLIENT_MODULES = ["client.py", "session.py", "remote_model.py", "generation.py"]
HEAVY = ("torch", "transformers", "hivemind", "peft", "datasets", "bitsandbytes", "textual")


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def core_files():
    return [path for path in CORE.rglob("*.py")]


@pytest.mark.parametrize("path", core_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_core_never_imports_the_cli(path):
    assert not [name for name in imports(path) if name.startswith("petals_cli.commands")]


@pytest.mark.parametrize("path", sorted((ROOT / "commands").glob("*.py")), ids=lambda path: path.name)
def test_cli_imports_the_core_and_heavy_libraries_only_inside_functions(path):
    top = imports(path, top_level_only=True)
    assert not [name for name in top if name.split(".")[0] in HEAVY]
    assert not [name for name in top if name.startswith("petals_cli.") and not name.startswith("petals_cli.commands")]


@pytest.mark.parametrize("name", CLIENT_MODULES)
def test_client_code_never_imports_server_code(name):
    assert not [module for module in imports(CORE / name) if module.startswith("petals_cli.server")]


@pytest.mark.parametrize("path", sorted((CORE / "server").glob("*.py")), ids=lambda path: path.name)
def test_server_code_never_imports_client_code(path):
    client = {f"petals_cli.{name[:-3]}" for name in CLIENT_MODULES}
    assert not [module for module in imports(path) if module in client or module.startswith(tuple(client))]


def test_routing_is_pure():
    allowed = {
        "__future__",
        "heapq",
        "random",
        "collections.abc",
        "dataclasses",
        "petals_cli.errors",
        "petals_cli.wire",
    }
    modules = {name for name in imports(CORE / "routing.py") if not any(name.startswith(f"{a}.") for a in allowed)}
    assert modules <= allowed
