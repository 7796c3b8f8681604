"""The generic family adapter: where a family's blocks live and which modules the client keeps.

A server's span is transformers' own base model class (``LlamaModel``, ``BloomModel``, ...) built for the
span's layer count, with the client-side modules (embeddings, embedding norm, final norm) replaced by
identities. Running it reuses transformers' masks, rotary embeddings, ALiBi and cache handling, so a family
costs a few names here instead of a re-implementation. Modules are built on the meta device and filled
with ``assign=True``, so nothing is allocated twice. This module knows nothing about the network.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from petals_cli import compat
from petals_cli.errors import BlocksNotHeldError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """Names that locate a family's parts in its transformers model and checkpoint."""

    name: str
    model_types: tuple[str, ...]
    block_prefix: str  # full-model path of the decoder layers, e.g. "model.layers"
    embedding_modules: tuple[str, ...]  # applied in order on the client before the first block
    final_norm: str  # full-model path of the norm after the last block
    lm_head: str = "lm_head"
    # Reads a span's block tensors when checkpoints name them unlike the modules do (e.g. Mixtral's per-expert
    # tensors, fused in transformers 5): ``(load, wanted, config) -> {module name: tensor}``; None reads as named.
    read_blocks: Callable[[Callable, dict[str, str], object], dict] | None = None

    @property
    def layers_attr(self) -> str:
        return self.block_prefix.split(".")[-1]

    def block_of(self, tensor_name: str) -> int | None:
        """The block index of a checkpoint tensor (with or without the base prefix), or None."""
        for prefix in (self.block_prefix, self.layers_attr):
            if tensor_name.startswith(f"{prefix}."):
                return int(tensor_name[len(prefix) + 1 :].split(".", 1)[0])
        return None

    def local_module_paths(self) -> tuple[str, ...]:
        return (*self.embedding_modules, self.final_norm, self.lm_head)


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def span_config(config, num_layers: int, first_layer: int = 0):
    """A copy of the config for ``num_layers`` blocks starting at ``first_layer`` (per-layer lists sliced)."""
    config = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = num_layers
    if layer_types is not None:
        config.layer_types = list(layer_types)[first_layer : first_layer + num_layers]
    return config


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def materialize(module: nn.Module, tensors: dict, config, device: str, dtype: torch.dtype) -> None:
    """Fill a meta-device module with checkpoint tensors; rebuild modules whose buffers are computed at init."""
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise UnsupportedModelError(f"checkpoint tensors with no place in the model: {sorted(unexpected)[:4]}")
    still_meta = [name for name, param in module.named_parameters() if param.is_meta]
    if still_meta:
        raise UnsupportedModelError(f"checkpoint lacks tensors: {still_meta[:4]}")
    computed = []  # (module, buffer name, tensor) of rebuilt modules: they keep the dtype they were computed in
    for path, sub in list(module.named_modules()):
        if any(buffer.is_meta for buffer in sub.buffers(recurse=False)):
            rebuilt = _rebuild_buffers_module(sub, config)
            if rebuilt is None:
                _init_buffers(module, sub, device)
            else:
                set_module(module, path, rebuilt)
                computed += [(rebuilt, name, buffer) for name, buffer in rebuilt.named_buffers(recurse=False)]
    module.to(device=device, dtype=dtype)
    # as in transformers, rotary frequencies stay float32 in a bfloat16 model (rounded, they shift every angle)
    for owner, name, buffer in computed:
        setattr(owner, name, buffer.to(device))
    module.requires_grad_(False)


def _rebuild_buffers_module(module: nn.Module, config) -> nn.Module | None:
    # Rotary embeddings and the like compute their buffers from the config in __init__ (on the CPU; moved with the
    # rest below). Their ``device`` argument is deprecated from transformers 5.17 and gone later, so it is not used.
    try:
        return type(module)(config=config)
    except TypeError:
        return None


