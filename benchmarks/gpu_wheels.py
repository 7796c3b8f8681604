"""Wheels for the GPU image: what petals needs there that the image lacks, fetched here, installed there.

    python benchmarks/gpu_wheels.py prepare                        # here (network): cp312 wheels into .whl/
    python benchmarks/gpu_wheels.py install --target /tmp/petals-site   # there (no network), then PYTHONPATH
    python benchmarks/gpu_wheels.py check                          # there, after install: requirements report

The device image is Python 3.12 with torch, transformers and most of the scientific stack, but no hivemind
and little of what hivemind needs beyond that stack (/work/.library/device/KINDS.md lists its packages).
``prepare`` pins every carried package to the version in this checkout's environment, where the tests run, so
the device runs the same hivemind stack. ``install`` installs a carried wheel only where the image has no
such package, or has a version that fails a requirement of petals or of a carried package; it never touches
the image's own environment (``pip --target`` plus PYTHONPATH). Imports only the standard library and
``packaging``, so it runs before anything is installed; used by gpu_check.sh.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Not in the image: always carried.
CARRIED = (
    *("hivemind", "prefetch-generator", "configargparse", "varint", "base58", "netaddr"),
    *("py-multihash", "py-multibase", "py-multicodec", "py-cid", "morphys", "python-baseconv", "blake3", "mmh3"),
    *("cryptography", "cffi", "pycparser", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"),
)
# In the image at versions nobody has read there: carried, installed only when the image's fails a requirement.
FALLBACKS = ("typer", "protobuf", "typing-extensions", "rich")
# Taken from the image as they are (its versions of torch and transformers are the point of the check).
FROM_IMAGE = (
    *("torch", "transformers", "safetensors", "tokenizers", "huggingface-hub", "numpy", "scipy", "msgpack"),
    *("sortedcontainers", "uvloop", "pyyaml", "packaging", "idna", "six", "shellingham", "annotated-doc"),
    *("markdown-it-py", "pygments"),
)
# hivemind lists grpcio-tools to compile its protobufs at build time; nothing imports it at run time.
NOT_NEEDED = ("grpcio-tools",)
# The image's interpreter, for evaluating requirement markers here.
DEVICE_MARKERS = dict(
    python_version="3.12",
    python_full_version="3.12.3",
    implementation_name="cpython",
    platform_python_implementation="CPython",
    sys_platform="linux",
    platform_system="Linux",
    platform_machine="x86_64",
    os_name="posix",
)
# Wheels for older glibc first. The image's Python 3.12.3 is probably Ubuntu 24.04's (glibc 2.39): newer tags last.
PLATFORMS = (
    *("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    *("manylinux1_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"),
)


def project_requirements() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(text) for text in pyproject["project"]["dependencies"]]


def _applies(requirement: Requirement, environment: dict | None) -> bool:
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({**(environment or {}), "extra": ""})


def _installed_requirements(name: str, environment: dict | None) -> list[Requirement]:
    requires = metadata.requires(name) or []
    return [req for req in map(Requirement, requires) if _applies(req, environment)]


def _names(*names: str) -> set[str]:
    return {canonicalize_name(name) for name in names}


def carried_closure() -> dict[str, str]:
    """Every package to carry, with the version installed here; fails on a requirement no list accounts for."""
    from_image = _names(*FROM_IMAGE, *NOT_NEEDED)
    known = _names(*CARRIED, *FALLBACKS) | from_image
    pins: dict[str, str] = {}
    pending = [*project_requirements(), Requirement("hivemind")]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if not _applies(requirement, DEVICE_MARKERS) or name in pins:
            continue
        if name not in known:
            raise SystemExit(
                f"{name} (needed: {requirement}) is in none of CARRIED, FALLBACKS, FROM_IMAGE: check the image's "
                "package list (/work/.library/device/KINDS.md) and add it to one of them"
            )
        if name in from_image:
            continue
        pins[name] = metadata.version(name)
        pending.extend(_installed_requirements(name, DEVICE_MARKERS))
    return pins


def prepare(dest: Path) -> None:
    pins = carried_closure()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        for name, version in sorted(pins.items()):
            _fetch(f"{name}=={version}", Path(download))
        for wheel in Path(download).glob("*.whl"):
            name = parse_wheel_filename(wheel.name)[0]
            for old in dest.glob("*.whl"):  # one version of each: two stop the whole install
                if parse_wheel_filename(old.name)[0] == name:
                    old.unlink()
            shutil.move(str(wheel), dest / wheel.name)
    size = sum(wheel.stat().st_size for wheel in dest.glob("*.whl"))
    print(f"{len(pins)} wheels in {dest} ({size / 2**20:.1f} MiB): {', '.join(sorted(pins))}")


def _fetch(spec: str, into: Path) -> None:
    """Download the cp312 manylinux wheel of ``spec``; build it here when only a source archive is published."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "--dest", str(into)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    if subprocess.run([*command, spec], capture_output=True).returncode == 0:
        return
    before = set(into.glob("*.whl"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary=:all:"]
    subprocess.run([*pip_wheel, "--wheel-dir", str(into), spec], check=True)
    for built in set(into.glob("*.whl")) - before:
        tags = parse_wheel_filename(built.name)[3]
        if any(tag.abi != "none" or tag.platform != "any" for tag in tags):
            raise SystemExit(f"{spec}: no cp312 wheel published, and the one built here is not pure Python")


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(item for item in archive.namelist() if item.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    lines = [line.removeprefix("Requires-Dist:") for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [req for req in map(Requirement, lines) if _applies(req, None)]


def _installed_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def install(wheels_dir: Path, target: Path) -> None:
    """Install the carried wheels the image needs into ``target``, then the project itself."""
    wheels = sorted(wheels_dir.glob("*.whl"))
    requirements = project_requirements() + [req for wheel in wheels for req in _wheel_requirements(wheel)]
    chosen = []
    for wheel in wheels:
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        found = _installed_version(name)
        wanted = [req for req in requirements if canonicalize_name(req.name) == name]
        failed = [str(req) for req in wanted if found is not None and not req.specifier.contains(found, True)]
        if found is not None and not failed:
            print(f"  using the image's {name} {found}")
            continue
        chosen.append(wheel)
        if failed:
            print(f"  carrying {wheel.name}: the image's {name} {found} fails {', '.join(failed)}")
    target.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--upgrade", "--target", str(target)]
    if chosen:
        subprocess.run([*pip, *map(str, chosen)], check=True)
    print(f"  installed {len(chosen)} of {len(wheels)} carried wheels into {target}")
    built = subprocess.run([*pip, "--no-build-isolation", str(ROOT)], capture_output=True, text=True)
    if built.returncode == 0:
        print(f"  installed petals-cli from {ROOT} into {target}")
        return
    # The image's setuptools could not build it: lay the package out as the wheel would.
    reason = (built.stderr.strip().splitlines() or [f"exit status {built.returncode}"])[-1]
    print(f"  pip could not build petals-cli ({reason}); copying the sources")
    shutil.rmtree(target / "petals_cli", ignore_errors=True)
    shutil.copytree(ROOT / "petals_cli", target / "petals_cli")
    shutil.copytree(ROOT / "commands", target / "petals_cli" / "commands")


def check() -> int:
    """Report every requirement of petals and of the carried packages the environment fails; 1 if any."""
    requirements = project_requirements()
    for name in (*CARRIED, *FALLBACKS):
        if _installed_version(name) is not None:
            requirements += _installed_requirements(name, None)
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        found = _installed_version(name)
        if name in NOT_NEEDED:
            continue
        if found is None:
            problems.append(f"{requirement}: missing")
        elif not requirement.specifier.contains(found, True):
            problems.append(f"{requirement}: found {found}")
    for problem in sorted(set(problems)):
        print(f"  requirement not met: {problem}")
    shown = ("petals-cli", "hivemind", "torch", "transformers", "typer", "pydantic", "protobuf")
    print("  " + ", ".join(f"{name} {_installed_version(name)}" for name in shown))
    print(f"  {len(set(requirements))} requirements checked, {len(set(problems))} not met")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare").add_argument("--dest", type=Path, default=ROOT / ".whl")
    install_parser = commands.add_parser("install")
    install_parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    install_parser.add_argument("--target", type=Path, required=True)
    commands.add_parser("check")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dest)
    elif args.command == "install":
        install(args.wheels, args.target)
    else:
        return check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
