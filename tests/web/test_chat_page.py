"""The chat page of `petals api` in a real headless Chromium: `petals api` runs as a real process with an API key,
in front of a real one-server swarm.

The page must ask for the key (a wrong one is refused and asked again), stream a two-turn conversation whose greedy
replies equal `petals generate` (a separate process) on the same conversation written out by hand as the API's
plain transcript, show tokens/s, stop a long reply (the server's generation ends too), start a new conversation,
and link to the same server's /swarm health page.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from petals_cli.testing import make_tiny_model
from petals_cli.testing.swarm import Swarm, petals_command
from tests.web.conftest import DESKTOP, PHONE, CliServer, screenshot

KEY = "sk-browser-test"
TOKENS = 12


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("chat") / "tiny-chat", "llama", num_layers=2)
    with Swarm(model=path, workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start("0:2")
        yield swarm


@pytest.fixture(scope="module")
def api(swarm, tmp_path_factory):
    with CliServer(
        tmp_path_factory.mktemp("api-log"),
        *("api", swarm.model.name, "--initial-peers", *swarm.initial_peers, "--api-key", KEY),
        ready_path="/health",
        cwd=swarm.model.parent,  # the model by a short relative path: its name on the page
    ) as server:
        yield server


def generated(swarm, prompt: str) -> str:
    """`petals generate`'s greedy text for ``prompt``, stopping where the transcript's next user line starts."""
    command = petals_command(
        "generate", swarm.model.name, "--initial-peers", *swarm.initial_peers, "--prompt", prompt,
        "--max-new-tokens", str(TOKENS), "--stop", "\nUser:", "--json",
    )  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=swarm.model.parent)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["text"]


def send(page, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


def settle(page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=120_000)


def test_conversation_streams_what_petals_generate_says(api, swarm, page_at):
    from playwright.sync_api import expect

    page = page_at(DESKTOP)
    page.goto(api.url + "/")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#send")).to_be_disabled()
    page.locator("#api-key").fill("sk-wrong")
    page.locator("#key-form button").click()
    page.locator("#temperature").fill("0")
    page.locator("#top-p").fill("1")
    page.locator("#max-tokens").fill(str(TOKENS))
    send(page, "Hello there")
    settle(page)
    expect(page.locator("#key-form")).to_be_visible()  # refused: asked again
    expect(page.locator("#key-error")).to_contain_text("API key")
    expect(page.locator(".message.error")).to_have_count(1)
    expect(page.locator(".message.user")).to_have_count(0)  # not sent: back in the box
    expect(page.locator("#prompt")).to_have_value("Hello there")

    page.locator("#api-key").fill(KEY)
    page.locator("#key-form button").click()
    expect(page.locator("#key-form")).to_be_hidden()
    page.locator("#send").click()
    settle(page)
    first = page.locator(".message.assistant .content").nth(0).text_content()
    assert first == generated(swarm, "User: Hello there\nAssistant:")
    speed = page.locator("#status").inner_text()
    assert re.search(r"\d+ tokens? · [\d.]+ tokens/s · first token after [\d.]+ s", speed), speed

    send(page, "And then?")
    settle(page)
    second = page.locator(".message.assistant .content").nth(1).text_content()
    assert second == generated(swarm, f"User: Hello there\nAssistant: {first}\nUser: And then?\nAssistant:")
    assert page.locator(".message.user .content").all_text_contents() == ["Hello there", "And then?"]
    screenshot(page, "chat-desktop")

    phone = page_at(PHONE, scale=2)
    phone.goto(api.url + "/")
    phone.locator("#api-key").fill(KEY)
    phone.locator("#key-form button").click()
    expect(phone.locator("#temperature")).to_be_hidden()  # settings folded away at phone width
    phone.locator("#settings > summary").click()
    phone.locator("#temperature").fill("0")
    phone.locator("#max-tokens").fill(str(TOKENS))
    send(phone, "Hello there")
    settle(phone)
    assert phone.locator(".message.assistant .content").text_content() == first
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(phone, "chat-phone")


def test_stop_ends_the_reply_and_its_generation_and_new_clears(api, page_at):
    from playwright.sync_api import expect

    page = page_at(DESKTOP)
    page.goto(api.url + "/")
    page.locator("#api-key").fill(KEY)
    page.locator("#key-form button").click()
    page.locator("#max-tokens").fill("2000")
    send(page, "Tell me a long story")
    expect(page.locator(".message.assistant .content")).not_to_have_text("", timeout=120_000)
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#stop").click()
    settle(page)
    expect(page.locator("#status")).to_contain_text("stopped")
    deadline = time.monotonic() + 30
    while json.loads(api.get("/health")[1])["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(api.get("/health")[1])["active_requests"] == 0  # the server stopped generating

    page.locator("#new").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#status")).to_have_text("new conversation")


def test_chat_page_links_to_its_swarms_health_page(api, swarm, page_at):
    from playwright.sync_api import expect

    page = page_at(DESKTOP)
    page.goto(api.url + "/")
    page.get_by_role("link", name="swarm health").click()
    expect(page).to_have_url(api.url + "/swarm")
    expect(page.locator(".model .verdict")).to_have_text("healthy", timeout=60_000)
    expect(page.locator(".model .name")).to_have_text(swarm.model.name)
    assert json.loads(api.get("/swarm/api/v1/state")[1])["models"][0]["coverage"] == [1, 1]
