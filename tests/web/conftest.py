"""A real headless Chromium (Debian's package, driven by Playwright through its executable path: nothing is
downloaded) for the web pages' tests.

Where no browser is installed, every test here is skipped with one line saying how to install it, unless
PETALS_REQUIRE_BROWSER is set (CI sets it: there the tests must run, not skip). With PETALS_SCREENSHOTS=DIR the
tests save their screenshots (desktop and phone width) in DIR; README's pictures come from such a run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from petals_cli.testing.swarm import petals_command

BROWSER_FLAGS = [
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-background-networking",  # these machines may only talk to themselves
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SKIPPED = pytest.StashKey[str]()
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    for candidate in (os.environ.get("PETALS_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


def missing() -> str:
    """Why the browser tests cannot run here ("" when they can)."""
    if chromium_path() is None:
        return "no Chromium on this machine: apt-get install chromium (the web pages' browser tests)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no playwright package: make install (the web pages' browser tests)"
    return ""


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if "tests/web/" in str(item.fspath).replace(os.sep, "/")]
    reason = missing() if mine else ""
    if not reason or os.environ.get("PETALS_REQUIRE_BROWSER"):
        return  # with PETALS_REQUIRE_BROWSER, the browser fixture fails them, loudly
    for item in mine:
        item.add_marker(pytest.mark.skip(reason=reason))
    config.stash[SKIPPED] = f"{len(mine)} browser tests of the web pages skipped: {reason}"


def pytest_terminal_summary(terminalreporter, config):
    if SKIPPED in config.stash:
        terminalreporter.write_line(config.stash[SKIPPED], yellow=True)


@pytest.fixture(scope="module")  # not longer: Playwright's sync API keeps an event loop running while it lives
def browser():
    reason = missing()
    if reason:
        pytest.fail(f"PETALS_REQUIRE_BROWSER is set, but {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=BROWSER_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page_at(browser):
    """``page_at(viewport, javascript=True)``: a fresh page (its own context); all closed after the test."""
    contexts = []

    def make(viewport=DESKTOP, *, javascript: bool = True, scale: float = 1):
        context = browser.new_context(viewport=viewport, java_script_enabled=javascript, device_scale_factor=scale)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        return page

    yield make
    for context in contexts:
        context.close()


def screenshot(page, name: str) -> None:
    """Save ``page`` as NAME.png under PETALS_SCREENSHOTS, when set."""
    folder = os.environ.get("PETALS_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CliServer:
    """A `petals` command that serves HTTP (`swarm web`, `api`), run as a real process on a free loopback port."""

    def __init__(
        self, workdir: Path, *args: str, ready_path: str = "/", ready_seconds: float = 180, cwd: Path | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = workdir / f"{args[0]}-{self.port}.log"
        with open(self.log_file, "wb") as log:
            command = petals_command(*args, "--port", str(self.port))
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        deadline = time.monotonic() + ready_seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{' '.join(args[:2])} exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{' '.join(args[:2])} did not answer:\n{self.log()}") from None
                time.sleep(0.2)

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
