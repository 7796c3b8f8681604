"""Developer utility: ``python -m petals_cli.testing make-model OUT_DIR ...`` writes a tiny local model.

This module owns only the argparse front end; building and saving the model is ``models.make_tiny_model``.
It prints the model's path on stdout so scripts can capture it.
"""

from __future__ import annotations

import argparse
import re
import sys

from petals_cli.testing.models import (
    DTYPES,
    LLAMA3_ROPE,
    SUPPORTED_FAMILIES,
    TINY_SLIDING_WINDOW,
    ensure_tiny_model,
    make_tiny_model,
)

DESCRIPTION = """\
Write a small model with random (seeded) weights and a tokenizer built locally to OUT_DIR, as a
Hugging Face checkpoint that every petals command accepts. Nothing is downloaded; the same options
always give the same weights. Prints OUT_DIR on stdout."""

FAMILIES_HELP = f"""\
families (what the tiny model of each one exercises):
  llama      the plain decoder
  llama3     Llama 3 rope scaling, over a {LLAMA3_ROPE["original_max_position_embeddings"]}-token original context
  mistral    a {TINY_SLIDING_WINDOW}-token sliding window on every layer
  qwen2      the sliding window on the upper half of the layers
  qwen3      the same, with per-head norms of queries and keys
  mixtral    4 experts, 2 per token
  gemma      tied input and output embeddings
  bloom      ALiBi instead of rotary positions
  falcon     grouped key/value heads, attention and MLP in parallel
  falcon-7b  one key/value head, attention and MLP in parallel
  falcon-rw  ALiBi, attention then MLP"""

# make_tiny_model's parameter names, as its errors say them, and the options they come from
_OPTION_NAMES = {
    "num_layers": "--layers",
    "hidden_size": "--hidden",
    "num_heads": "--heads",
    "num_kv_heads": "--kv-heads",
    "shards": "--shards",
}
PROG = "python -m petals_cli.testing"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line with a hint, like every petals command's."""

    def error(self, message: str):
        self.exit(2, f"error: {message} {_hint(self.prog)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Make tiny local test models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    make = commands.add_parser(
        "make-model",
        help="write a tiny random-weight model with a local tokenizer",
        description=DESCRIPTION,
        epilog=FAMILIES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    make.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the model to (created if missing)")
    make.add_argument(
        "--family",
        choices=SUPPORTED_FAMILIES,
        default="llama",
        metavar="NAME",
        help="model family, see below (default: %(default)s)",
    )
    make.add_argument("--layers", type=int, default=6, metavar="N", help="decoder layers (default: %(default)s)")
    make.add_argument("--hidden", type=int, default=64, metavar="N", help="hidden size (default: %(default)s)")
    make.add_argument(
        "--heads",
        type=int,
        default=4,
        metavar="N",
        help="attention heads; must divide --hidden (default: %(default)s)",
    )
    make.add_argument(
        "--kv-heads",
        type=int,
        default=2,
        metavar="N",
        help="key/value heads; must divide --heads, fewer than --heads is grouped-query attention; "
        "bloom, falcon-7b and falcon-rw have their own layout (default: %(default)s)",
    )
    make.add_argument(
        "--intermediate",
        type=int,
        metavar="N",
        help="MLP size (default: about 8/3 of --hidden; bloom and the falcons always use 4 x --hidden)",
    )
    make.add_argument("--vocab", type=int, default=512, metavar="N", help="vocabulary size (default: %(default)s)")
    make.add_argument(
        "--max-positions",
        type=int,
        default=2048,
        metavar="N",
        help="longest sequence, in tokens; ALiBi (bloom, falcon-rw) has no such limit, the tokenizer records it "
        "(default: %(default)s)",
    )
    make.add_argument(
        "--shards",
        type=int,
        default=1,
        metavar="N",
        help="safetensors files, split by whole layers; at most --layers (default: %(default)s)",
    )
    make.add_argument(
        "--init-std",
        type=float,
        metavar="X",
        help="spread of the random weights (default: 0.5 * sqrt(64 / --hidden), larger than a trained model's, "
        "so that greedy text varies)",
    )
    make.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: %(default)s)")
    make.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight dtype (default: %(default)s)")
    make.add_argument(
        "--reuse", action="store_true", help="keep a model already in OUT_DIR if it was made with the same options"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    build = ensure_tiny_model if args.reuse else make_tiny_model
    try:
        path = build(
            args.out_dir,
            args.family,
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
            max_position_embeddings=args.max_positions,
            shards=args.shards,
            init_std=args.init_std,
            seed=args.seed,
            dtype=args.dtype,
        )
    except ValueError as error:
        print(f"error: {_option_names(str(error))} {_hint(f'{PROG} make-model')}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _hint(prog: str) -> str:
    return f"(hint: `{prog} --help` lists the options)"


def _option_names(message: str) -> str:
    return re.sub(r"\b(" + "|".join(_OPTION_NAMES) + r")\b", lambda match: _OPTION_NAMES[match[1]], message)


if __name__ == "__main__":
    sys.exit(main())
