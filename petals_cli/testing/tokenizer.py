"""A real byte-level BPE tokenizer, trained locally in well under a second, for tiny test models.

This module owns the embedded training corpus, the special tokens and their ids, and the rule that the
tokenizer's vocabulary has exactly the model's ``vocab_size`` entries (filler tokens pad it), so every id a
model can emit decodes. It knows nothing about model weights or families.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = range(len(SPECIAL_TOKENS))
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte must have a token, or some text cannot be encoded

CORPUS = """
The river ran quietly past the old mill, where the miller's daughter counted sacks of grain every morning.
She kept a small notebook with the numbers of each day, and in the evening she read them aloud to her
father, who nodded and said that the harvest was better than last year. When the rain came in autumn, the
water rose over the stones, and the children from the village gathered on the bridge to watch it rush by.

A library is a quiet place full of loud ideas. On the shelves there are books about mountains and oceans,
about kings who lost their crowns and farmers who found gold in their fields. Students come to read, to
write, and sometimes simply to sit by the window and think. The librarian knows where every book lives,
and she can tell you which ones are worth reading twice.

Computers follow instructions one step at a time. A program tells the machine what to store, what to add,
and what to print on the screen. Good programs are written for people first: they have clear names, short
functions, and tests that prove they work. When a test fails, the programmer reads the error, finds the
mistake, fixes it, and runs the tests again until every line is green.

In the spring the garden wakes up. Tulips open their red and yellow cups, bees visit the apple trees, and
the grass grows so fast that it needs cutting every week. My grandmother plants tomatoes, beans, carrots
and onions in neat rows, and she waters them early, before the sun is high, so the leaves do not burn.

The train left the station at seven o'clock. Through the window we saw forests, lakes, small towns with
white churches, and long fields of wheat. A man across the aisle was reading a newspaper; a woman beside
him was knitting a blue scarf. Nobody spoke much, but when the train crossed the great bridge over the
river, everyone looked up and smiled.

Numbers tell stories too: 1, 2, 3, 10, 42, 100, 2024 and 3.14 appear in recipes, prices, dates and maps.
Questions end with a question mark? Exclamations end with a bang! Lists use commas, colons: and semicolons;
quotes use "double" or 'single' marks, and code uses brackets like (x), [y] and {z}.
"""


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the BPE once per vocab size in this process; callers get a fresh copy from the JSON."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)]
    )
    return _pad_vocab(json.loads(tokenizer.to_str()), vocab_size)


def _pad_vocab(tokenizer_state: dict, vocab_size: int) -> str:
    """Append unreachable filler entries (``<extra_N>``) to the BPE vocab so it has exactly ``vocab_size`` ids.

    Fillers live in the model vocab rather than as added tokens: they cost nothing to load even when tens of
    thousands are needed, and the byte-level decoder renders them as their own (printable ASCII) text.
    """
    vocab = tokenizer_state["model"]["vocab"]
    next_id = len(vocab)
    while next_id < vocab_size:
        vocab[f"<extra_{next_id}>"] = next_id
        next_id += 1
    return json.dumps(tokenizer_state)


def make_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids; prepends ``<s>`` when encoding."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} ids, expected {vocab_size}")
    return tokenizer


def save_tokenizer(path: str | Path, vocab_size: int, *, model_max_length: int | None = None) -> None:
    """Save a transformers fast tokenizer to ``path`` so that ``AutoTokenizer.from_pretrained(path)`` works offline."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=make_tokenizer(vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
    )
    fast.save_pretrained(str(path))