def _init_buffers(root: nn.Module, module: nn.Module, device: str) -> None:
    """Compute buffers that come from constructor arguments (e.g. Gemma's embedding scale) as transformers does.

    transformers' ``_init_weights`` sets such buffers after loading; its init functions skip tensors flagged
    ``_is_hf_initialized``, which is how ``from_pretrained`` keeps loaded weights too.
    """
    init_weights = getattr(root, "_init_weights", None)
    if init_weights is None:
        raise UnsupportedModelError(f"cannot rebuild {type(module).__name__} outside the meta device")
    filled = []
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.is_meta and buffer.is_floating_point():
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, torch.full_like(buffer, torch.nan, device=device), persistent=persistent)
            filled.append(name)
    for parameter in module.parameters(recurse=False):
        parameter._is_hf_initialized = True
    with torch.no_grad(), _guarded_torch_init():
        init_weights(module)
    buffers = dict(module.named_buffers(recurse=False))
    if any(buffer.is_meta for buffer in buffers.values()) or any(buffers[name].isnan().any() for name in filled):
        raise UnsupportedModelError(f"cannot rebuild {type(module).__name__} outside the meta device")


def _guarded_torch_init():
    # Makes plain torch.nn.init calls inside _init_weights respect _is_hf_initialized too.
    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError:
        return contextlib.nullcontext()
    return guard_torch_init_functions()


