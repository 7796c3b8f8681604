"""`petals swarm top`: a Textual app that shows the swarm live.

The app consumes a stream of ``SwarmStatus`` (``stream_factory()`` returns an async iterator; each call starts
a fresh stream, which is how ``r`` refreshes at once) in a worker that posts ``StatusUpdated`` messages.
Widgets only render what those messages carry; nothing here talks to the DHT. Styles live in ``top.tcss``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static

from petals_cli.swarm import SwarmStatus
from petals_cli.tui import render

HELP = """\
[b]petals swarm top[/b] — the swarm, refreshed every few seconds

  [b]q[/b]       quit
  [b]r[/b]       refresh now
  [b]s[/b]       sort by the next column (span, peer, name, state, throughput, cache, sessions, rtt)
  [b]/[/b]       filter servers by peer id or name (enter keeps it, escape clears it)
  [b]↑ ↓[/b]     select a server: its details show on the right
  [b]?[/b]       this help (escape or ? closes it)

Coverage map: one row per server, one cell per block:
[green]█ online[/] [yellow]█ joining[/] [red]█ offline[/] [bold red]█ unreachable[/] (announced, did not answer);
the last row counts the online servers of each block ([red]0[/] = no server: the model is broken).

[bold red]⚠ tampered (N reports)[/] after a server's state: this machine's verification (--verify) signed N reports
that its outputs disagreed with other replicas' (the evidence log, ~/.cache/petals/verification.jsonl)."""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "close"),
        Binding("question_mark", "dismiss", "close"),
        Binding("q", "dismiss", "close"),
    ]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")


class SwarmTop(App[None]):
    """The live swarm map; ``stream_factory`` is the only source of data."""

    CSS_PATH = "top.tcss"
    TITLE = "petals swarm top"
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("r", "refresh_now", "refresh"),
        Binding("s", "cycle_sort", "sort"),
        Binding("slash", "start_filter", "filter"),
        Binding("question_mark", "help", "help"),
        Binding("escape", "clear_filter", "clear filter", show=False),
    ]

    class StatusUpdated(Message):
        def __init__(self, status: SwarmStatus):
            super().__init__()
            self.status = status

    def __init__(self, stream_factory: Callable[[], AsyncIterator[SwarmStatus]]):
        super().__init__()
        self._stream_factory = stream_factory
        self.latest = SwarmStatus()
        self.last_good: SwarmStatus | None = None
        self.sort = "span"
        self.text_filter = ""
        self._rows: dict[str, render.Row] = {}

    def compose(self) -> ComposeResult:
        yield Static(render.models_text(self.latest), id="models")
        yield VerticalScroll(Static(id="coverage"), id="coverage-box")
        with Horizontal(id="main"):
            yield DataTable(id="servers", cursor_type="row", zebra_stripes=True)
            yield VerticalScroll(Static(render.detail_text(None), id="detail"), id="detail-box")
        yield Input(placeholder="filter by peer id or name", id="filter")
        yield Static(id="statusbar")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#servers", DataTable)
        for key, label in render.COLUMNS:
            table.add_column(label, key=key)
        table.focus()
        self._render_status_bar()
        self._follow()

    @work(exclusive=True, group="feed", exit_on_error=False)
    async def _follow(self) -> None:
        stream = self._stream_factory()
        try:
            async for status in stream:
                self.post_message(self.StatusUpdated(status))
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def on_swarm_top_status_updated(self, message: StatusUpdated) -> None:
        self.latest = message.status
        if not message.status.error:
            self.last_good = message.status
            self._render_swarm()
        self._render_status_bar()

    def _render_swarm(self) -> None:
        status = self.last_good or SwarmStatus()
        rows = render.server_rows(status, sort=self.sort, text_filter=self.text_filter)
        self.query_one("#models", Static).update(render.models_text(status))
        self.query_one("#coverage", Static).update(render.coverage_text(status, rows))
        table = self.query_one("#servers", DataTable)
        selected = self._selected_key()
        table.clear()
        self._rows = {render.row_key(row): row for row in rows}
        for key, row in self._rows.items():
            table.add_row(*render.table_cells(row), key=key)
        if selected in self._rows:
            table.move_cursor(row=table.get_row_index(selected))
        self._render_detail()

    def _selected_key(self) -> str | None:
        table = self.query_one("#servers", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def _render_detail(self) -> None:
        self.query_one("#detail", Static).update(render.detail_text(self._rows.get(self._selected_key() or "")))

    def _render_status_bar(self) -> None:
        line = render.status_line(self.latest, self.last_good, sort=self.sort, text_filter=self.text_filter)
        self.query_one("#statusbar", Static).update(line)
        self.query_one("#statusbar", Static).set_class(bool(self.latest.error), "error")

    def on_data_table_row_highlighted(self, message: DataTable.RowHighlighted) -> None:
        self._render_detail()

    def action_refresh_now(self) -> None:
        self._follow()

    def action_cycle_sort(self) -> None:
        keys = list(render.SORT_KEYS)
        self.sort = keys[(keys.index(self.sort) + 1) % len(keys)]
        self._render_swarm()
        self._render_status_bar()

    def action_start_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.add_class("visible")
        field.focus()

    def action_clear_filter(self) -> None:
        self._set_filter("")
        self._close_filter()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def deliver_screenshot(
        self, filename: str | None = None, path: str | None = None, time_format: str | None = None
    ) -> str | None:
        """The command palette's "Screenshot": Textual saves into ~/Downloads and fails where that does not exist;
        save into a directory that does (Textual's notification then names the file)."""
        return super().deliver_screenshot(filename, path or str(screenshot_directory()), time_format)

    def on_input_changed(self, message: Input.Changed) -> None:
        self._set_filter(message.value)

    def on_input_submitted(self, message: Input.Submitted) -> None:
        self._close_filter()

    def _set_filter(self, text: str) -> None:
        self.text_filter = text.strip()
        self._render_swarm()
        self._render_status_bar()

    def _close_filter(self) -> None:
        field = self.query_one("#filter", Input)
        if not self.text_filter:
            field.value = ""
        field.remove_class("visible")
        self.query_one("#servers", DataTable).focus()


def screenshot_directory() -> Path:
    """The user's downloads directory if it exists, else the current directory, else the temporary one."""
    from platformdirs import user_downloads_path  # Textual's own source of ~/Downloads (a dependency of it)

    candidates = (user_downloads_path(), Path.cwd(), Path(tempfile.gettempdir()))
    return next((path for path in candidates if path.is_dir() and os.access(path, os.W_OK)), candidates[-1])
