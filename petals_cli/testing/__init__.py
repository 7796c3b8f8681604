"""Locally made test models: tiny random-weight checkpoints with a real tokenizer, no hub access needed.

This package owns everything tests, the demo and benchmarks need to get a model without the network. It is
never imported by the serving or client code.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ruff: noqa: E402  (the hub switch above must precede transformers' import)
from petals_cli.testing.adapters import make_lora_adapter
from petals_cli.testing.models import SUPPORTED_FAMILIES, default_init_std, ensure_tiny_model, make_tiny_model
from petals_cli.testing.tokenizer import make_tokenizer

__all__ = [
    "SUPPORTED_FAMILIES",
    "default_init_std",
    "ensure_tiny_model",
    "make_lora_adapter",
    "make_tiny_model",
    "make_tokenizer",
]
