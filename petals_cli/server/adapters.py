"""LoRA adapters saved by peft, applied to a server's blocks only, and switched per request.

An adapter directory is what peft's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``. Only the tensors of this server's blocks are read. Each adapted linear layer
gets one forward hook that adds ``lora_B(lora_A(x)) * scaling`` (peft's LoRA in eval mode) when a request
names an adapter that has weights for it, and returns at once otherwise. The adapter a computation uses is a
context variable set for that call only (``active``): calls on other threads or tasks never see it.
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

from petals_cli.errors import ConfigError
from petals_cli.families.base import SpanRunner

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
    """The adapters a server holds for its span; ``active(name)`` applies one for the duration of a request."""

    weights: dict[str, dict[nn.Module, LoraWeights]] = field(default_factory=dict)  # name -> layer -> weights
    _active: contextvars.ContextVar = field(default_factory=lambda: contextvars.ContextVar("adapter", default=None))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights))

    @contextlib.contextmanager
    def active(self, name: str):
        if not name:
            yield
            return
        token = self._active.set(self.weights[name])
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


NO_ADAPTERS = SpanAdapters()


def load_adapters(span: SpanRunner, directories: tuple[str, ...]) -> SpanAdapters:
    """Read the span's part of every adapter directory and hook the layers they adapt."""
    if not directories:
        return NO_ADAPTERS
    adapters = SpanAdapters()
    for directory in directories:
        name = Path(directory).resolve().name
        if name in adapters.weights:
            raise ConfigError(f"two adapters are named {name!r}; adapter names are their directory names")
        adapters.weights[name] = _read_adapter(span, Path(directory))
    hooked = {module for layers in adapters.weights.values() for module in layers}
    for module in hooked:
        module.register_forward_hook(adapters._hook)
    return adapters


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
