"""`petals swarm web` in a real headless Chromium, against a real swarm of three `petals serve` processes.

The page, first with JavaScript off (the server's own render), must show the right coverage of the 4 blocks (two
servers on 0:2, one on 2:4: thin), each server as a bar over its span, and a server's announced name full of markup
as plain text that runs nothing. /api/v1/state must say what `petals swarm status --json` says, /metrics must parse
with the Prometheus client's own parser. Then the server of 2:4 is SIGKILLed and the open page, without a reload,
must turn broken naming blocks 2:4 and show that server unreachable; /metrics must agree.
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

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"><b>bold</b> & co'


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("web") / "tiny-llama", "llama", num_layers=4)
    with Swarm(model=path, workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start("0:2", "--public-name", HOSTILE)
        for blocks, name in (("0:2", "second-head"), ("2:4", "tail")):
            swarm.start(blocks, "--public-name", name, wait=False)
        for server in swarm.servers[1:]:
            swarm.wait_ready(server)
        yield swarm


@pytest.fixture(scope="module")
def web(swarm, tmp_path_factory):
    with CliServer(
        tmp_path_factory.mktemp("web-log"),
        *("swarm", "web", "--initial-peers", *swarm.initial_peers, "--interval", "1"),
        ready_path="/api/v1/state",
    ) as server:
        yield server


def healthy_page(page, web):
    from playwright.sync_api import expect

    page.goto(web.url + "/")
    expect(page.locator(".model .verdict")).to_have_text("healthy", timeout=60_000)
    return page


def coverage_classes(page) -> list[str]:
    cells = page.locator(".strip .cell")
    return [cells.nth(index).get_attribute("class").removeprefix("cell ") for index in range(cells.count())]


def test_first_render_without_javascript_shows_coverage_and_spans(web, page_at):
    from playwright.sync_api import expect

    page = page_at(DESKTOP, javascript=False)
    deadline = time.monotonic() + 60
    while True:  # the page reloads itself without JavaScript; here each look is a fresh load
        page.goto(web.url + "/")
        if page.locator(".model .verdict").text_content() == "healthy" or time.monotonic() > deadline:
            break
        time.sleep(1)
    expect(page.locator(".model .verdict")).to_have_text("healthy")
    assert coverage_classes(page) == ["c2", "c2", "c1", "c1"]
    bars = page.locator(".bars .bar")
    assert sorted(bars.nth(index).text_content() for index in range(3)) == sorted([HOSTILE, "second-head", "tail"])
    tail = page.locator(".bars .bar", has_text="tail")
    assert tail.get_attribute("style").replace(" ", "") == "grid-column:3/5"  # blocks 2:4 on a 4-block grid
    assert "blocks 2:4, online" in tail.get_attribute("title")
    assert page.evaluate("document.querySelector('noscript') !== null")


def test_announced_markup_is_shown_as_text_and_runs_nothing(web, page_at):
    from playwright.sync_api import expect

    page = healthy_page(page_at(DESKTOP), web)
    expect(page.locator("#health")).to_have_attribute("data-refreshed", re.compile(r"\d+"))  # a live refresh
    assert HOSTILE in page.locator(".peer-name").all_text_contents()
    assert page.evaluate("window.pwned") is None
    assert page.locator("#health img, #health script, .peer-name b, .bar b").count() == 0
    screenshot(page, "health-desktop")
    phone = healthy_page(page_at(PHONE, scale=2), web)
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # only the table scrolls
    screenshot(phone, "health-phone")


def test_state_is_what_swarm_status_json_says(web, swarm):
    status, text = web.get("/api/v1/state")
    assert status == 200
    ours = json.loads(text)
    cli = subprocess.run(
        petals_command("swarm", "status", "--json", "--initial-peers", *swarm.initial_peers),
        capture_output=True,
        text=True,
        timeout=120,
    )
    theirs = json.loads(cli.stdout)

    def essentials(document):
        return [
            (
                model["prefix"],
                model["num_blocks"],
                model["coverage"],
                model["missing_blocks"],
                sorted((s["peer_id"], s["public_name"], s["start_block"], s["end_block"]) for s in model["servers"]),
            )
            for model in document["models"]
        ]

    assert set(ours) == set(theirs) and ours["schema_version"] == theirs["schema_version"]
    assert essentials(ours) == essentials(theirs)
    assert set(ours["models"][0]["servers"][0]) == set(theirs["models"][0]["servers"][0])
    assert ours["models"][0]["coverage"] == [2, 2, 1, 1]


def metrics(web) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = web.get("/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_and_count_servers_and_blocks(web):
    values = metrics(web)
    model = (("model", "tiny-llama"),)
    assert values[("petals_monitor_up", ())] == 1
    assert values[("petals_model_healthy", model)] == 1
    assert [values[("petals_block_servers", (("block", str(b)), *model))] for b in range(4)] == [2, 2, 1, 1]
    assert values[("petals_model_min_block_servers", model)] == 1
    assert values[("petals_servers", (*model, ("state", "online")))] == 3
    assert values[("petals_server_rtt_seconds_count", model)] == 3


def test_the_page_is_gzipped_for_clients_that_accept_it(web):
    import gzip
    import urllib.request

    request = urllib.request.Request(web.url + "/", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert "swarm health" in gzip.decompress(response.read()).decode()


def test_killed_server_turns_the_open_page_broken_naming_its_blocks(web, swarm, page_at):
    from playwright.sync_api import expect

    page = healthy_page(page_at(DESKTOP), web)
    tail = next(server for server in swarm.servers if server.blocks == "2:4")
    tail.process.kill()  # SIGKILL: no goodbye in the DHT, its records stay until they expire
    killed = time.monotonic()
    expect(page.locator(".model .verdict")).to_have_text("broken: no server for blocks 2:4", timeout=90_000)
    print(f"page broken {time.monotonic() - killed:.1f} s after the SIGKILL")
    row = page.locator("tr", has=page.locator("td", has_text="tail"))
    expect(row.locator(".state")).to_have_text("unreachable")
    screenshot(page, "health-broken-desktop")
    assert coverage_classes(page) == ["c2", "c2", "c0", "c0"]
    values = metrics(web)
    model = (("model", "tiny-llama"),)
    assert values[("petals_model_healthy", model)] == 0 and values[("petals_model_missing_blocks", model)] == 2
    assert values[("petals_servers", (*model, ("state", "unreachable")))] == 1
