"""The families that ship with petals, declared with the same ``Family`` an outside package would use.

Most families differ only in names: the blocks are transformers' own, so sliding windows (Mistral, Qwen2/3),
rope scaling (Llama 3), ALiBi or parallel attention (BLOOM, Falcon) and Gemma's embedding scale (inside its
embedding module, which the client keeps) come with them. The one piece of per-family code reads Mixtral
checkpoints, which store each expert's weights apart while transformers 5 fuses them.
"""

import torch

from petals_cli.errors import ModelNotFoundError
from petals_cli.families.base import Family


def _llama_like(name: str, *model_types: str, **fields) -> Family:
    """A family laid out like Llama: ``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head``."""
    return Family(
        name=name,
        model_types=model_types or (name,),
        block_prefix="model.layers",
        embedding_modules=("model.embed_tokens",),
        final_norm="model.norm",
        **fields,
    )


def read_mixtral_blocks(load, wanted: dict[str, str], config) -> dict:
    """Mixtral block tensors from either layout: transformers 5 state-dict names, or the per-expert one.

    The per-expert layout (``block_sparse_moe.experts.E.w1/w2/w3.weight``, ``block_sparse_moe.gate.weight``)
    is what published checkpoints and ``save_pretrained`` use; transformers fuses it on load as done here:
    ``gate_up_proj = cat(stack(w1), stack(w3), dim=1)``, ``down_proj = stack(w2)``.
    """
    try:
        return load(list(wanted), wanted.__getitem__)
    except ModelNotFoundError:
        pass
    experts = range(config.num_local_experts)
    sources: dict[str, list[str]] = {}
    for full_name, module_name in wanted.items():
        legacy = full_name.replace(".mlp.", ".block_sparse_moe.")
        if full_name.endswith(".mlp.experts.gate_up_proj"):
            prefix = legacy.removesuffix("gate_up_proj")
            sources[module_name] = [f"{prefix}{e}.{w}.weight" for w in ("w1", "w3") for e in experts]
        elif full_name.endswith(".mlp.experts.down_proj"):
            sources[module_name] = [f"{legacy.removesuffix('down_proj')}{e}.w2.weight" for e in experts]
        else:
            sources[module_name] = [legacy]
    read = load([source for names in sources.values() for source in names], lambda source: source)
    tensors = {}
    for module_name, names in sources.items():
        parts = [read[source] for source in names]
        if len(parts) == 1:
            tensors[module_name] = parts[0]
        elif module_name.endswith("gate_up_proj"):
            half = len(parts) // 2
            tensors[module_name] = torch.cat([torch.stack(parts[:half]), torch.stack(parts[half:])], dim=1)
        else:
            tensors[module_name] = torch.stack(parts)
    return tensors


LLAMA = _llama_like("llama")  # Llama 1-3, including Llama 3 rope scaling (rope_type "llama3")

BLOOM = Family(
    name="bloom",
    model_types=("bloom",),
    block_prefix="transformer.h",
    embedding_modules=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
    final_norm="transformer.ln_f",
)

MISTRAL = _llama_like("mistral")
QWEN2 = _llama_like("qwen2")
QWEN3 = _llama_like("qwen3")
MIXTRAL = _llama_like("mixtral", read_blocks=read_mixtral_blocks)
GEMMA = _llama_like("gemma")

FALCON = Family(
    name="falcon",
    model_types=("falcon",),
    block_prefix="transformer.h",
    embedding_modules=("transformer.word_embeddings",),
    final_norm="transformer.ln_f",
)

FAMILIES = (LLAMA, BLOOM, MISTRAL, QWEN2, QWEN3, MIXTRAL, FALCON, GEMMA)
