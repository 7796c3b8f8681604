"""The import directions of DESIGN.md, checked on the source (no imports executed)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "petals_cli"
CLIENT_MODULES = [
    "client.py",
    "session.py",
    "remote_model.py",
    "generation.py",
    "finetune.py",
    "chat.py",
    "prompts.py",
    "bench.py",  # starts local servers through petals_cli.testing.swarm (subprocesses), never server code
    "evidence.py",  # the verifying client's log of tampering servers; swarm status reads it
]
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


def imports_outside(path: Path, allowed: set[str]) -> set[str]:
    """The modules ``path`` imports that are neither in ``allowed`` nor inside one of them."""
    return {
        name for name in imports(path) if name not in allowed and not name.startswith(tuple(f"{a}." for a in allowed))
    }


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
    assert imports_outside(CORE / "routing.py", allowed) == set()


def test_block_selection_is_pure():
    """No network, no clock, no randomness: snapshots in, spans and decisions out."""
    allowed = {"__future__", "dataclasses", "petals_cli.wire"}
    assert imports_outside(CORE / "server" / "selection.py", allowed) == set()


def test_evidence_does_files_and_signatures_only():
    """No network and no server: records, hashes, RSA signatures and a log file."""
    allowed = {
        "__future__",
        "base64",
        "collections",
        "dataclasses",
        "hashlib",
        "json",
        "logging",
        "os",
        "pathlib",
        "typing",
        "torch",
        "cryptography.hazmat.primitives",
        "petals_cli.errors",
        "petals_cli.security",
    }
    assert imports_outside(CORE / "evidence.py", allowed) == set()
