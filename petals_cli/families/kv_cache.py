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
    """A ``DynamicLayer`` whose keys and values live in buffers of ``capacity`` positions, filled in place.

    A step that would pass ``capacity`` grows the buffers (doubling), so the layer is never wrong, only
    slower, when a caller underestimates.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(int(capacity), 1)
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_buffer = self._empty_like(key_states, self.capacity)
        self._value_buffer = self._empty_like(value_states, self.capacity)
        self.length = 0
        self._publish()
        self.is_initialized = True

    @staticmethod
    def _empty_like(states: torch.Tensor, positions: int) -> torch.Tensor:
        *leading, _, last = states.shape
        return torch.empty(*leading, positions, last, dtype=states.dtype, device=states.device)

    def _publish(self) -> None:
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if key_states.shape[:-2] != self._key_buffer.shape[:-2]:
            held, sent = tuple(self._key_buffer.shape[:-2]), tuple(key_states.shape[:-2])
            raise ValueError(f"cache holds batch/heads {held}, step has {sent}")
        if self.length + new > self._key_buffer.shape[-2]:
            self._grow(self.length + new)
        end = self.length + new
        self._key_buffer[..., self.length : end, :].copy_(key_states)
        self._value_buffer[..., self.length : end, :].copy_(value_states)
        self.length = end
        self._publish()
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        positions = max(needed, 2 * self._key_buffer.shape[-2])
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            bigger = self._empty_like(old, positions)
            bigger[..., : self.length, :].copy_(old[..., : self.length, :])
            setattr(self, name, bigger)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._publish()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the (negative) number of tokens to remove")
        if self.is_initialized:
            self.length = max(self.length + tokens_to_remove, 0)
            self._publish()

    def _adopt(self) -> None:
        """Copy keys/values that a batch operation replaced back into buffers of this layer's capacity."""
        keys, values, self.length = self.keys, self.values, self.keys.shape[-2]
        self._key_buffer = self._empty_like(keys, max(self.capacity, self.length))
        self._value_buffer = self._empty_like(values, max(self.capacity, self.length))
        self._key_buffer[..., : self.length, :].copy_(keys)
        self._value_buffer[..., : self.length, :].copy_(values)
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            super().reorder_cache(beam_idx)
            self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            super().batch_repeat_interleave(repeats)
            self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            super().batch_select_indices(indices)
            self._adopt()


def preallocate(cache, capacity: int):
    """Replace ``cache``'s plain full-attention layers by ``PreallocatedLayer``s of ``capacity`` positions."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[index] = PreallocatedLayer(capacity)
    return cache
