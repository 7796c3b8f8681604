"""The web pages' pure parts: the health page's HTML (checked with the standard library's HTML parser), the
Prometheus text (checked with the Prometheus client's own parser), and the background monitor's bookkeeping."""

from __future__ import annotations

import asyncio
from html.parser import HTMLParser

import pytest

from petals_cli.swarm import ModelStatus, ServerStatus, SwarmStatus
from petals_cli.web.health import render_fragment, render_page
from petals_cli.web.metrics import render_metrics
from petals_cli.web.monitor import MonitorView, SwarmMonitor

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>"quoted" & \'single\''


def server(peer: str, start: int, end: int, **fields) -> ServerStatus:
    defaults = dict(
        public_name="", state="online", throughput=10.0, inference_rps=1.0, forward_rps=1.0, cache_tokens_left=100,
        dtype="float32", quantization="none", version="0.1.0", protocol=1, adapters=(), connection="direct",
        pings={}, rtt=0.01,
    )  # fmt: skip
    return ServerStatus(peer_id=peer, start_block=start, end_block=end, **{**defaults, **fields})


def model(prefix="m", servers=(), num_blocks=4, **fields) -> ModelStatus:
    coverage = [0] * num_blocks
    for each in servers:
        if each.state == "online":
            for block in range(each.start_block, each.end_block):
                coverage[block] += 1
    defaults = dict(model="org/m", family="llama")
    return ModelStatus(prefix, num_blocks=num_blocks, coverage=tuple(coverage), servers=tuple(servers),
                       **{**defaults, **fields})  # fmt: skip


class Parsed(HTMLParser):
    def __init__(self, markup: str):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def view(status=None, error="", period=5.0) -> MonitorView:
    return MonitorView(status, error, checked_at=1.0, period=period)


def test_strings_from_the_swarm_are_text_in_the_page_never_markup():
    hostile = server("QmPeer", 0, 2, public_name=HOSTILE, version=HOSTILE, dtype=HOSTILE, quantization=HOSTILE)
    status = SwarmStatus((model(HOSTILE, [hostile], model=HOSTILE, family=HOSTILE),), taken_at=1.0)
    page = Parsed(render_page(view(status, error=HOSTILE), base="/swarm"))
    assert set(page.tags) - {"html", "head", "meta", "title", "link", "noscript", "script", "body", "header", "a",
                             "span", "nav", "main", "p", "section", "h2", "div", "table", "thead", "tr", "th",
                             "tbody", "td", "code", "time"} == set()  # fmt: skip
    assert page.tags.count("script") == 1 and "img" not in page.tags
    assert not [name for name, _ in page.attributes if name.startswith("on")]
    text = "".join(page.text)
    assert text.count(HOSTILE) >= 4  # the model's prefix, name and family, the server's name, version, error
    assert any(value and HOSTILE in value for name, value in page.attributes if name == "title")  # the tooltip


def test_page_states_and_verdicts():
    assert "Reading the swarm…" in render_fragment(view())
    failed = render_fragment(view(error="swarm unreachable: no answer within 30s"))
    assert "Reading the swarm failed: swarm unreachable" in failed
    assert "No models are served" in render_fragment(view(SwarmStatus(taken_at=1.0)))
    broken = model(servers=[server("a", 0, 1), server("b", 3, 4)])
    text = "".join(Parsed(render_fragment(view(SwarmStatus((broken,), taken_at=1.0)))).text)
    assert "broken: no server for blocks 1:3" in text and "fewest servers: 0 on blocks 1:3" in text
    stale = render_fragment(view(SwarmStatus((broken,), taken_at=1.0), error="timeout"))
    assert 'class="reading stale"' in stale and "Showing the reading of 1970-01-01 00:00:01 UTC" in stale


def test_page_without_javascript_reloads_itself_at_the_reading_period():
    page = render_page(view(period=7.0), base="")
    assert '<noscript><meta http-equiv="refresh" content="7"></noscript>' in page
    assert 'data-fragment="/fragment"' in page and 'href="/api/v1/state"' in page


