"""What a server checks before it computes anything, and the limits it enforces per request, session and peer.

Pure functions over decoded wire records and tensors, plus ``PeerSessions`` (a counter the session registry owns).
Every failed check raises a typed error naming the problem (``InvalidRequestError`` and its subclasses,
``PeerLimitError``); the handler turns it into an error response for that request only. Nothing here
touches the network, the cache or the compute thread.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import torch

from petals_cli.errors import BlocksNotHeldError, InvalidRequestError, PeerLimitError, RequestTooLargeError
from petals_cli.step import Step
from petals_cli.wire import SpanRequest

MAX_BATCH_SIZE = 1024
MAX_PREFIX_LENGTH = 256
MAX_LORA_RANK = 64
MAX_LORA_TARGETS = 16
MAX_LORA_TARGET_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class Limits:
    """A server's limits (``petals serve`` options); the defaults keep a small machine alive."""

    max_session_length: int = 8192  # tokens one session may ask for
    max_batch_size: int = MAX_BATCH_SIZE
    max_request_bytes: int = 64 * 2**20  # tensor bytes in one request or inference step
    max_sessions_per_peer: int = 16  # open inference sessions of one peer id
    step_timeout: float = 60.0  # seconds one step or forward/backward may compute
    max_kept_graph_bytes: int = 512 * 2**20  # activations kept from training forwards for their backwards


def check_span_request(data: Any, prefix: str, held: tuple[int, int]) -> SpanRequest:
    """Decode an RPC's opening metadata and check it names blocks of ``prefix`` this server holds."""
    request = SpanRequest.from_wire(data)
    request.check_protocol()
    if len(request.prefix) > MAX_PREFIX_LENGTH or request.prefix != prefix:
        raise InvalidRequestError(f"this server hosts {prefix!r}, not {request.prefix[:MAX_PREFIX_LENGTH]!r}")
    start, end = held
    if not 0 <= request.start_block < request.end_block:
        raise InvalidRequestError(f"blocks {request.start_block}:{request.end_block} are not a range of blocks")
    if not start <= request.start_block < request.end_block <= end:
        raise BlocksNotHeldError(
            f"blocks {request.start_block}:{request.end_block} are not within this server's {start}:{end}"
        )
    check_lora_request(request)
    return request


def check_lora_request(request: SpanRequest) -> None:
    """The LoRA a client announces it sends (``lora_targets``): a rank, a few distinct targets, a finite scale, and
    no served adapter besides. Whether the targets exist is the span's to say (``adapters.request_lora``)."""
    targets = request.lora_targets
    if not targets:
        return
    if request.adapter:
        raise InvalidRequestError("a request may use a served adapter or send its own LoRA weights, not both")
    if not 1 <= request.lora_rank <= MAX_LORA_RANK:
        raise InvalidRequestError(f"lora_rank must be in 1..{MAX_LORA_RANK}, got {request.lora_rank}")
    if len(targets) > MAX_LORA_TARGETS:
        raise InvalidRequestError(f"at most {MAX_LORA_TARGETS} lora_targets, got {len(targets)}")
    if any(len(target) > MAX_LORA_TARGET_LENGTH for target in targets):
        raise InvalidRequestError(f"lora_targets may be at most {MAX_LORA_TARGET_LENGTH} characters long")
    if len(set(targets)) != len(targets):
        duplicate = next(target for target in targets if targets.count(target) > 1)
        raise InvalidRequestError(f"lora_targets names {duplicate[:64]!r} twice")
    if not math.isfinite(request.lora_scaling):
        raise InvalidRequestError(f"lora_scaling must be finite, got {request.lora_scaling}")


def lora_tensor_count(request: SpanRequest) -> int:
    """How many LoRA tensors follow a request's other tensors: A and B per block and target."""
    return 2 * (request.end_block - request.start_block) * len(request.lora_targets)


