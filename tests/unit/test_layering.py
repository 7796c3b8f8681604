"""The import directions of DESIGN.md, checked on the source (no imports executed)."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "petals_cli"
CLIENT_PACKAGE = CORE / "client"
# the client package, and the modules over it that only a client uses
CLIENT_MODULES = sorted(str(path.relative_to(CORE)) for path in CLIENT_PACKAGE.glob("*.py")) + [
    "remote_model.py",
    "generation.py",
    "finetune.py",
    "chat.py",
    "prompts.py",
    "bench.py",  # starts local servers through petals_cli.testing.swarm (subprocesses), never server code
    "evidence.py",  # the verifying client's log of tampering servers; swarm status reads it
]
STDLIB = sys.stdlib_module_names
# What every client module may use besides the standard library: tensors, hivemind's transport, typed errors.
BASICS = {"torch", "hivemind", "petals_cli.errors"}
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
    client = {f"petals_cli.{name[:-3]}".replace("/", ".").removesuffix(".__init__") for name in CLIENT_MODULES}
    assert not [module for module in imports(path) if module in client or module.startswith(tuple(client))]


def test_the_client_module_list_is_the_package():
    """A module added to the client package is checked like the others without anyone listing it."""
    names = {path.stem for path in CLIENT_PACKAGE.glob("*.py")}
    assert {"streams", "replay", "push", "checks", "verdicts", "inference", "autograd", "swarm"} <= names
    assert not (CORE / "session.py").exists() and not (CORE / "client.py").exists()


def client_imports_outside(name: str, allowed: set[str]) -> set[str]:
    """Modules that the client module ``name`` imports beyond the standard library, BASICS and ``allowed``."""
    outside = imports_outside(CLIENT_PACKAGE / f"{name}.py", BASICS | allowed | {"__future__"})
    # ``from petals_cli import transport`` names the package too: what it takes from it is checked by name
    return {module for module in outside if module.split(".")[0] not in STDLIB and module != "petals_cli"}


def test_streams_know_only_the_wire():
    """One span's stream is built on the wire (transport, wire, step), client LoRA and typed errors; the route is
    a plain record it reads (RouteSpan), and nothing of the connection, replay, push or verification. (``textsafe``
    is pure: how a server's words in an error are shown.)"""
    allowed = {"petals_cli.transport", "petals_cli.wire", "petals_cli.step", "petals_cli.lora", "petals_cli.textsafe"}
    outside = client_imports_outside("streams", allowed)
    assert outside == {"petals_cli.routing", "petals_cli.routing.RouteSpan"}, outside


@pytest.mark.parametrize("name", ["replay", "push"])
def test_replay_and_push_are_built_on_streams_only(name):
    allowed = {"petals_cli.client.streams", "petals_cli.step", "petals_cli.routing.RouteSpan", "petals_cli.routing"}
    assert client_imports_outside(name, allowed) == set()


@pytest.mark.parametrize("name", ["checks", "verdicts"])
def test_checks_never_import_the_session_replay_or_push(name):
    banned = {f"petals_cli.client.{other}" for other in ("inference", "replay", "push", "swarm")}
    found = imports(CLIENT_PACKAGE / f"{name}.py")
    assert not [module for module in found if module in banned or module.startswith(tuple(f"{b}." for b in banned))]
    assert "petals_cli.client" not in found  # not through the package either


def _splices(path: Path) -> list[int]:
    """Lines that assign to a slice (``route[i:j] = ...``): how a list of streams is spliced."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Slice)
    ]


def test_only_the_inference_session_splices_a_route():
    """Checks, replay and push return values (verdicts, replayed streams, pushed outputs); the session applies them."""
    for name in ("checks", "verdicts", "replay", "push", "streams", "autograd"):
        assert _splices(CLIENT_PACKAGE / f"{name}.py") == [], name
    assert _splices(CLIENT_PACKAGE / "inference.py")


def test_routing_is_pure():
    allowed = {
        "__future__",
        "bisect",
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
    allowed = {"__future__", "dataclasses", "math", "statistics", "petals_cli.wire"}
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


def test_every_package_is_installed():
    """A wheel holds only the packages pyproject.toml names (an editable install would hide a missing one)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in CORE.rglob("__init__.py")}
    assert found <= listed, found - listed
