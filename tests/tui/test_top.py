"""`petals swarm top` driven by Textual's pilot: a synthetic status stream (the module boundary), then a real swarm."""

import asyncio
import dataclasses
import time

import pytest
from textual.widgets import DataTable, Input, Static

from petals_cli.swarm import ModelStatus, ServerStatus, SwarmStatus
from petals_cli.tui.app import HelpScreen, SwarmTop

NUM_BLOCKS = 6


def server(peer_id, start, end, *, name="", state="online", throughput=1.0, rtt=0.002, pings=None) -> ServerStatus:
    return ServerStatus(
        peer_id=peer_id,
        public_name=name,
        start_block=start,
        end_block=end,
        state=state,
        throughput=throughput,
        inference_rps=0.0,
        forward_rps=0.0,
        cache_tokens_left=4096,
        dtype="float32",
        quantization="none",
        version="0.1.0",
        protocol=1,
        adapters=("lora-a",),
        connection="direct",
        pings=pings or {},
        rtt=rtt,
    )


def status(*servers: ServerStatus, error: str = "") -> SwarmStatus:
    coverage = [0] * NUM_BLOCKS
    for item in servers:
        if item.state == "online":
            for index in range(item.start_block, item.end_block):
                coverage[index] += 1
    model = ModelStatus("tiny", "./tiny", "llama", NUM_BLOCKS, tuple(coverage), tuple(servers))
    return SwarmStatus(models=(model,), taken_at=time.time(), error=error)


HEALTHY = status(
    server("12D3KooWAAAAAAAAalpha111", 0, 3, name="zulu", throughput=5.0, pings={"12D3KooWBBBBBBBBbeta2222": 0.003}),
    server("12D3KooWBBBBBBBBbeta2222", 3, 6, name="alpha", throughput=9.0),
)


class FakeStream:
    """Counts how many streams the app started; each yields the given statuses, then waits."""

    def __init__(self, *statuses: SwarmStatus):
        self.statuses, self.started = statuses, 0

    async def __call__(self):
        self.started += 1
        for item in self.statuses:
            yield item
            await asyncio.sleep(0.01)
        await asyncio.Event().wait()


class GatedStream(FakeStream):
    """Yields its first status at once and each next one only when the test calls ``advance``."""

    def __init__(self, *statuses: SwarmStatus):
        super().__init__(*statuses)
        self.gate = asyncio.Queue()

    def advance(self):
        self.gate.put_nowait(None)

    async def __call__(self):
        self.started += 1
        for index, item in enumerate(self.statuses):
            if index:
                await self.gate.get()
            yield item
        await asyncio.Event().wait()


def table_peers(app) -> list[str]:
    table = app.query_one("#servers", DataTable)
    return [str(table.get_row_at(index)[1]) for index in range(table.row_count)]


def text_of(app, selector) -> str:
    return str(app.query_one(selector, Static).render())


async def until(pilot, condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.05)


def run(coroutine):
    asyncio.run(asyncio.wait_for(coroutine, 60))


def test_shows_models_coverage_servers_and_detail():
    async def scenario():
        app = SwarmTop(FakeStream(HEALTHY))
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: app.query_one("#servers", DataTable).row_count == 2)
            assert "healthy" in text_of(app, "#models")
            assert "111111" in text_of(app, "#coverage")
            assert table_peers(app) == ["…alpha111", "…beta2222"]  # sorted by span
            assert "lora-a" in text_of(app, "#detail") and "…beta2222  3.0 ms" in text_of(app, "#detail")
            await pilot.press("down")
            assert "12D3KooWBBBBBBBBbeta2222" in text_of(app, "#detail")
            assert "updated" in text_of(app, "#statusbar")

    run(scenario())


def test_keys_sort_filter_help_refresh_and_quit():
    async def scenario():
        stream = FakeStream(HEALTHY)
        app = SwarmTop(stream)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: app.query_one("#servers", DataTable).row_count == 2)
            await pilot.press("s")  # span -> peer
            await pilot.press("s")  # peer -> name: "alpha" sorts before "zulu"
            assert app.sort == "name" and table_peers(app) == ["…beta2222", "…alpha111"]
            assert "sort: name" in text_of(app, "#statusbar")
            await pilot.press("slash")
            assert app.focused is app.query_one("#filter", Input)
            await pilot.press("z", "u", "l", "enter")
            assert table_peers(app) == ["…alpha111"] and "filter: 'zul'" in text_of(app, "#statusbar")
            await pilot.press("escape")
            assert len(table_peers(app)) == 2
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("question_mark")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("r")
            await until(pilot, lambda: stream.started == 2)
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running)

    run(scenario())


