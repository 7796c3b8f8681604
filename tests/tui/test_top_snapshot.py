"""A snapshot of `swarm top`'s main screen: any change to what users see shows up as a diff.

Regenerate after an intended change with `pytest tests/tui/test_top_snapshot.py --snapshot-update`
and look at the SVG before committing it.
"""

import dataclasses
import time

from petals_cli.tui.app import SwarmTop
from tests.tui.test_top import HEALTHY, FakeStream, table_peers

FIXED_TIME = 1_800_000_000.0  # the status bar shows the update time: keep it fixed


async def _wait_for_rows(pilot):
    while len(table_peers(pilot.app)) < 2:
        await pilot.pause(0.05)
    await pilot.pause(0.2)


def test_main_screen(snap_compare, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    fixed = dataclasses.replace(HEALTHY, taken_at=FIXED_TIME)
    app = SwarmTop(FakeStream(fixed))
    assert snap_compare(app, terminal_size=(140, 40), run_before=_wait_for_rows)
