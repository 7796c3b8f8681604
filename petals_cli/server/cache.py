"""The attention-cache budget: how many token positions all sessions together may hold.

A session reserves ``batch_size * max_length`` tokens when it opens and returns them when it closes, so a
server never promises more cache than its budget. When the budget is full, ``allocate`` waits a little for
other sessions to end before refusing with ``CacheExhaustedError``, so a client can fail over quickly.
The caches themselves are transformers ``Cache`` objects owned by server sessions; this module only counts.
Everything here runs on the server's event loop: no locks, no polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from petals_cli.errors import CacheExhaustedError


class CacheBudget:
    """Token reservations by session id, within ``total_tokens``; ``on_change`` is called after every change."""

    def __init__(self, total_tokens: int, *, on_change: Callable[[], None] | None = None):
        self.total_tokens = total_tokens
        self.reserved: dict[str, int] = {}
        self.on_change = on_change
        self._used = 0
        # Replaced on every release: waiters hold the old event, which wakes them all to re-check their fit.
        self._freed = asyncio.Event()

    @property
    def tokens_left(self) -> int:
        return self.total_tokens - self._used

    def reserve(self, session_id: str, tokens: int) -> None:
        """Reserve now or raise ``CacheExhaustedError``."""
        if session_id in self.reserved:
            raise CacheExhaustedError(f"session {session_id[:8]} is already open on this server")
        if tokens < 0:
            raise ValueError(f"cannot reserve {tokens} tokens")
        if tokens > self.tokens_left:
            raise CacheExhaustedError(
                f"session needs {tokens} cache tokens, this server has {self.tokens_left} of {self.total_tokens} left"
            )
        self.reserved[session_id] = tokens
        self._used += tokens
        self._changed()

    async def allocate(self, session_id: str, tokens: int, *, timeout: float) -> None:
        """Reserve, waiting up to ``timeout`` seconds for other sessions to free enough tokens.

        A request larger than the whole budget is refused at once: no amount of waiting makes it fit.
        Cancelled while waiting, it reserves nothing.
        """
        if tokens > self.total_tokens:
            raise CacheExhaustedError(
                f"session needs {tokens} cache tokens, more than this server's whole budget of {self.total_tokens}"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while tokens > self.tokens_left:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CacheExhaustedError(
                    f"session needs {tokens} cache tokens, this server has {self.tokens_left} of "
                    f"{self.total_tokens} left (waited {timeout:g}s for other sessions to end)"
                )
            try:
                async with asyncio.timeout(remaining):
                    await self._freed.wait()
            except TimeoutError:
                pass  # the loop condition decides: a release may have landed just as the timer fired
        self.reserve(session_id, tokens)

    def release(self, session_id: str) -> None:
        """Return a session's tokens (a no-op for unknown ids) and wake everyone waiting for space."""
        tokens = self.reserved.pop(session_id, None)
        if tokens is None:
            return
        self._used -= tokens
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
