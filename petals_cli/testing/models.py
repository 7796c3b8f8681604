"""Tiny random-weight causal LMs saved as real Hugging Face checkpoints, for tests, demos and benchmarks.

This module owns building a transformers config and model for each supported family, the seeded
large-std weight initialisation (so greedy output of a tiny model varies instead of repeating one token),
and writing the checkpoint itself: safetensors files (single or sharded by consecutive decoder layers,
with the standard index), config, generation config, a local tokenizer and the ``petals_tiny.json`` marker
that lets callers reuse a model built with the same arguments. It knows nothing about swarms or servers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from petals_cli.testing.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, save_tokenizer

SUPPORTED_FAMILIES = (
    *("llama", "bloom", "llama3", "mistral", "qwen2", "qwen3", "mixtral"),
    *("falcon", "falcon-7b", "falcon-rw", "gemma"),
)
TINY_SLIDING_WINDOW = 12  # mistral, qwen2, qwen3: small, so that tests can exceed it with a short session
# llama3: Llama 3 rope scaling with a small original context, so that a short session passes it
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MARKER_FILE = "petals_tiny.json"
MARKER_VERSION = 1  # bump when the same arguments start producing different files
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def make_tiny_model(
    path: str | Path,
    family: str = "llama",
    *,
    num_layers: int = 6,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    shards: int = 1,
    init_std: float | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Build a seeded random-weight model of ``family`` and save it (weights, config, tokenizer) to ``path``.

    ``family`` is one of ``SUPPORTED_FAMILIES``; ``_llama_like_config`` and ``_falcon_config`` say what each
    variant exercises (sliding windows of ``TINY_SLIDING_WINDOW`` tokens, ``LLAMA3_ROPE`` scaling, experts, ALiBi).
    ``num_kv_heads`` < ``num_heads`` gives grouped-query attention where the layout has it (not bloom, falcon-7b or
    falcon-rw); ``None`` means one kv head per attention head. bloom and falcon ignore ``intermediate_size``
    (4 * hidden there), ALiBi models ``max_position_embeddings`` (the tokenizer's ``model_max_length`` records it).
    ``init_std=None`` picks ``default_init_std(hidden_size)``. The same arguments always produce the same
    weights, whatever ``shards`` is.
    """
    arguments = _marker_arguments(locals())
    _validate(arguments)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).unlink(missing_ok=True)
    config = _make_config(arguments)
    model = _make_model(config, init_std=config.initializer_range, seed=seed, dtype=DTYPES[dtype])
    _remove_old_weights(path)
    _save_weights(path, _state_dict_to_save(model), num_layers=num_layers, shards=shards)
    model.config.save_pretrained(path)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(path)
    save_tokenizer(path, vocab_size, model_max_length=max_position_embeddings)
    (path / MARKER_FILE).write_text(json.dumps(arguments, indent=2, sort_keys=True) + "\n")  # last: marks completion
    return path


def ensure_tiny_model(path: str | Path, family: str = "llama", **kwargs) -> Path:
    """Return ``path``, building the model there only when its marker is missing or records other arguments."""
    from inspect import signature

    bound = signature(make_tiny_model).bind(path, family, **kwargs)
    bound.apply_defaults()
    wanted = _marker_arguments(bound.arguments)
    marker = Path(path) / MARKER_FILE
    try:
        if json.loads(marker.read_text()) == wanted:
            return Path(path)
    except (OSError, ValueError):
        pass
    return make_tiny_model(path, family, **kwargs)


def default_init_std(hidden_size: int) -> float:
    """0.5 at hidden size 64, scaled by 1/sqrt(width) so wider models keep the same activation statistics.

    Far above the usual 0.02, so that greedy output of a random tiny model varies instead of repeating one
    token; the width scaling keeps a benchmark-size model's activations well inside float16 range.
    """
    return 0.5 * (64 / hidden_size) ** 0.5


def _marker_arguments(arguments: dict) -> dict:
    recorded = {name: value for name, value in arguments.items() if name != "path"}
    return {"marker_version": MARKER_VERSION, **recorded}


