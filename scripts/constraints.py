"""Constraints files for pip: what the suite was tested with, and the lowest versions pyproject.toml allows.

    python scripts/constraints.py freeze VENV_PYTHON > constraints.txt   # pin what is installed in that venv
    python scripts/constraints.py lowest > .lowest.txt                  # every direct runtime dependency at its floor

`make constraints` runs the first on `.venv-latest` after a green `make test-latest`; `make test-oldest` the second.
Only the standard library is used, so this runs before anything is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The versions the test suite last passed with (`make test-latest`, then `make constraints`).
# `make install` (hence `make demo`, `make test` and CI) installs from here, so a fresh clone on any day gets
# what was tested. pyproject.toml keeps open ranges for installs into other environments.
"""
# The lowest torch with a CPU wheel on these machines; pyproject allows 2.11 (the GPU image's), whose PyPI
# wheel pulls several GB of CUDA packages.
LOWEST_CPU_TORCH = "2.13.0"
TESTING_TOOLS = ("pytest", "pytest-timeout", "hypothesis", "pexpect", "ruff")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def freeze(python: str) -> str:
    """The installed distributions of ``python``'s environment, pinned (the project itself left out)."""
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    pins = []
    for line in listed:
        name, _, version = line.partition("==")
        if not version or _name(name) in ("petals-cli", "pip", "setuptools", "wheel"):
            continue
        pins.append(f"{_name(name)}=={version.split('+')[0]}")  # torch's "+cpu" is a build, not a version
    return HEADER + "\n".join(sorted(pins)) + "\n"


def lowest() -> str:
    """Each core dependency of pyproject.toml at its lower bound; testing tools as tested.

    The extras (tui, finetune, quantization) are not pinned: the exactness and family suites do not use them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        floor = re.search(r">=\s*([\w.]+)", requirement)
        if floor is None:
            continue
        name = _name(requirement)
        pins.append(f"{name}=={LOWEST_CPU_TORCH if name == 'torch' else floor.group(1)}")
    tested = (ROOT / "constraints.txt").read_text().splitlines()
    pins += [line for line in tested if _name(line) in TESTING_TOOLS]
    return "# the lowest versions pyproject.toml allows (torch: the lowest CPU wheel here)\n" + "\n".join(pins) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["freeze"] and len(sys.argv) == 3:
        sys.stdout.write(freeze(sys.argv[2]))
    elif sys.argv[1:] == ["lowest"]:
        sys.stdout.write(lowest())
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
