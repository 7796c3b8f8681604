"""The families that ship with petals, declared with the same ``Family`` an outside package would use."""

from petals_cli.families.base import Family

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    block_prefix="model.layers",
    embedding_modules=("model.embed_tokens",),
    final_norm="model.norm",
)

BLOOM = Family(
    name="bloom",
    model_types=("bloom",),
    block_prefix="transformer.h",
    embedding_modules=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
    final_norm="transformer.ln_f",
)

FAMILIES = (LLAMA, BLOOM)
