"""petals: run large language models collaboratively.

Importing the package is cheap: the heavy client classes load on first attribute access, so the CLI's
``--help`` and shell completion never import torch, transformers or hivemind.
"""

__version__ = "0.1.0"

_LAZY = {
    "AutoDistributedModelForCausalLM": "petals_cli.remote_model",
    "DistributedModelForCausalLM": "petals_cli.remote_model",
    "ClientConfig": "petals_cli.config",
    "ServerConfig": "petals_cli.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'petals_cli' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
