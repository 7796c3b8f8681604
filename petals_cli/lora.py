"""LoRA weights that the client owns and trains for every remote block, while the servers' blocks stay frozen.

``ClientLora`` holds peft's two matrices per block and target module (``lora_A`` [r, in], ``lora_B`` [out, r],
initialised as peft does: A Kaiming-uniform, B zero, so training starts from the base model). Requests carry the
weights of their span's blocks (``SpanLora``); servers apply them for that request only and return their
gradients from backward. ``save_pretrained`` writes a standard peft adapter directory (``adapter_config.json`` and
``adapter_model.safetensors``) that transformers + peft load locally and ``petals serve --adapters`` serves.
Knows nothing about the network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from petals_cli.errors import ConfigError

MAX_RANK = 64
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def block_linear_shapes(hf_config, family) -> dict[str, tuple[int, int]]:
    """Every linear layer of one decoder block: its path inside the block -> (in_features, out_features)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from petals_cli.families.base import span_config, text_config

    config = text_config(hf_config)
    with torch.device("meta"):
        base = MODEL_MAPPING[type(config)](span_config(config, 1, 0))
    block = getattr(base, family.layers_attr)[0]
    return {
        name: (module.in_features, module.out_features)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }


def resolve_targets(shapes: dict[str, tuple[int, int]], wanted: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """peft's target_modules (names or name endings, e.g. "q_proj") -> the block's linear layers they match."""
    if not wanted:
        raise ConfigError("name at least one LoRA target module, e.g. q_proj and v_proj")
    matched = set()
    for name in wanted:
        found = {path for path in shapes if path == name or path.endswith(f".{name}")}
        if not found:
            raise ConfigError(
                f"LoRA target {name!r} matches no linear layer of a block (they are: {', '.join(sorted(shapes))})"
            )
        matched |= found
    return tuple(sorted(matched))


@dataclass(frozen=True)
class SpanLora:
    """What one request carries: the targets, rank and scale, and the weights of its blocks in wire order
    (for each block, for each target: A then B)."""

    targets: tuple[str, ...]
    rank: int
    scaling: float
    weights: tuple[torch.Tensor, ...]


class ClientLora(nn.Module):
    """Trainable LoRA weights for ``num_blocks`` remote blocks (``parameters()`` in wire order)."""

    def __init__(
        self,
        num_blocks: int,
        shapes: dict[str, tuple[int, int]],
        targets: tuple[str, ...],
        rank: int = 8,
        alpha: float = 16.0,
        *,
        block_prefix: str = "model.layers",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not 1 <= rank <= MAX_RANK:
            raise ConfigError(f"LoRA rank {rank}: choose 1 to {MAX_RANK}")
        if not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"LoRA alpha {alpha}: must be above 0")
        self.num_blocks, self.targets, self.rank, self.alpha = num_blocks, tuple(targets), rank, float(alpha)
        self.block_prefix = block_prefix
        self.shapes = {target: shapes[target] for target in self.targets}
        self.weights = nn.ParameterList()
        for _ in range(num_blocks):
            for target in self.targets:
                in_features, out_features = self.shapes[target]
                down = torch.empty(rank, in_features, dtype=dtype)
                nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # peft's default initialisation
                self.weights.append(nn.Parameter(down))
                self.weights.append(nn.Parameter(torch.zeros(out_features, rank, dtype=dtype)))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def span_slice(self, start: int, end: int) -> slice:
        per_block = 2 * len(self.targets)
        return slice(start * per_block, end * per_block)

    def for_span(self, weights, start: int, end: int) -> SpanLora:
        """The request payload of blocks [start, end) from ``weights`` (this module's parameters, or stand-ins
        for them in the same order)."""
        return SpanLora(self.targets, self.rank, self.scaling, tuple(weights[self.span_slice(start, end)]))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under peft's saved names (``base_model.model.<block path>.lora_A.weight``)."""
        names = {}
        for index, parameter in enumerate(self.weights):
            block, rest = divmod(index, 2 * len(self.targets))
            target, which = self.targets[rest // 2], "AB"[rest % 2]
            names[f"{_PEFT_PREFIX}{self.block_prefix}.{block}.{target}.lora_{which}.weight"] = parameter
        return names

    def save_pretrained(self, directory: str | Path, base_model: str = "") -> Path:
        """Write a peft adapter directory: transformers + peft load it, `petals serve --adapters` serves it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": list(self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.peft_state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        return directory

    def load_pretrained(self, directory: str | Path) -> None:
        """Take the weights of a peft adapter directory with the same targets and rank (e.g. to resume)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the LoRA adapter in {directory} ({exc})") from None
        if config.get("r") != self.rank or sorted(config.get("target_modules") or ()) != sorted(self.targets):
            raise ConfigError(f"the LoRA adapter in {directory} has another rank or other target modules")
        with torch.no_grad():
            for name, parameter in self.peft_state_dict().items():
                if name not in tensors or tensors[name].shape != parameter.shape:
                    raise ConfigError(f"the LoRA adapter in {directory} lacks {name} (or has another shape)")
                parameter.copy_(tensors[name])
        self.alpha = float(config.get("lora_alpha", self.alpha))
