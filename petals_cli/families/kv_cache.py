"""Attention caches that are written in place: a server session's keys and values never move.

transformers' ``DynamicLayer`` grows by ``torch.cat`` on every step, so each one-token step copies the whole
cache of every block into freshly allocated memory (on a CPU, fresh pages too: a quarter of a mid-size span's
step time went there). A session on a server knows its ``max_length`` up front and has it reserved in the
cache budget, so its full-attention layers can hold one buffer of that length and write each step's keys and
values into the next free positions; attention reads a view of the filled part. Masks, positions and
everything else see exactly what a ``DynamicLayer`` shows them, so outputs are identical.
Sliding-window and other special layers are left as transformers makes them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


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


def preallocate(cache, capacity: int):
    """Replace a fresh ``cache``'s plain full-attention layers by ``PreallocatedLayer``s of ``capacity`` positions."""
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
