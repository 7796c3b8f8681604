"""The attention-cache budget: how many token positions all sessions together may hold.

A session reserves ``batch_size * max_length`` tokens when it opens and returns them when it closes, so a
server never promises more cache than its budget. The caches themselves are transformers ``Cache``
objects owned by the handler; this module only counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from petals_cli.errors import CacheExhaustedError


@dataclass
class CacheBudget:
    total_tokens: int
    reserved: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_left(self) -> int:
        return self.total_tokens - sum(self.reserved.values())

    def reserve(self, session_id: str, tokens: int) -> None:
        if session_id in self.reserved:
            raise CacheExhaustedError(f"session {session_id[:8]} is already open on this server")
        if tokens > self.tokens_left:
            raise CacheExhaustedError(
                f"session needs {tokens} cache tokens, this server has {self.tokens_left} of {self.total_tokens} left"
            )
        self.reserved[session_id] = tokens

    def release(self, session_id: str) -> None:
        self.reserved.pop(session_id, None)
