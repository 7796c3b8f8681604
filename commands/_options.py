"""Options shared by several commands, defined once as ``Annotated`` aliases."""

from typing import Annotated

import typer

ModelArg = Annotated[str, typer.Argument(help="Model: a local directory or a hub repository id.", show_default=False)]
InitialPeersOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--initial-peers",
        help="Multiaddr of a swarm peer (repeatable; also PETALS_INITIAL_PEERS, space-separated).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="Torch device, e.g. cpu or cuda:0.", show_default="cpu")]
DtypeOpt = Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
ModelPrefixOpt = Annotated[
    str | None, typer.Option(help="DHT name of the model (default: the last part of MODEL).", show_default=False)
]
PromptsOpt = Annotated[
    str | None, typer.Option(help="Use prompts trained by `petals finetune` (a saved directory).", show_default=False)
]
AdapterOpt = Annotated[
    str | None,
    typer.Option(
        help="Run the blocks with this LoRA adapter (only servers that announce it are used).", show_default=False
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log more to stderr.")]