class SpanRunner(nn.Module):
    """A server's blocks [start, end) of one model, runnable over any sub-range with a transformers cache."""

    def __init__(self, family: Family, base: nn.Module, config, start: int, end: int):
        super().__init__()
        self.family, self.base, self.config = family, base, config
        self.start, self.end = start, end
        self._views: dict[tuple[int, int], nn.Module] = {}
        # BLOOM-style models place tokens by the attention mask alone (ALiBi)
        self._takes_position_ids = "position_ids" in inspect.signature(base.forward).parameters

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.base, self.family.layers_attr)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: that of the first floating-point parameter (quantised weights are not)."""
        return next(param.dtype for param in self.base.parameters() if param.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def make_cache(self, start: int, end: int, capacity: int | None = None):
        """A fresh attention cache for blocks [start, end) (absolute indices).

        With ``capacity`` (the session's max tokens), full-attention layers keep their keys and values in
        buffers of that length written in place, instead of growing by concatenation every step.
        """
        from petals_cli.families.kv_cache import SpanCache, preallocate

        first = self._relative(start, end)[0]
        cache = SpanCache(self._view(first, end - self.start).config, first=first)
        return cache if capacity is None else preallocate(cache, capacity)

    def forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache=None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (absolute indices) on hidden states; extend ``cache`` when given.

        ``attention_mask`` [batch, cached + new tokens] marks padding with 0 (padded batches); ``position_ids``
        [batch, new tokens] then gives each token's position within its own sequence.
        ``prompts`` (deep prompt tuning), shaped [end - start, prefix, hidden]: before block ``start + i``,
        ``prompts[i]`` is added to the first ``prefix`` positions of every sequence in the batch.
        """
        first, last = self._relative(start, end)
        view = self._view(first, last)
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if position_ids is not None and self._takes_position_ids:
                kwargs["position_ids"] = position_ids
        inputs = dict(
            inputs_embeds=hidden.to(self.dtype), use_cache=cache is not None, **compat.cache_kwargs(view, cache)
        )
        if prompts is None:  # the hot path: no hooks at all
            output = view(**inputs, **kwargs)
        else:
            with self._adding_prompts(first, last, prompts):
                output = view(**inputs, **kwargs)
        return output[0].to(hidden.dtype)

    # Model types whose blocks take explicit positions and a ready 4D mask in the standard way (rotary, no ALiBi, no
    # soft-capping): their one-token steps of different sessions may run as one batch.
    BATCHABLE_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma"})

    def can_batch(self, cache) -> bool:
        from petals_cli.families.kv_cache import batchable

        model_type = getattr(self.base.config, "model_type", "")
        return model_type in self.BATCHABLE_MODEL_TYPES and self._takes_position_ids and batchable(cache)

    def forward_batched(
        self,
        hiddens: list[torch.Tensor],
        start: int,
        end: int,
        caches: list,
        attention_masks: list[torch.Tensor | None],
        position_ids: list[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        """One-token steps of several sessions over blocks [start, end), run as one batch; each session's output
        is what ``forward`` would give it alone (up to float rounding of the batched matrix products).

        ``hiddens[i]`` is [b_i, 1, hidden]; ``attention_masks[i]`` [b_i, cached + 1] or None (no padding);
        ``position_ids[i]`` [b_i, 1] or None (the next position)."""
        from petals_cli.families.kv_cache import StackedCache

        first, last = self._relative(start, end)
        view = self._view(first, last)
        lengths = [cache.get_seq_length() + 1 for cache in caches]  # after this step
        longest = max(lengths)
        rows = [hidden.shape[0] for hidden in hiddens]
        allowed = torch.zeros(sum(rows), longest, dtype=torch.bool)
        positions, row = [], 0
        for hidden, length, mask, given in zip(hiddens, lengths, attention_masks, position_ids, strict=True):
            count = hidden.shape[0]
            allowed[row : row + count, :length] = True if mask is None else mask[:, :length].bool()
            positions.append(torch.full((count, 1), length - 1) if given is None else given.long())
            row += count
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        device = self.device
        inputs = dict(
            inputs_embeds=torch.cat(hiddens).to(device=device, dtype=self.dtype),
            attention_mask=mask[:, None, None, :].to(device),
            position_ids=torch.cat(positions).to(device),
            use_cache=True,
            **compat.cache_kwargs(view, StackedCache(caches, rows)),
        )
        output = view(**inputs)[0]
        return [part.to(hidden.dtype) for part, hidden in zip(output.split(rows), hiddens, strict=True)]

    @contextlib.contextmanager
    def _adding_prompts(self, first: int, last: int, prompts: torch.Tensor):
        prompts = prompts.to(self.dtype)
        handles = [
            layer.register_forward_pre_hook(_prompt_adder(prompts[offset]), with_kwargs=True)
            for offset, layer in enumerate(list(self.layers)[first:last])
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _relative(self, start: int, end: int) -> tuple[int, int]:
        """Blocks [start, end) as indices into this span's layers; blocks it does not hold are an error (a request
        checked against the blocks a server held before it moved), never a shorter slice of the layers."""
        if not self.start <= start < end <= self.end:
            raise BlocksNotHeldError(f"blocks {start}:{end} are not in this server's {self.start}:{self.end}")
        return start - self.start, end - self.start

    def _view(self, first: int, last: int) -> nn.Module:
        key = (first, last)
        if key not in self._views:
            if key == (0, len(self.layers)):
                self._views[key] = self.base
            else:
                view = copy.copy(self.base)
                view._modules = dict(self.base._modules)
                view._modules[self.family.layers_attr] = nn.ModuleList(list(self.layers)[first:last])
                # from the built span's config, which carries what construction resolved (attention kernel)
                view.config = span_config(self.base.config, last - first, first)
                self._views[key] = view
        return self._views[key]


def _prompt_adder(prompt: torch.Tensor):
    """A pre-hook adding ``prompt`` [prefix, hidden] to a block's input hidden states (out of place)."""

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        length = min(prompt.shape[0], hidden.shape[1])
        hidden = torch.cat([hidden[:, :length] + prompt[:length], hidden[:, length:]], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def build_span(
    family: Family,
    config,
    start: int,
    end: int,
    load: Callable[[list[str], Callable[[str], str]], dict],
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> SpanRunner:
    """Build blocks [start, end) of a model.

    ``load(names, rename)`` reads the tensors of the full model's ``names`` and keys them by ``rename(name)``.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = text_config(config)
    config_for_span = span_config(config, end - start, start)
    with torch.device("meta"):
        base = MODEL_MAPPING[type(config)](config_for_span)
    prefix = f"{base.base_model_prefix}."
    for path in family.local_module_paths():
        short = path[len(prefix) :] if path.startswith(prefix) else path
        if short != family.lm_head:
            set_module(base, short, nn.Identity())
    wanted = {
        _full_block_name(family, name, start): name
        for name in base.state_dict()
        if name.startswith(f"{family.layers_attr}.")
    }
    if family.read_blocks is None:
        tensors = load(list(wanted), wanted.__getitem__)
    else:
        tensors = family.read_blocks(load, wanted, config_for_span)
    materialize(base, tensors, config_for_span, device, dtype)
    base.eval()
    return SpanRunner(family, base, config, start, end)


def _full_block_name(family: Family, base_name: str, start: int) -> str:
    _, index, rest = base_name.split(".", 2)
    return f"{family.block_prefix}.{start + int(index)}.{rest}"
