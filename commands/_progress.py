"""Terminal feedback while a command works: a spinner that says what is happening (loading, connecting, each bench
phase, waiting for servers of missing blocks) and a bar while local weights load.

All of it goes to stderr and only when stderr is a terminal, so piped output and logs stay clean; rich is imported
only then. The core never prints: it takes callbacks (``on_progress``, ``on_phase``, ``on_route_wait``) that the
objects here provide.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator


class Feedback:
    """One line on a terminal's stderr: a spinner with a text, or the weights bar; on anything else, nothing.

    Its methods may be called from any thread (the client's event loop reports route waits from its own)."""

    def __init__(self, console=None):
        self._console = console
        self._lock = threading.RLock()
        self._live = self._spinner = self._bar = None
        self._text: str | None = None  # what the spinner says while it shows
        self._before_wait: str | None = None  # what it said when a route wait took the line over
        self.weights_of = "the model"  # named by the weights bar

    @property
    def enabled(self) -> bool:
        return self._console is not None

    @classmethod
    def on_stderr(cls) -> Feedback:
        """Feedback on stderr when it is a terminal, silent otherwise."""
        if not sys.stderr.isatty():
            return cls()
        from rich.console import Console

        return cls(Console(stderr=True))

    def say(self, text: str) -> None:
        """Show a spinner saying ``text`` (in place of whatever the line showed)."""
        if self._console is None:
            return
        from rich.spinner import Spinner
        from rich.text import Text

        with self._lock:
            if self._spinner is None:
                self._spinner = Spinner("dots")
            self._spinner.update(text=Text(text))  # plain text: a model path may hold [brackets]
            self._text = text
            self._show(self._spinner)

    def clear(self) -> None:
        """Take the line away (before results print, or when the command ends)."""
        with self._lock:
            self._text = None
            if self._live is not None:
                self._live.stop()
                self._live = None

    def weights(self, done: int, total: int) -> None:
        """``on_progress`` for loading local weights: a bar of bytes read."""
        if self._console is None:
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        with self._lock:
            if self._bar is None:
                self._bar = Progress(
                    TextColumn(f"Loading local weights of {self.weights_of}", markup=False),
                    BarColumn(),
                    DownloadColumn(),
                    TimeElapsedColumn(),
                    console=self._console,
                )
                self._bar.add_task("weights", total=None)
            self._bar.update(self._bar.task_ids[0], completed=done, total=total)
            self._text = None
            self._show(self._bar)

    @contextlib.contextmanager
    def connecting(self) -> Iterator[None]:
        """``connecting`` for ``from_pretrained``: a spinner while the client joins the swarm."""
        self.say("Connecting to the swarm…")
        yield

    def route_wait(self, missing_blocks: tuple[int, ...], seconds_left: float) -> None:
        """``SwarmClient.on_route_wait``: say which blocks lack a server; when the wait ends, show what was there."""
        if self._console is None:
            return
        with self._lock:
            if missing_blocks:
                from petals_cli.routing import format_blocks

                if self._before_wait is None:
                    self._before_wait = self._text or ""
                self.say(f"Waiting for servers of blocks {format_blocks(missing_blocks)} ({seconds_left:.0f}s left)…")
                return
            before, self._before_wait = self._before_wait, None
            if before:
                self.say(before)
            else:
                self.clear()

    def _show(self, renderable) -> None:
        if self._live is None:
            from rich.live import Live

            # stdout is left alone (results); writes to sys.stderr print above the line
            self._live = Live(renderable, console=self._console, transient=True, redirect_stdout=False)
            self._live.start(refresh=True)
        else:
            self._live.update(renderable, refresh=True)


@contextlib.contextmanager
def spinner(text: str) -> Iterator[Feedback]:
    """A spinner saying ``text`` on a terminal's stderr while the block runs (its text can change); then gone."""
    feedback = Feedback.on_stderr()
    feedback.say(text)
    try:
        yield feedback
    finally:
        feedback.clear()


def open_model_with_feedback(model: str, config, *, prompts: str | None = None):
    """``generation.open_model`` with terminal feedback; returns (distributed model, tokenizer).

    A spinner while the model's files load, a bar for the local weights, a spinner while connecting; afterwards,
    a spinner whenever the client waits for servers of missing blocks."""
    with spinner(f"Loading {model}…") as feedback:
        from petals_cli.generation import open_model

        feedback.weights_of = model
        distributed, tokenizer = open_model(
            model, config, prompts=prompts, on_progress=feedback.weights, connecting=feedback.connecting
        )
    waits = Feedback.on_stderr()
    if waits.enabled:
        distributed.petals_client.on_route_wait = waits.route_wait
    return distributed, tokenizer