def check_lora_tensors(tensors: list[torch.Tensor], expected: list[tuple[str, tuple[int, ...]]]) -> None:
    """Sent LoRA tensors against the ``(name, shape)`` each must have, in order: floating point, finite."""
    if len(tensors) != len(expected):
        raise InvalidRequestError(f"expected {len(expected)} LoRA tensors, got {len(tensors)}")
    for tensor, (name, shape) in zip(tensors, expected, strict=True):
        if tuple(tensor.shape) != shape:
            raise InvalidRequestError(f"LoRA {name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if not tensor.is_floating_point():
            raise InvalidRequestError(f"LoRA {name} must be floating point, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidRequestError(f"LoRA {name} contains NaN or infinite values")


def check_session_size(request: SpanRequest, limits: Limits) -> int:
    """The cache tokens a session asks for, after checking its length and batch against the hard limits."""
    if not 0 < request.max_length <= limits.max_session_length:
        raise InvalidRequestError(f"max_length must be in 1..{limits.max_session_length}, got {request.max_length}")
    if not 0 < request.batch_size <= limits.max_batch_size:
        raise InvalidRequestError(f"batch_size must be in 1..{limits.max_batch_size}, got {request.batch_size}")
    return request.batch_size * request.max_length


def check_hidden(
    tensor: torch.Tensor, hidden_size: int, batch_size: int | None = None, *, name: str = "hidden states"
) -> torch.Tensor:
    """A [batch, tokens, hidden] floating-point tensor of finite values (and the session's batch size)."""
    if tensor.ndim != 3 or tensor.shape[-1] != hidden_size or 0 in tensor.shape:
        raise InvalidRequestError(f"{name} must be [batch, tokens, {hidden_size}], got {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise InvalidRequestError(f"{name} must be floating point, got {tensor.dtype}")
    if batch_size is not None and tensor.shape[0] != batch_size:
        raise InvalidRequestError(f"session batch size is {batch_size}, got {tensor.shape[0]}")
    if tensor.shape[0] > MAX_BATCH_SIZE:
        raise InvalidRequestError(f"batch of {tensor.shape[0]} is larger than {MAX_BATCH_SIZE}")
    if not torch.isfinite(tensor).all():
        raise InvalidRequestError(f"{name} contain NaN or infinite values")
    return tensor


def check_message_size(message: Any, limits: Limits) -> int:
    """The bytes of one stream message (an inference step), counted before decoding, within ``max_request_bytes``."""
    size = len(message.metadata) + sum(len(part.buffer) for part in message.tensors)
    if size > limits.max_request_bytes:
        raise RequestTooLargeError(f"a step of {size} bytes exceeds this server's limit of {limits.max_request_bytes}")
    return size


class PeerSessions:
    """Open inference sessions per peer id, capped at ``limit`` so one peer cannot take the whole server."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Counter[str] = Counter()

    def acquire(self, peer: str) -> None:
        if self.open[peer] >= self.limit:
            raise PeerLimitError(
                f"peer {peer[-8:]} already has {self.open[peer]} sessions open here (limit {self.limit})"
            )
        self.open[peer] += 1

    def release(self, peer: str) -> None:
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]


def check_step(step: Step, request: SpanRequest, hidden_size: int, limits: Limits) -> Step:
    """A decoded step's tensors checked against its session: hidden states [session batch, tokens, hidden];
    a 0/1 ``attention_mask`` and ``position_ids`` within the session's length, each [batch, tokens] like the hidden
    states (returned as int64); deep prompts [session's blocks, prefix, hidden]."""
    hidden = check_hidden(step.hidden, hidden_size, request.batch_size)
    shape = tuple(hidden.shape[:2])
    mask, positions = step.attention_mask, step.position_ids
    if mask is not None:
        mask = _check_integers("attention_mask", mask, shape)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InvalidRequestError("attention_mask values must be 0 or 1")
    if positions is not None:
        positions = _check_integers("position_ids", positions, shape)
        if not bool(((positions >= 0) & (positions < request.max_length)).all()):
            raise InvalidRequestError(f"position_ids must be in 0..{request.max_length - 1}")
    prompts = None if step.prompts is None else check_prompts(step.prompts, request, hidden_size, limits)
    return dataclasses.replace(step, attention_mask=mask, position_ids=positions, prompts=prompts)


def _check_integers(name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise InvalidRequestError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex():
        raise InvalidRequestError(f"{name} must be integer or bool, got {tensor.dtype}")
    return tensor.long()


def check_prompts(tensor: torch.Tensor, request: SpanRequest, hidden_size: int, limits: Limits) -> torch.Tensor:
    """Deep prompts for the request's blocks: [blocks, prefix, hidden], finite floating point."""
    blocks = request.end_block - request.start_block
    if tensor.ndim != 3 or tensor.shape[0] != blocks or tensor.shape[2] != hidden_size or 0 in tensor.shape:
        raise InvalidRequestError(f"prompts must be [{blocks}, prefix, {hidden_size}], got {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise InvalidRequestError(f"prompts must be floating point, got {tensor.dtype}")
    if tensor.shape[1] > limits.max_session_length:
        raise InvalidRequestError(f"prompts may be at most {limits.max_session_length} positions long")
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidRequestError("prompts contain NaN or infinite values")
    return tensor