def metric_samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_with_prometheus_and_escape_labels():
    awkward = 'a"b\\c\nd'
    rtts = [index / 1000 for index in range(1, 101)]
    servers = [server(f"p{index}", 0, 4, rtt=rtt) for index, rtt in enumerate(rtts)]
    servers += [
        server("dead", 0, 2, state="unreachable", rtt=None),
        server("relayed", 2, 4, connection="relayed", flagged=2, rtt=None),
    ]
    status = SwarmStatus((model(awkward, servers),), taken_at=123.0)
    values = metric_samples(render_metrics(view(status)))
    label = (("model", awkward),)
    assert values[("petals_monitor_up", ())] == 1 and values[("petals_monitor_reading_timestamp_seconds", ())] == 123
    assert values[("petals_servers", (*label, ("state", "online")))] == 101
    assert values[("petals_servers", (*label, ("state", "unreachable")))] == 1
    assert values[("petals_servers_relayed", label)] == 1 and values[("petals_servers_flagged", label)] == 1
    assert values[("petals_model_min_block_servers", label)] == 100  # blocks 0:2: the unreachable one is not counted
    assert values[("petals_server_rtt_seconds", (*label, ("quantile", "0.5")))] == pytest.approx(0.0505)
    assert values[("petals_server_rtt_seconds", (*label, ("quantile", "0.99")))] == pytest.approx(0.09901)
    assert values[("petals_server_rtt_seconds_count", label)] == 100


def test_metrics_before_any_reading_and_after_a_failure():
    values = metric_samples(render_metrics(view()))
    assert values[("petals_monitor_up", ())] == 0 and values[("petals_models", ())] == 0
    failed = metric_samples(render_metrics(view(SwarmStatus((model(),), taken_at=5.0), error="timeout")))
    assert failed[("petals_monitor_up", ())] == 0 and failed[("petals_model_healthy", (("model", "m"),))] == 0


def test_monitor_keeps_the_last_good_reading_beside_a_failure():
    readings = [
        SwarmStatus((model(servers=[server("a", 0, 4)]),), taken_at=1.0),
        SwarmStatus(taken_at=2.0, error="swarm unreachable: no answer within 30s"),
    ]
    seen: list[MonitorView] = []

    async def scenario():
        async def read():
            return readings.pop(0) if readings else SwarmStatus(taken_at=3.0, error="still down")

        monitor = SwarmMonitor(read, period=0.01)
        monitor.start()
        for _ in range(3):
            await asyncio.sleep(0.02)
            seen.append(monitor.view())
        await monitor.stop()

    asyncio.run(scenario())
    last = seen[-1]
    assert last.status is not None and last.status.taken_at == 1.0 and last.stale
    state = last.state_json()
    assert state["error"] == "still down" and state["models"][0]["coverage"] == [1, 1, 1, 1]


def test_monitor_that_reads_only_while_visited_stops_and_starts_again():
    now = [0.0]
    reads: list[float] = []

    async def scenario():
        async def read():
            reads.append(now[0])
            return SwarmStatus(taken_at=now[0])

        monitor = SwarmMonitor(read, period=0.01, idle_after=10.0, clock=lambda: now[0])
        monitor.visit()
        await asyncio.sleep(0.05)
        now[0] = 11.0  # nobody has looked for 11 s: the loop ends at its next turn
        await asyncio.sleep(0.05)
        stopped_at = len(reads)
        await asyncio.sleep(0.05)
        assert len(reads) == stopped_at
        monitor.visit()
        await asyncio.sleep(0.05)
        await monitor.stop()
        return stopped_at

    stopped_at = asyncio.run(scenario())
    assert len(reads) > stopped_at and reads[-1] == 11.0


class Tokenizer:
    def __init__(self, chat_template):
        self.chat_template = chat_template


@pytest.mark.parametrize("template", ["{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}", None])
def test_chat_page_names_its_template_and_escapes_what_it_fills_in(template):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from petals_cli.web.app import add_chat_page, add_static

    app = FastAPI()
    add_static(app)
    add_chat_page(app, model_name='org/"m"<x>', tokenizer=Tokenizer(template), key_required=True, swarm_url="/swarm")
    with TestClient(app) as client:
        response = client.get("/")
        script = client.get("/static/petals/chat.js")
        missing = client.get("/static/petals/../app.py")
    page = Parsed(response.text)
    assert response.status_code == 200 and "script-src 'self'" in response.headers["content-security-policy"]
    assert ("data-model", 'org/"m"<x>') in page.attributes and ("data-key-required", "true") in page.attributes
    assert not [key for key in ("model", "template", "key_required", "swarm_url") if f"{{{{{key}}}}}" in response.text]
    assert "x" not in page.tags
    text = "".join(page.text)
    if template:
        assert "Chat template: the model's own chat template" in text and template in text
    else:
        assert "plain transcript of User: and Assistant: lines" in text
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404
