"""One inference step as it travels from a client to a server: a typed payload, encoded and decoded here only.

A ``Step`` carries the new tokens' hidden states and what they need besides (the padding mask and positions of
the new tokens, the deep prompts of the span) together with the session position it starts at, and, for push,
the servers' sessions its output goes on to (``next_hops``; ``pushed_on`` is the step the next one receives).
``to_message`` and ``from_message`` are the only code that knows how those become one message (``StepRequest``
metadata naming the tensors that follow the hidden states). New step fields are added here and nowhere else in the
protocol, as ``rewind`` was: the rollback point of speculative decoding (the step starts before the session's end,
and the server first drops what it cached from ``position`` on).

The padding arithmetic that client and server both need (a session's mask growing step by step, and the
positions it implies) lives here too, once. Shape and range checks against a server's limits are the server's
(``server/validation.py``); this module only refuses messages whose structure does not match their metadata.
"""

from __future__ import annotations

import dataclasses

import torch
from hivemind.proto import runtime_pb2

from petals_cli import transport
from petals_cli.errors import InvalidRequestError
from petals_cli.wire import StepRequest

EXTRA_NAMES = ("attention_mask", "position_ids")  # optional [batch, tokens] tensors after the hidden states
MAX_HOPS = 64  # servers a step may be pushed on to


@dataclasses.dataclass(frozen=True)
class Step:
    """New tokens for a session: ``hidden`` [batch, tokens, hidden] starting at session ``position``.

    ``attention_mask`` and ``position_ids`` [batch, tokens] cover the new tokens only (0 marks padding; a server
    remembers the mask for the session's later steps). ``prompts`` [blocks, prefix, hidden] are the deep prompts
    of the receiving span, sent only while the step reaches into the prefix. With ``rewind``, ``position`` may be
    before the session's end: the server first drops every position it cached from there on.
    """

    position: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    session_id: str = ""  # set on a step one server pushes to the next: the receiving session
    next_hops: tuple[tuple[str, str], ...] = ()  # (peer id, session id) of the servers the output goes on to
    rewind: bool = False  # ``position`` may be before the session's end (see above)

    def pushed_on(self, output: torch.Tensor) -> Step:
        """The step the next hop receives: this step's tokens, padding and rewind, ``output`` as hidden states."""
        (_, session_id), rest = self.next_hops[0], self.next_hops[1:]
        return dataclasses.replace(self, hidden=output, prompts=None, session_id=session_id, next_hops=rest)

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]

    def to_message(self) -> runtime_pb2.ExpertRequest:
        extras = {name: getattr(self, name) for name in EXTRA_NAMES if getattr(self, name) is not None}
        tensors = [self.hidden, *extras.values()]
        if self.prompts is not None:
            tensors.append(self.prompts)
        meta = StepRequest(
            position=self.position,
            extra_tensors=tuple(extras),
            prompts=self.prompts is not None,
            session_id=self.session_id,
            next_peers=tuple(peer for peer, _ in self.next_hops),
            next_sessions=tuple(session for _, session in self.next_hops),
            rewind=self.rewind,
        )
        return transport.step_request(tensors, transport.pack(meta))

    @classmethod
    def from_message(cls, message: runtime_pb2.ExpertRequest) -> Step:
        """Decode a step; a message whose tensors do not match its metadata is an ``InvalidRequestError``."""
        meta = StepRequest.from_wire(transport.unpack(message.metadata))
        names = meta.extra_tensors
        expected = 1 + len(names) + meta.prompts
        if len(message.tensors) != expected:
            raise InvalidRequestError(f"this step carries {expected} tensors, got {len(message.tensors)}")
        if len(set(names)) != len(names) or not set(names) <= set(EXTRA_NAMES):
            unexpected = next((name for name in names if name not in EXTRA_NAMES), names[0] if names else "")
            raise InvalidRequestError(f"unexpected extra tensor {unexpected[:64]!r} in an inference step")
        if len(meta.next_peers) != len(meta.next_sessions) or len(meta.next_peers) > MAX_HOPS:
            raise InvalidRequestError(f"next hops: as many sessions as peers, at most {MAX_HOPS}")
        tensors = [transport.deserialize(proto) for proto in message.tensors]
        extras = dict(zip(names, tensors[1 : 1 + len(names)], strict=True))
        return cls(
            position=meta.position,
            hidden=tensors[0],
            attention_mask=extras.get("attention_mask"),
            position_ids=extras.get("position_ids"),
            prompts=tensors[-1] if meta.prompts else None,
            session_id=meta.session_id,
            next_hops=tuple(zip(meta.next_peers, meta.next_sessions, strict=True)),
            rewind=meta.rewind,
        )


def extend_mask(
    earlier: torch.Tensor | None, cached: int, new: torch.Tensor | None, batch: int, tokens: int
) -> torch.Tensor | None:
    """A session's attention mask [batch, cached + tokens] after a step of ``tokens`` new tokens.

    ``earlier`` is the mask of the ``cached`` tokens before (None: none of them was padding), ``new`` the step's
    mask of its own tokens (None: no padding among them). None while the session has never had a mask.
    """
    if earlier is None and new is None:
        return None
    if earlier is None:
        earlier = torch.ones(batch, cached, dtype=new.dtype)
    if new is None:
        new = torch.ones(batch, tokens, dtype=earlier.dtype)
    return torch.cat([earlier, new.to(earlier.dtype)], dim=1)


def positions_from_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """Positions [batch, tokens] of the last ``tokens`` columns of ``mask``: each sequence counts only its own
    (unpadded) tokens, so a left-padded sequence starts at 0 after its padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - tokens :]
