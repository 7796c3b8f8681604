"""LoRA on a server's blocks: adapters saved by peft and served by name, and weights a client sends with a request.

An adapter directory is what peft's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``. Only the tensors of this server's blocks are read. A client training its own LoRA
through frozen blocks sends A and B for every block of a request's span instead (``request_lora`` checks them
against the span and names what is wrong). Each adapted linear layer gets one forward hook that adds
``lora_B(lora_A(x)) * scaling`` (peft's LoRA without dropout) when the call's LoRA has weights for it, and returns
at once otherwise; layers a client targets are hooked the first time one is used. The LoRA a computation uses is a
context variable set for that call only (``active`` for a served adapter, ``applying`` for any mapping of layers to
weights): calls on other threads or tasks never see it, and nothing of a request stays behind.
Knows nothing about the network.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from petals_cli.errors import ConfigError, InvalidRequestError
from petals_cli.families.base import SpanRunner
from petals_cli.server import validation
from petals_cli.wire import SpanRequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    down: torch.Tensor  # lora_A: [rank, in_features]
    up: torch.Tensor  # lora_B: [out_features, rank]
    scaling: float


@dataclass
class SpanAdapters:
    """The LoRA of a server's span: ``active(name)`` applies a served adapter for the duration of a request,
    ``applying(layers)`` a request's own weights. One per span: it remembers which of the span's layers it hooked."""

    weights: dict[str, dict[nn.Module, LoraWeights]] = field(default_factory=dict)  # name -> layer -> weights
    _active: contextvars.ContextVar = field(default_factory=lambda: contextvars.ContextVar("adapter", default=None))
    _hooked: set[nn.Module] = field(default_factory=set)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights))

    def active(self, name: str):
        return self.applying(self.weights[name] if name else None)

    @contextlib.contextmanager
    def applying(self, layers: dict[nn.Module, LoraWeights] | None):
        """Add ``layers``' LoRA to their outputs during the call; layers never hooked before are hooked now (on the
        compute thread, where the modules run)."""
        if not layers:
            yield
            return
        for module in layers.keys() - self._hooked:
            module.register_forward_hook(self._hook)
            self._hooked.add(module)
        token = self._active.set(layers)
        try:
            yield
        finally:
            self._active.reset(token)

    def _hook(self, module: nn.Module, inputs, output):
        active = self._active.get()
        if active is None or module not in active:
            return None
        lora = active[module]
        x = inputs[0].to(lora.down.dtype)
        return output + (nn.functional.linear(nn.functional.linear(x, lora.down), lora.up) * lora.scaling).to(
            output.dtype
        )


@dataclass(frozen=True, eq=False)
class RequestLora:
    """LoRA weights a client sent with a request, checked against the span they were sent for.

    ``tensors`` are as sent (A, B per block and target, in wire order) and ``modules`` the layers they adapt, one per
    pair. ``identity`` (targets, rank, scaling) tells kept graphs apart; compared by identity otherwise, so that steps
    of sessions with their own LoRA never share a batch."""

    span: SpanRunner
    modules: tuple[nn.Module, ...]
    tensors: tuple[torch.Tensor, ...]
    scaling: float
    identity: tuple

    def layers(self, tensors: list[torch.Tensor] | None = None) -> dict[nn.Module, LoraWeights]:
        """Each adapted layer's weights, from ``tensors`` (leaves to differentiate) or the sent ones, on the span's
        device and in the dtype A was sent in."""
        tensors = list(self.tensors) if tensors is None else tensors
        device = self.span.device
        return {
            module: LoraWeights(down=down.to(device), up=up.to(device, down.dtype), scaling=self.scaling)
            for module, down, up in zip(self.modules, tensors[0::2], tensors[1::2], strict=True)
        }


def load_adapters(span: SpanRunner, directories: tuple[str, ...]) -> SpanAdapters:
    """Read the span's part of every adapter directory and hook the layers they adapt (with none, the span's
    ``SpanAdapters`` still applies the LoRA clients send)."""
    adapters = SpanAdapters()
    for directory in directories:
        name = Path(directory).resolve().name
        if name in adapters.weights:
            raise ConfigError(f"two adapters are named {name!r}; adapter names are their directory names")
        adapters.weights[name] = _read_adapter(span, Path(directory))
    for module in {module for layers in adapters.weights.values() for module in layers}:
        module.register_forward_hook(adapters._hook)
        adapters._hooked.add(module)
    return adapters


def request_lora(span: SpanRunner, request: SpanRequest, tensors: list[torch.Tensor]) -> RequestLora | None:
    """The LoRA a request sends (None when it sends none), after checking every target names a linear layer in each
    of its blocks and every tensor fits it; ``InvalidRequestError`` names the first problem."""
    if not request.lora_targets:
        if tensors:
            raise InvalidRequestError(f"{len(tensors)} unexpected tensors: the request names no lora_targets")
        return None
    rank, modules, expected = request.lora_rank, [], []
    for block in range(request.start_block, request.end_block):
        layer = span.layers[block - span.start]
        for target in request.lora_targets:
            module = _target_module(layer, target)
            if not isinstance(module, nn.Linear):
                raise InvalidRequestError(f"lora target {target[:64]!r} is not a linear layer of block {block}")
            modules.append(module)
            expected.append((f"A of {target} in block {block}", (rank, module.in_features)))
            expected.append((f"B of {target} in block {block}", (module.out_features, rank)))
    validation.check_lora_tensors(tensors, expected)
    identity = (request.lora_targets, rank, request.lora_scaling)
    return RequestLora(span, tuple(modules), tuple(tensors), request.lora_scaling, identity)


def _target_module(layer: nn.Module, target: str) -> nn.Module:
    try:
        return layer.get_submodule(target)
    except Exception:  # noqa: BLE001 (a client's name: missing, or an attribute that is not a module)
        raise InvalidRequestError(f"lora target {target[:64]!r} is not a module of a block") from None


def adapter_scaling(config: dict) -> float:
    """peft's LoRA scale: lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    rank, alpha = config["r"], config.get("lora_alpha", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_adapter(span: SpanRunner, directory: Path) -> dict[nn.Module, LoraWeights]:
    from safetensors import safe_open

    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--adapters {directory}: cannot read {CONFIG_FILE} ({exc})") from None
    if (
        config.get("peft_type") != "LORA"
        or config.get("use_dora")
        or config.get("rank_pattern")
        or config.get("alpha_pattern")
    ):
        raise ConfigError(f"--adapters {directory}: only plain LoRA adapters (no DoRA, no rank/alpha patterns)")
    scaling = adapter_scaling(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                module_path, _, kind = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
                block = span.family.block_of(module_path)
                if block is None:
                    raise ConfigError(f"--adapters {directory}: {key} is outside the transformer blocks")
                if span.start <= block < span.end:
                    pairs.setdefault(module_path, {})[kind] = weights.get_tensor(key)
    except OSError as exc:
        raise ConfigError(f"--adapters {directory}: cannot read {WEIGHTS_FILE} ({exc})") from None
    layers = {}
    for module_path, tensors in pairs.items():
        if set(tensors) != {"A.weight", "B.weight"}:
            raise ConfigError(f"--adapters {directory}: {module_path} is not a LoRA linear layer ({sorted(tensors)})")
        module = _span_module(span, module_path)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"--adapters {directory}: {module_path} is not a linear layer")
        layers[module] = LoraWeights(
            down=tensors["A.weight"].to(span.device, span.dtype),
            up=tensors["B.weight"].to(span.device, span.dtype),
            scaling=scaling,
        )
    return layers


def _span_module(span: SpanRunner, module_path: str) -> nn.Module:
    block = span.family.block_of(module_path)
    for prefix in (span.family.block_prefix, span.family.layers_attr):
        if module_path.startswith(f"{prefix}.{block}."):
            inner = module_path[len(f"{prefix}.{block}.") :]
            break
    try:
        return span.layers[block - span.start].get_submodule(inner)
    except AttributeError:
        raise ConfigError(f"the model has no module {module_path} for a LoRA adapter") from None
