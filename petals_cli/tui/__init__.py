"""The Textual `swarm top` app. ``run_top`` is the CLI's entry point; textual is an optional extra (``[tui]``)."""

from __future__ import annotations

import logging

from petals_cli.errors import ConfigError, SwarmUnreachableError


def run_top(config, *, model_prefix: str | None = None, interval: float = 2.0) -> None:
    """Show the swarm of ``config`` (a ``ClientConfig``) live until the user quits."""
    try:
        from petals_cli.tui.app import SwarmTop
    except ModuleNotFoundError as error:
        if error.name != "textual":
            raise
        raise ConfigError("`petals swarm top` needs textual", hint="pip install 'petals-cli[tui]'") from None
    from petals_cli.swarm import StatusFeed

    if not config.initial_peers:
        raise SwarmUnreachableError(
            "no initial peers: `swarm top` does not know any swarm",
            hint="pass --initial-peers MADDR (or set PETALS_INITIAL_PEERS)",
        )
    _quiet_logging()
    feed = StatusFeed(config, model_prefix=model_prefix, interval=interval)
    try:
        SwarmTop(feed.stream).run()
    finally:
        feed.close()


def _quiet_logging() -> None:
    """Log lines on stderr would tear the full-screen display: problems show in the status bar instead."""
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.CRITICAL)
    logging.getLogger("hivemind").setLevel(logging.CRITICAL)
