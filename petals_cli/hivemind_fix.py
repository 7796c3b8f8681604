"""A fix of hivemind 1.1.12, applied on import (``transport`` imports it, so every petals process has it).

In hivemind's daemon connection, the task that reads the daemon's answers completes each unary call's future with
no check: when a call's timeout fires in the same loop iteration as its answer arrives (a liveness ping, a DHT
request on a loaded machine), that raises InvalidStateError, the reading task ends, and no unary call of the
process is ever answered again: pings fail, the DHT reads nothing, pushes time out, for good. Here the pending
calls are a mapping in which an answer to a call already done (cancelled) is dropped.
"""

from __future__ import annotations

import asyncio
import functools

from hivemind.p2p.p2p_daemon_bindings.control import ControlClient


class _PendingCalls(dict):
    """hivemind's unary calls waiting for their answers (``ControlClient._pending_calls``), where an answer to a call
    that was already cancelled is dropped."""

    def __getitem__(self, call_id):
        return _Settable(super().__getitem__(call_id))


class _Settable:
    """A call's future as the reader sees it: completing one that is done already (cancelled) does nothing."""

    def __init__(self, future: asyncio.Future):
        self.future = future

    def set_result(self, result) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def set_exception(self, exception: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exception)

    def __await__(self):
        return self.future.__await__()


def _keep_reading_after_cancelled_calls() -> None:
    """Give every ControlClient made from now on a ``_PendingCalls`` (idempotent)."""
    init = ControlClient.__init__
    if getattr(init, "petals_pending_calls", False):
        return

    @functools.wraps(init)
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._pending_calls = _PendingCalls(self._pending_calls)

    patched.petals_pending_calls = True
    ControlClient.__init__ = patched


_keep_reading_after_cancelled_calls()