def _validate(arguments: dict) -> None:
    """Reject bad ``make_tiny_model`` arguments with a ValueError before any work is done."""
    family, dtype, shards = arguments["family"], arguments["dtype"], arguments["shards"]
    num_layers, num_heads, num_kv_heads = arguments["num_layers"], arguments["num_heads"], arguments["num_kv_heads"]
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; supported dtypes: {', '.join(DTYPES)}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if not 1 <= shards <= num_layers:
        raise ValueError(f"shards must be between 1 and num_layers ({num_layers}), got {shards}")
    if num_heads < 1 or arguments["hidden_size"] % num_heads:
        raise ValueError(f"hidden_size ({arguments['hidden_size']}) must be a multiple of num_heads ({num_heads})")
    has_kv_heads = family not in ("bloom", "falcon-7b", "falcon-rw")  # those have one fixed layout
    if has_kv_heads and num_kv_heads is not None and (num_kv_heads < 1 or num_heads % num_kv_heads):
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")


def _make_config(arguments: dict):
    """The transformers config for ``arguments`` (the recorded ``make_tiny_model`` arguments)."""
    hidden_size = arguments["hidden_size"]
    init_std = default_init_std(hidden_size) if arguments["init_std"] is None else arguments["init_std"]
    common = dict(
        vocab_size=arguments["vocab_size"],
        hidden_size=hidden_size,
        initializer_range=init_std,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    if arguments["family"] == "bloom":
        from transformers import BloomConfig

        return BloomConfig(n_layer=arguments["num_layers"], n_head=arguments["num_heads"], **common)
    if arguments["family"].startswith("falcon"):
        return _falcon_config(arguments, common)
    return _llama_like_config(arguments, common)


def _llama_like_config(arguments: dict, common: dict):
    """Llama and the families shaped like it, each with the feature its tests must reach in a few tokens.

    ``llama3``: Llama 3 rope scaling with a 16-token original context; ``mistral``: a sliding window on every
    layer; ``qwen2``/``qwen3``: a sliding window on the upper half of the layers, so spans mix both kinds;
    ``mixtral``: 4 experts, 2 per token; ``gemma``: tied embeddings, as its checkpoints have.
    """
    from transformers import AutoConfig

    family, num_layers, num_heads = arguments["family"], arguments["num_layers"], arguments["num_heads"]
    hidden_size = arguments["hidden_size"]
    # llama's own ratio: about 8/3 of the hidden size, rounded up to a multiple of 16
    intermediate_size = arguments["intermediate_size"] or (8 * hidden_size // 3 + 15) // 16 * 16
    fields = dict(
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=arguments["num_kv_heads"] or num_heads,
        max_position_embeddings=arguments["max_position_embeddings"],
        tie_word_embeddings=False,
        **common,
    )
    if family != "llama":
        fields["head_dim"] = hidden_size // num_heads  # gemma and qwen3 default to a fixed head size
    if family == "llama3":
        fields["rope_parameters"] = dict(LLAMA3_ROPE)
    elif family == "mistral":
        fields["sliding_window"] = TINY_SLIDING_WINDOW
    elif family in ("qwen2", "qwen3"):
        fields.update(use_sliding_window=True, sliding_window=TINY_SLIDING_WINDOW, max_window_layers=num_layers // 2)
    elif family == "mixtral":
        fields.update(num_local_experts=4, num_experts_per_tok=2)
    elif family == "gemma":
        fields["tie_word_embeddings"] = True
    model_type = "llama" if family == "llama3" else family
    return AutoConfig.for_model(model_type, **fields)


def _falcon_config(arguments: dict, common: dict):
    """Falcon's three layouts: ``falcon`` the new decoder architecture (Falcon-40B/180B: grouped kv heads, parallel
    attention and MLP, rotary), ``falcon-7b`` one kv head with parallel attention, ``falcon-rw`` ALiBi, sequential."""
    from transformers import FalconConfig

    family, num_heads = arguments["family"], arguments["num_heads"]
    layouts = {
        "falcon": dict(new_decoder_architecture=True, num_kv_heads=arguments["num_kv_heads"] or num_heads),
        "falcon-7b": dict(new_decoder_architecture=False, multi_query=True, num_kv_heads=1),
        "falcon-rw": dict(new_decoder_architecture=False, multi_query=False, num_kv_heads=num_heads),
    }
    return FalconConfig(
        num_hidden_layers=arguments["num_layers"],
        num_attention_heads=num_heads,
        parallel_attn=family != "falcon-rw",
        alibi=family == "falcon-rw",
        bias=family == "falcon-rw",
        max_position_embeddings=arguments["max_position_embeddings"],
        **layouts[family],
        **common,
    )


def _make_model(config, *, init_std: float, seed: int, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _initialize(model, init_std=init_std, seed=seed)
    model = model.to(dtype).eval()
    model.config.dtype = dtype  # from_config recorded the float32 the weights were drawn in
    return model


@torch.no_grad()
def _initialize(model: nn.Module, *, init_std: float, seed: int) -> None:
    """Overwrite every weight from one seeded generator: matrices ~ N(0, init_std), biases 0, norms 1.

    Matrices are Linear and Embedding weights and any other parameter of two or more dimensions (Mixtral's
    router and fused experts). Weights are drawn in float32 in module order, so a checkpoint's values depend
    only on the arguments. Rows of the projections (all but embeddings and the LM head) are centred: otherwise a
    positive-mean activation such as bloom's GELU adds the same vector at every position, and a tiny bloom
    greedily collapses onto one token.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    output_head = model.get_output_embeddings()
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # tied weights: the first owner (the input embedding) draws them
                continue
            seen.add(id(parameter))
            if (name == "weight" and isinstance(module, (nn.Linear, nn.Embedding))) or parameter.dim() > 1:
                weight = torch.randn(parameter.shape, generator=generator).mul_(init_std)
                if not isinstance(module, nn.Embedding) and module is not output_head:
                    weight.sub_(weight.mean(dim=-1, keepdim=True))
                parameter.copy_(weight)
            elif name == "weight":  # layer norms and RMS norms
                parameter.fill_(1.0)
            else:
                parameter.zero_()


def _state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write: state dict names, tied copies (bloom's lm_head) left out."""
    state_dict = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        for tied_name in getattr(model, "_tied_weights_keys", None) or {}:
            state_dict.pop(tied_name, None)
    if model.config.model_type == "mixtral":
        state_dict = _per_expert_layout(state_dict)
    return {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}


def _per_expert_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral's published layout, which ``save_pretrained`` writes too: one w1/w2/w3 per expert, unfused."""
    result = {}
    for name, tensor in state_dict.items():
        legacy = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = legacy.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                result[f"{prefix}{expert}.w1.weight"] = gate[expert]
                result[f"{prefix}{expert}.w3.weight"] = up[expert]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = legacy.removesuffix("down_proj")
            result.update({f"{prefix}{expert}.w2.weight": tensor[expert] for expert in range(tensor.shape[0])})
        else:
            result[legacy] = tensor
    return result


def _remove_old_weights(path: Path) -> None:
    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        old.unlink(missing_ok=True)


def _save_weights(path: Path, state_dict: dict[str, torch.Tensor], *, num_layers: int, shards: int) -> None:
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(state_dict, str(path / SINGLE_FILE), metadata=metadata)
        return
    shard_of = assign_shards(list(state_dict), num_layers=num_layers, shards=shards)
    file_names = [f"model-{index + 1:05d}-of-{shards:05d}.safetensors" for index in range(shards)]
    for index, file_name in enumerate(file_names):
        shard = {name: tensor for name, tensor in state_dict.items() if shard_of[name] == index}
        save_file(shard, str(path / file_name), metadata=metadata)
    index = {
        "metadata": {"total_size": sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())},
        "weight_map": {name: file_names[shard_of[name]] for name in state_dict},
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def assign_shards(names: list[str], *, num_layers: int, shards: int) -> dict[str, int]:
    """Map tensor names (in state dict order) to 0-based shards so consecutive layers share or follow shards.

    Decoder layer ``i`` goes to shard ``i * shards // num_layers``; tensors before the first layer (embeddings)
    go to the first shard, tensors after it (final norm, LM head) to the last.
    """
    shard_of: dict[str, int] = {}
    seen_layer = False
    for name in names:
        match = _LAYER_INDEX.search(name)
        if match:
            seen_layer = True
            shard_of[name] = int(match.group(1)) * shards // num_layers
        else:
            shard_of[name] = shards - 1 if seen_layer else 0
    return shard_of
