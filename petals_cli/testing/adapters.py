"""Random LoRA adapters for the tiny test models, saved the way peft saves real ones."""

from __future__ import annotations

from pathlib import Path

import torch


def make_lora_adapter(
    model: str | Path,
    path: str | Path,
    *,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    rank: int = 4,
    alpha: int = 8,
    std: float = 0.2,
    seed: int = 0,
) -> Path:
    """A peft LoRA adapter for ``model`` with seeded random A and B matrices (peft starts B at zero, which
    would make the adapter a no-op), saved to ``path`` (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)
    adapted = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    adapted.save_pretrained(str(path))
    return Path(path)
