"""Loading a server's span: only its blocks' tensors, from only the shards that hold them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from petals_cli.checkpoint import ModelSource, load_tensors, locate, metadata_dir, weight_map
from petals_cli.families import Family, family_for
from petals_cli.families.base import SpanRunner, build_span, text_config
from petals_cli.server.quant import quantize_linears

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    config: object
    family: Family
    num_blocks: int


def read_model_config(source: ModelSource) -> LoadedModel:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(metadata_dir(source))
    family = family_for(config)
    return LoadedModel(config=config, family=family, num_blocks=text_config(config).num_hidden_layers)


def resolve_dtype(name: str, config) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float32 when it names none)."""
    if name == "auto":
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
    if name not in DTYPES:
        from petals_cli.errors import ConfigError

        raise ConfigError(f"--dtype {name!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_span(
    source: ModelSource,
    model: LoadedModel,
    start: int,
    end: int,
    *,
    device: str,
    dtype: torch.dtype,
    quant: str = "none",
) -> SpanRunner:
    """Blocks [start, end) on ``device``; with ``quant`` int8/nf4 their linear layers are quantised (loaded on
    the CPU first, so the unquantised weights never occupy the device)."""
    files = weight_map(source)
    base_prefix = model.family.block_prefix.split(".")[0]

    def load(names: list[str], rename):
        found = {locate(name, files, base_prefix=base_prefix): name for name in names}
        return load_tensors(source, found, rename=lambda name: rename(found[name]), dtype=dtype, files=files)

    build_device = "cpu" if quant != "none" else device
    span = build_span(model.family, model.config, start, end, load, device=build_device, dtype=dtype)
    if quant != "none":
        count = quantize_linears(span, quant, device)
        span.to(device)
        logger.info("quantised %d linear layers to %s", count, quant)
    shards = sorted({files[name] for name in files if _in_span(model.family, name, start, end)})
    logger.info("loaded blocks %d:%d from %s", start, end, ", ".join(shards))
    return span


def _in_span(family: Family, name: str, start: int, end: int) -> bool:
    index = family.block_of(name)
    return index is not None and start <= index < end