def test_unreachable_swarm_is_reported_and_the_app_keeps_running():
    async def scenario():
        broken = status(server("12D3KooWAAAAAAAAalpha111", 0, 3))
        stream = GatedStream(HEALTHY, status(error="swarm unreachable: no peer answered"), broken)
        app = SwarmTop(stream)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: len(table_peers(app)) == 2)
            stream.advance()
            await until(pilot, lambda: app.latest.error)
            assert "unreachable" in text_of(app, "#statusbar") and "last good update" in text_of(app, "#statusbar")
            assert len(table_peers(app)) == 2  # the last good picture stays on screen
            stream.advance()
            await until(pilot, lambda: not app.latest.error)
            assert "broken: no server for blocks 3:6" in text_of(app, "#models")
            assert app.is_running

    run(scenario())


def test_a_flagged_server_is_marked_in_the_table_and_its_detail():
    async def scenario():
        first, second = HEALTHY.models[0].servers
        flagged = status(first, dataclasses.replace(second, flagged=3))
        app = SwarmTop(FakeStream(flagged))
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: len(table_peers(app)) == 2)
            table = app.query_one("#servers", DataTable)
            states = [str(table.get_row_at(index)[4]) for index in range(table.row_count)]
            assert states == ["online", "online ⚠ tampered (3 reports)"]
            await pilot.press("down")
            assert "verification: ⚠ tampered (3 reports)" in text_of(app, "#detail")

    run(scenario())


HOSTILE = "[reverse]HACKED[/reverse] [link=https://evil.example]click[/link]"


def test_what_servers_announce_is_shown_as_plain_text_not_markup():
    """A public name, version, dtype or model name that looks like Rich markup is shown as it is written: the table
    holds Text cells (a string cell would be parsed as markup), the detail pane appends plain text."""

    async def scenario():
        first, second = HEALTHY.models[0].servers
        hostile = dataclasses.replace(second, public_name=HOSTILE, version="[blink]9[/blink]", dtype="[bold]x[/]")
        model = dataclasses.replace(status(first, hostile).models[0], prefix="[red]tiny[/red]", family="[i]f[/i]")
        app = SwarmTop(FakeStream(SwarmStatus(models=(model,), taken_at=time.time())))
        async with app.run_test(size=(220, 40)) as pilot:
            await until(pilot, lambda: len(table_peers(app)) == 2)
            table = app.query_one("#servers", DataTable)
            cells = [table.get_row_at(1)[index] for index in (0, 2, 10, 11)]
            assert [cell.plain for cell in cells] == ["[red]tiny[/red]", HOSTILE, "[bold]x[/]", "[blink]9[/blink]"]
            assert all(not cell.spans and not cell.style for cell in cells)  # no style, no link came through
            await pilot.press("down")
            assert HOSTILE in text_of(app, "#detail") and "[i]f[/i]" in text_of(app, "#models")

    run(scenario())


@pytest.mark.slow
def test_top_against_a_real_swarm_shows_both_servers(tmp_path, swarm_factory):
    from petals_cli.config import ClientConfig
    from petals_cli.swarm import StatusFeed
    from petals_cli.testing import make_tiny_model

    swarm = swarm_factory(make_tiny_model(tmp_path / "tiny-top", "llama", num_layers=4))
    swarm.start_many("0:2", "2:4")
    peers = sorted(server.addresses()[0].rsplit("/p2p/", 1)[1][-8:] for server in swarm.servers)
    feed = StatusFeed(ClientConfig(initial_peers=tuple(swarm.initial_peers)), interval=0.5)

    async def scenario():
        app = SwarmTop(feed.stream)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: len(table_peers(app)) == 2, timeout=30)
            assert sorted(peer[-8:] for peer in table_peers(app)) == peers
            assert "healthy" in text_of(app, "#models")

    try:
        run(scenario())
    finally:
        feed.close()


def test_screenshot_without_a_downloads_directory_lands_in_the_current_one(tmp_path, monkeypatch):
    """Ctrl-P → Screenshot: Textual's default ~/Downloads may not exist; the file goes where the user can find it."""
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no Downloads in it
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))  # no user-dirs.dirs either
    monkeypatch.chdir(tmp_path / "work")

    async def scenario():
        app = SwarmTop(FakeStream(HEALTHY))
        notes = []
        app.notify = lambda message, **options: notes.append(message)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: len(table_peers(app)) == 2)
            await pilot.press("ctrl+p", *"screenshot")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await until(pilot, lambda: notes)
            assert "Saved screenshot" in notes[0], notes
            [saved] = (tmp_path / "work").glob("*.svg")
            assert str(saved) in notes[0] and "<svg" in saved.read_text()

    run(scenario())


def test_a_relayed_server_shows_its_link_and_relays():
    async def scenario():
        first, second = HEALTHY.models[0].servers
        relayed = dataclasses.replace(second, connection="relayed", relays=("12D3KooWRRRRRRRRrelay999",))
        app = SwarmTop(FakeStream(status(first, relayed)))
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: len(table_peers(app)) == 2)
            table = app.query_one("#servers", DataTable)
            assert "relayed" in [str(cell) for cell in table.get_row_at(1)]
            await pilot.press("down")
            assert "link: relayed through …relay999" in text_of(app, "#detail")

    run(scenario())
