"""Trainable prompts (prompt tuning) and their saved format.

``ptune`` learns ``prefix`` [pre_seq_len, hidden]: embeddings placed before every sequence's tokens.
``deep_ptune`` also learns ``deep`` [num_blocks, pre_seq_len, hidden]: before block i, every server adds
``deep[i]`` to the prefix positions (see ``SpanRunner.forward``), so deep prompts travel with the requests.

A saved prompts directory holds two files:

- ``prompts.safetensors``: the tensor ``prefix`` and, for deep_ptune, ``deep`` (float32);
- ``prompts.json``: ``{"format": 1, "model": ..., "method": "ptune"|"deep_ptune", "pre_seq_len": ...,
  "num_blocks": ..., "hidden_size": ...}``.

Knows nothing about the swarm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from petals_cli.errors import ConfigError

TUNING_METHODS = ("ptune", "deep_ptune")
FORMAT_VERSION = 1
TENSORS_FILE = "prompts.safetensors"
METADATA_FILE = "prompts.json"


class PromptTuning(nn.Module):
    """The client's trainable prompts for one model."""

    def __init__(self, method: str, pre_seq_len: int, num_blocks: int, hidden_size: int, *, init_std: float = 0.02):
        super().__init__()
        if method not in TUNING_METHODS:
            raise ConfigError(f"tuning method {method!r}: choose one of {', '.join(TUNING_METHODS)}")
        if pre_seq_len < 1:
            raise ConfigError(f"pre_seq_len must be >= 1, got {pre_seq_len}")
        self.method, self.pre_seq_len = method, pre_seq_len
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        self.prefix = nn.Parameter(torch.randn(pre_seq_len, hidden_size) * init_std)
        # Zeros: an untrained deep prompt leaves the blocks as they are.
        self.deep = nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size)) if method == "deep_ptune" else None

    def prepend(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] -> [batch, pre_seq_len + tokens, hidden]."""
        prefix = self.prefix.to(embeddings.dtype).unsqueeze(0).expand(embeddings.shape[0], -1, -1)
        return torch.cat([prefix, embeddings], dim=1)

    def metadata(self, model: str) -> dict:
        return {
            "format": FORMAT_VERSION,
            "model": model,
            "method": self.method,
            "pre_seq_len": self.pre_seq_len,
            "num_blocks": self.num_blocks,
            "hidden_size": self.hidden_size,
        }


def save_prompts(tuning: PromptTuning, directory: str | Path, *, model: str) -> Path:
    """Write ``tuning`` in the saved-prompts format (files replaced atomically)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"prefix": tuning.prefix.detach().float().cpu().contiguous()}
    if tuning.deep is not None:
        tensors["deep"] = tuning.deep.detach().float().cpu().contiguous()
    save_file(tensors, str(directory / (TENSORS_FILE + ".tmp")))
    os.replace(directory / (TENSORS_FILE + ".tmp"), directory / TENSORS_FILE)
    (directory / (METADATA_FILE + ".tmp")).write_text(json.dumps(tuning.metadata(model), indent=2) + "\n")
    os.replace(directory / (METADATA_FILE + ".tmp"), directory / METADATA_FILE)
    return directory


def read_prompts_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory} holds no saved prompts ({METADATA_FILE}: {exc})") from None
    checks = {"format": int, "model": str, "method": str, "pre_seq_len": int, "num_blocks": int, "hidden_size": int}
    for key, kind in checks.items():
        if not isinstance(metadata, dict) or not isinstance(metadata.get(key), kind):
            raise ConfigError(f"{path}: field {key!r} is missing or not {kind.__name__}")
    if metadata["format"] != FORMAT_VERSION:
        raise ConfigError(f"{path}: format {metadata['format']} is not {FORMAT_VERSION}; upgrade petals")
    return metadata


def load_prompts(directory: str | Path, *, num_blocks: int | None = None, hidden_size: int | None = None):
    """Read saved prompts; check them against the model when its sizes are given."""
    from safetensors.torch import load_file

    metadata = read_prompts_metadata(directory)
    for key, expected in (("num_blocks", num_blocks), ("hidden_size", hidden_size)):
        if expected is not None and metadata[key] != expected:
            raise ConfigError(
                f"{directory}: prompts were trained for {key} {metadata[key]}, this model has {expected}",
                hint=f"these prompts belong to {metadata['model']}",
            )
    tuning = PromptTuning(metadata["method"], metadata["pre_seq_len"], metadata["num_blocks"], metadata["hidden_size"])
    try:
        tensors = load_file(str(Path(directory) / TENSORS_FILE))
    except Exception as exc:  # safetensors raises its own error type (not an OSError) for corrupt files
        raise ConfigError(f"{directory}: cannot read {TENSORS_FILE} ({exc})") from None
    wanted = {"prefix"} | ({"deep"} if tuning.deep is not None else set())
    if set(tensors) != wanted:
        raise ConfigError(f"{directory}: {TENSORS_FILE} holds {sorted(tensors)}, expected {sorted(wanted)}")
    state = {name: tensor for name, tensor in tensors.items()}
    try:
        tuning.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{directory}: tensor shapes do not match {METADATA_FILE} ({exc})") from None
    return tuning, metadata
