"""Developer utility: ``python -m petals_cli.testing make-model OUT_DIR ...`` writes a tiny local model.

This module owns only the argparse front end; building and saving the model is ``models.make_tiny_model``.
It prints the model's path on stdout so scripts can capture it.
"""

from __future__ import annotations

import argparse
import sys

from petals_cli.testing.models import DTYPES, SUPPORTED_FAMILIES, ensure_tiny_model, make_tiny_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m petals_cli.testing", description="Make tiny local test models.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser(
        "make-model", help="build a random-weight model with a local tokenizer", description=make_tiny_model.__doc__
    )
    make.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the checkpoint to")
    make.add_argument("--family", choices=SUPPORTED_FAMILIES, default="llama")
    make.add_argument("--layers", type=int, default=6, help="number of decoder layers (default: %(default)s)")
    make.add_argument("--hidden", type=int, default=64, help="hidden size (default: %(default)s)")
    make.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    make.add_argument("--kv-heads", type=int, default=2, help="key/value heads, all but bloom (default: %(default)s)")
    make.add_argument("--intermediate", type=int, help="MLP size, not bloom/falcon (default: ~8/3 hidden)")
    make.add_argument("--vocab", type=int, default=512, help="vocabulary size (default: %(default)s)")
    make.add_argument("--max-positions", type=int, default=2048, help="max position embeddings (default: %(default)s)")
    make.add_argument("--shards", type=int, default=1, help="number of safetensors files (default: %(default)s)")
    make.add_argument("--init-std", type=float, help="weight init std (default: 0.5 * sqrt(64 / hidden))")
    make.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    make.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    make.add_argument("--reuse", action="store_true", help="keep an existing model made with the same arguments")
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
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
