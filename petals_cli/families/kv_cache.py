"""Attention caches that are written in place: a server session's keys and values never move.

transformers' ``DynamicLayer`` grows by ``torch.cat`` on every step, so each one-token step copies the whole
cache of every block into freshly allocated memory (on a CPU, fresh pages too: a quarter of a mid-size span's
step time went there). A session on a server knows its ``max_length`` up front and has it reserved in the
cache budget, so its full-attention layers can hold one buffer of that length and write each step's keys and
values into the next free positions; attention reads a view of the filled part. Masks, positions and
everything else see exactly what a ``DynamicLayer`` shows them, so outputs are identical.
Sliding-window and other special layers are left as transformers makes them.

``can_rewind`` and ``rewind`` take a session's cache back to an earlier length (speculative decoding), as if
the later positions had never been computed; only layers that still hold every position they need can.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


class SpanCache(DynamicCache):
    """A session's cache for the blocks ``[first, first + len(layers))`` of a server's span.

    The span's attention modules are shared by every session and keep their index within the whole span; this
    cache holds only its own blocks' layers and maps that index to them, so no module is re-indexed per call.
    Everything else (lengths, masks) asks by the cache's own layer order, as it does of any ``DynamicCache``.
    """

    def __init__(self, config, *, first: int = 0):
        super().__init__(config=config)
        self.first = first

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.first, *args, **kwargs)


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers of ``capacity`` positions, filled in place.

    Its keys/values always have the shapes a ``DynamicLayer`` would hold, so the inherited length, crop and
    reset work unchanged. A step that would pass the buffers' end grows them (doubling), so the layer is never
    wrong, only slower, when a caller underestimates.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(int(capacity), 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self._rebuffer(self.capacity)
        self.is_initialized = True

    def _rebuffer(self, positions: int) -> None:
        """Move the keys and values into fresh buffers of ``positions`` positions; they become views of them."""
        length = self.keys.shape[-2]
        buffers = []
        for states in (self.keys, self.values):
            buffer = states.new_empty(*states.shape[:-2], positions, states.shape[-1])
            buffer[..., :length, :].copy_(states)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers
        self.keys, self.values = (buffer[..., :length, :] for buffer in buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[:-2] != self.keys.shape[:-2]:
            held, sent = tuple(self.keys.shape[:-2]), tuple(key_states.shape[:-2])
            raise ValueError(f"cache holds batch/heads {held}, step has {sent}")
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._rebuffer(max(end, 2 * self._key_buffer.shape[-2]))
        self._key_buffer[..., start:end, :].copy_(key_states)
        self._value_buffer[..., start:end, :].copy_(value_states)
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values

    # Batch operations build new keys/values outside the buffers: move them back in.

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._readopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._readopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._readopt()

    def _readopt(self) -> None:
        if self.is_initialized:
            self._rebuffer(max(self.capacity, self.keys.shape[-2]))


def can_rewind(cache, length: int) -> bool:
    """Whether ``rewind(cache, length)`` leaves ``cache`` exactly as if it had only ever seen ``length`` positions.

    Full-attention layers keep every position (a ``PreallocatedLayer`` only forgets its tail); a sliding-window layer
    can while it has dropped nothing yet. Other layers (recurrent states, quantised, indexed) cannot.
    """
    if not isinstance(cache, DynamicCache) or not cache.layers or not 0 <= length <= cache.get_seq_length():
        return False
    return all(_layer_can_rewind(layer) for layer in cache.layers)


def _layer_can_rewind(layer) -> bool:
    if type(layer) in (DynamicLayer, PreallocatedLayer):
        return True
    # the layer keeps its last ``sliding_window - 1`` positions: from ``sliding_window`` on, one is gone
    return type(layer) is DynamicSlidingWindowLayer and layer.get_seq_length() < layer.sliding_window


def rewind(cache, length: int) -> None:
    """Drop every position of ``cache`` from ``length`` on (checked with ``can_rewind`` first); buffers keep their
    capacity, and the next update writes after ``length``."""
    for layer in cache.layers:
        surplus = layer.get_seq_length() - length
        if surplus > 0:
            layer.crop(-surplus)  # a negative crop removes that many positions, in every transformers 5


def preallocate(cache, capacity: int):
    """Replace a fresh ``cache``'s plain full-attention layers by ``PreallocatedLayer``s of ``capacity`` positions."""
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class StackedCache:
    """Several sessions' caches seen as one, for a batched one-token step of the same blocks.

    Rows ``[row, row + b)`` of the batch belong to the session whose cache is listed there. ``update`` writes each
    session's new keys and values into its own cache (in place) and returns everyone's keys and values stacked
    and right-padded to the longest; the caller's 4D mask hides the padding. Duck-typed: the attention modules
    only call ``update`` when they are given a ready 4D mask and explicit positions.
    """

    def __init__(self, caches: list, rows: list[int]):
        self.caches, self.rows = caches, rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(cache.get_seq_length(layer_idx) for cache in self.caches)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values, row = [], [], 0
        for cache, count in zip(self.caches, self.rows, strict=True):
            layer = cache.layers[layer_idx - cache.first]
            key, value = layer.update(key_states[row : row + count], value_states[row : row + count])
            keys.append(key)
            values.append(value)
            row += count
        longest = max(key.shape[-2] for key in keys)
        stacked = []
        for parts in (keys, values):
            out = parts[0].new_zeros(row, *parts[0].shape[1:-2], longest, parts[0].shape[-1])
            start = 0
            for part in parts:
                out[start : start + part.shape[0], ..., : part.shape[-2], :] = part
                start += part.shape[0]
            stacked.append(out)
        return stacked[0], stacked[1]


def batchable(cache) -> bool:
    """Whether a session cache can join a batched step: every layer is a plain full-attention one."""
    return bool(cache.layers) and all(type(layer) is PreallocatedLayer for layer in cache.layers)
