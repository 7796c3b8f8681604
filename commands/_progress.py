"""Terminal feedback while a command opens a model: a bar for local weights, a spinner while connecting.

Both go to stderr and only when stderr is a terminal, so piped output and logs stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass
class OpenFeedback:
    on_progress: Callable[[int, int], None] | None
    connecting: Callable[[], contextlib.AbstractContextManager]


@contextlib.contextmanager
def open_feedback(what: str) -> Iterator[OpenFeedback]:
    """Callbacks for ``open_model``: weights progress for ``what``, then a spinner while joining the swarm."""
    if not sys.stderr.isatty():
        yield OpenFeedback(None, contextlib.nullcontext)
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn(f"Loading local weights of {what}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("weights", total=None)

    def on_progress(done: int, total: int) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done, total=total)
        if done >= total:
            progress.stop()

    @contextlib.contextmanager
    def connecting():
        progress.stop()
        with console.status("Connecting to the swarm…"):
            yield

    try:
        yield OpenFeedback(on_progress, connecting)
    finally:
        progress.stop()


def open_model_with_feedback(model: str, config, *, prompts: str | None = None):
    """``generation.open_model`` with terminal feedback; returns (distributed model, tokenizer)."""
    from petals_cli.generation import open_model

    with open_feedback(model) as feedback:
        return open_model(
            model, config, prompts=prompts, on_progress=feedback.on_progress, connecting=feedback.connecting
        )
