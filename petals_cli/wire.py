"""The language client and server share: protocol version, block uids, DHT records and RPC metadata.

Each record is a frozen dataclass with ``to_wire()`` (a msgpack-friendly dict) and ``from_wire()``.
``from_wire`` tolerates unknown fields (newer peers may add some) but raises ``InvalidRequestError`` on a
missing required field or a field of the wrong type: nothing that arrives over the network is trusted. Strings,
lists and mappings are bounded too (``MAX_TEXT``, ``MAX_ITEMS``), so a record a peer crafted cannot make every
reader hold or print megabytes; what is shown of them is made safe by ``textsafe.shown``.
``SwarmSnapshot`` is what the DHT says about one model, the input of the pure routing functions.
This module knows nothing about torch, sessions or servers.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from typing import Any, ClassVar

from petals_cli.errors import InvalidRequestError, ProtocolMismatchError

PROTOCOL_VERSION = 1
MODEL_INDEX_KEY = "_petals.models"
_PREFIX_PATTERN = re.compile(r"[^A-Za-z0-9_-]+")
MAX_TEXT = 4096  # characters of any string field (model paths, names, error messages are far shorter)
MAX_ITEMS = 4096  # entries of any list or mapping field


def model_prefix_for(model: str) -> str:
    """The DHT namespace of a model: the last component of its path or repo id, sanitised."""
    name = model.rstrip("/").split("/")[-1] or "model"
    return _PREFIX_PATTERN.sub("-", name)


def block_uid(prefix: str, index: int) -> str:
    return f"{prefix}.{index}"


def servers_key(prefix: str) -> str:
    """The DHT key where every server of a model keeps its one record (subkey: its peer id). Not a block uid:
    block indices are numbers, this suffix is not."""
    return f"{prefix}.servers"


class ServerState(enum.IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


_Record = typing.TypeVar("_Record", bound="WireRecord")


class WireRecord:
    """Mixin for frozen dataclasses: strict decoding, lenient about unknown fields."""

    wire_name: ClassVar[str] = "record"

    def to_wire(self) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    @classmethod
    def from_wire(cls: type[_Record], data: Any) -> _Record:
        if not isinstance(data, dict):
            raise InvalidRequestError(f"{cls.wire_name}: expected a mapping, got {type(data).__name__}")
        values = {}
        for name, hint, required in _fields_of(cls):
            if name not in data:
                if required:
                    raise InvalidRequestError(f"{cls.wire_name}: missing field {name!r}")
                continue
            values[name] = _decode_value(cls.wire_name, name, hint, data[name])
        return cls(**values)


@functools.cache
def _fields_of(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type hint, required) of a record's fields; resolving hints is slow, and every step decodes one."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            field.name,
            hints[field.name],
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING,
        )
        for field in dataclasses.fields(cls)
    )


def _decode_value(record: str, name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise InvalidRequestError(f"{record}: bad value {value!r} for {name!r}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidRequestError(f"{record}: field {name!r} must be a list")
        _check_size(record, name, value, MAX_ITEMS, "items")
        return tuple(_decode_value(record, name, args[0], item) for item in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{record}: field {name!r} must be a mapping")
        _check_size(record, name, value, MAX_ITEMS, "items")
        return dict(value)
    expected = (int, float) if hint is float else hint
    if hint is int and isinstance(value, bool) or not isinstance(value, expected):
        raise InvalidRequestError(f"{record}: field {name!r} must be {hint.__name__}, got {type(value).__name__}")
    if isinstance(value, str):
        _check_size(record, name, value, MAX_TEXT, "characters")
    return float(value) if hint is float else value


def _check_size(record: str, name: str, value, limit: int, unit: str) -> None:
    if len(value) > limit:
        raise InvalidRequestError(f"{record}: field {name!r} holds {len(value)} {unit}, at most {limit} are allowed")


@dataclasses.dataclass(frozen=True)
class ServerInfo(WireRecord):
    """What a server announces for each block it holds (DHT value under the block uid, subkey = peer id)."""

    wire_name: ClassVar[str] = "ServerInfo"

    state: ServerState
    start_block: int
    end_block: int
    version: str
    protocol: int = PROTOCOL_VERSION
    dtype: str = "float32"
    quantization: str = "none"
    cache_tokens_left: int = 0
    public_name: str = ""
    throughput: float = 0.0
    inference_rps: float = 0.0
    forward_rps: float = 0.0
    adapters: tuple[str, ...] = ()
    pings: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 0  # sessions in the step engine's last step (1 alone, more when batched)
    queue_length: int = 0  # steps waiting for the compute thread
    largest_batch: int = 0  # the most sessions one step has run together since the server started
    compute_stalled: bool = False  # its compute thread is hung (far slower than its speed allows): do not use it
    # live load (announced, and fresher in every rpc_info answer; 0 from servers older than these fields):
    sessions: int = 0  # inference sessions open
    step_seconds: float = 0.0  # recent seconds per batched one-token step through its whole span (moving average)
    batch_capacity: int = 0  # the most sessions one batched step runs together
    # placement (0 / empty from older servers):
    claimed_at: float = 0.0  # DHT time at which a server placed automatically first claimed blocks (while JOINING)
    moving_to: tuple[int, ...] = ()  # (start, end) while it loads the span it is moving to; it still serves its own
    # sessions per peer (0 from older servers): the cap, and in an rpc_info answer, how many the asking peer holds
    sessions_per_peer: int = 0  # the most inference sessions one peer may hold open at once
    your_sessions: int = 0  # only in an answer to the peer asking; 0 in DHT records
    # a server behind a NAT: the circuit addresses it is dialled through (empty when it is dialled directly)
    relay_addresses: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelIndexEntry(WireRecord):
    """One model served in the swarm (DHT value under MODEL_INDEX_KEY, subkey "prefix:peer_id")."""

    wire_name: ClassVar[str] = "ModelIndexEntry"

    model: str
    num_blocks: int
    family: str
    protocol: int = PROTOCOL_VERSION


@dataclasses.dataclass(frozen=True)
class SpanRequest(WireRecord):
    """Metadata of the first message of every RPC: which blocks to run, under which protocol."""

    wire_name: ClassVar[str] = "SpanRequest"

    protocol: int
    prefix: str
    start_block: int
    end_block: int
    max_length: int = 0
    batch_size: int = 1
    prompts: bool = False  # forward/backward: deep prompts follow the other tensors (see SpanRunner.forward)
    adapter: str = ""  # run with this LoRA adapter, which the server must announce
    graph_id: str = ""  # forward: keep the autograd graph for the backward with this id (server/graphs.py)
    session_id: str = ""  # inference: the id the client chose for this session (pushes address it), 32 hex digits
    # client-sent LoRA (training through frozen blocks): module paths inside one block, as peft names them; for each
    # block of the span and each target, A [rank, in] and B [out, rank] follow all other tensors of the request (an
    # inference session's opening message carries them for all its steps); gradients come back in the same order
    lora_targets: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_scaling: float = 0.0  # peft's lora_alpha / r

    def check_protocol(self) -> None:
        if self.protocol != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"client speaks protocol {self.protocol}, this server speaks {PROTOCOL_VERSION}"
            )


@dataclasses.dataclass(frozen=True)
class StepRequest(WireRecord):
    """Metadata of one inference step: where its tokens start in the session, and what its tensors are.

    The first tensor is always the hidden states [batch, tokens, hidden]; ``extra_tensors`` names the ones
    after it, in order: ``attention_mask`` [batch, tokens] (0 marks padding; the server remembers it for the
    session's later steps) and ``position_ids`` [batch, tokens].
    """

    wire_name: ClassVar[str] = "StepRequest"

    position: int
    extra_tensors: tuple[str, ...] = ()
    prompts: bool = False  # deep prompts for the span follow all other tensors (only steps inside the prefix)
    session_id: str = ""  # a step pushed by another server: the receiving server's session it is for
    next_peers: tuple[str, ...] = ()  # push the output on to these servers' sessions, in order
    next_sessions: tuple[str, ...] = ()
    # the step starts at ``position``, which may be before the session's end: the server first drops every cached
    # position from there on (speculative decoding takes back the tokens it guessed wrong); older servers ignore it
    # and refuse the step for its position
    rewind: bool = False


@dataclasses.dataclass(frozen=True)
class StepResponse(WireRecord):
    """Metadata of a server's answer: the session position after the step, or an error."""

    wire_name: ClassVar[str] = "StepResponse"

    position: int = 0
    error_code: str = ""
    error_message: str = ""
    session_id: str = ""  # in a session's acknowledgement: where other servers push its steps
    pushed: bool = False  # the output also went on to the next server's session
    lora: bool = False  # in a session's acknowledgement: the LoRA weights its client sent apply to its steps


@dataclasses.dataclass(frozen=True)
class SwarmSnapshot:
    """Every server announcing blocks of one model, as read at ``taken_at`` (DHT time)."""

    prefix: str
    num_blocks: int
    servers: dict[str, ServerInfo] = dataclasses.field(default_factory=dict)  # peer id (base58) -> its record
    taken_at: float = 0.0
    expires: dict[str, float] = dataclasses.field(default_factory=dict)  # peer id -> DHT time its record expires

    def merged_with(self, older: SwarmSnapshot | None, now: float) -> SwarmSnapshot:
        """This read, plus the servers of an ``older`` one that this read missed and whose records had not expired
        by ``now`` (DHT time): a record stands until it expires, and a lookup that timed out on a busy node, or
        reached only nodes that missed some stores, takes nobody out of the swarm. Servers that left said so in a
        newer record (OFFLINE, found by this read), and a killed one answers no ping."""
        if older is None:
            return self
        kept = {
            peer: info
            for peer, info in older.servers.items()
            if peer not in self.servers and older.expires.get(peer, float("-inf")) > now
        }
        if not kept:
            return self
        expires = {**{peer: older.expires[peer] for peer in kept}, **self.expires}
        return dataclasses.replace(self, servers={**kept, **self.servers}, expires=expires)

    def online(self) -> dict[str, ServerInfo]:
        return {peer: info for peer, info in self.servers.items() if info.state == ServerState.ONLINE}

    def without(self, peers: set[str] | frozenset[str]) -> SwarmSnapshot:
        """The same snapshot less ``peers`` (servers that announced but do not answer)."""
        kept = {peer: info for peer, info in self.servers.items() if peer not in peers}
        return dataclasses.replace(self, servers=kept)

    def block_coverage(self) -> list[int]:
        """How many online servers hold each block."""
        counts = [0] * self.num_blocks
        for info in self.online().values():
            for index in range(max(info.start_block, 0), min(info.end_block, self.num_blocks)):
                counts[index] += 1
        return counts
