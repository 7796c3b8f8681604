"""Options shared by several commands, defined once as ``Annotated`` aliases."""

from typing import Annotated, Literal

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
DtypeOpt = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"] | None,
    typer.Option(help="Weights' dtype; auto: the checkpoint's own.", show_default="auto"),
]
WireDtypeOpt = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"] | None,
    typer.Option(
        help="Send activations of generation steps in this dtype (auto: as the client computes them; a 16-bit "
        "dtype halves what a float32 model sends, but is not exact).",
        show_default="auto",
    ),
]
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
SwarmKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--swarm-key",
        help="File with the secret of a private swarm (also PETALS_SWARM_KEY); peers without it are refused.",
        show_default=False,
    ),
]
AllowedServersOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-servers", help="Route only through these server peer ids (repeatable).", show_default=False
    ),
]
BlockedServersOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--blocked-servers", help="Never route through these server peer ids (repeatable).", show_default=False
    ),
]
VerifyOpt = Annotated[
    float | None,
    typer.Option(
        "--verify",
        metavar="RATE",
        min=0.0,
        max=1.0,
        help="Check servers: re-run each server's first step and then this share of steps and requests on another "
        "server holding the same blocks; a server outvoted by a third is banned and reported (0 = off).",
        show_default="0",
    ),
]
SpeculativeOpt = Annotated[
    Literal["ngram", "model"] | None,
    typer.Option(
        help="Speculative decoding: draft tokens and check several in one trip through the swarm (ngram: drafts "
        "from the text so far; model: from --draft-model). The tokens stay the model's own: greedy output is "
        "unchanged, sampling keeps the model's distribution.",
        show_default="off",
    ),
]
DraftTokensOpt = Annotated[
    int, typer.Option(min=1, help="With --speculative: the most tokens drafted per trip (fewer while drafts miss).")
]
DraftModelOpt = Annotated[
    str | None,
    typer.Option(
        help="With --speculative model: a small local causal LM (a directory or hub id) with MODEL's tokenizer.",
        show_default=False,
    ),
]


ListenHostOpt = Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")]
ListenPortOpt = Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")]


def check_listen_host(host: str) -> None:
    """--host of the HTTP commands must be an IP address (a name would be looked up, and may not be this machine)."""
    import ipaddress

    from petals_cli.errors import ConfigError

    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--host {host!r} is not an IP address") from None


def api_extra_missing(error: ImportError):
    """The ConfigError to raise when the HTTP commands cannot import what the `api` extra installs."""
    from petals_cli.errors import ConfigError

    return ConfigError(f"the api extra is not installed ({error.name} missing)", hint="pip install 'petals-cli[api]'")


def trust_options(swarm_key: str | None, allowed_servers: list[str] | None, blocked_servers: list[str] | None) -> dict:
    """The ClientConfig fields of the shared trust options (None and empty defer to PETALS_* variables)."""
    return {
        "swarm_key": swarm_key,
        "allowed_servers": tuple(allowed_servers or ()),
        "blocked_servers": tuple(blocked_servers or ()),
    }


def speculation_options(speculative: str | None, draft_tokens: int, draft_model: str | None) -> dict:
    """The GenerationOptions fields of the shared speculation options; --draft-model comes with --speculative model
    and only with it (checked before anything loads: the draft model itself loads once MODEL is open)."""
    from petals_cli.errors import ConfigError

    if speculative == "model" and draft_model is None:
        raise ConfigError("--speculative model needs --draft-model PATH (a small model with MODEL's tokenizer)")
    if speculative != "model" and draft_model is not None:
        raise ConfigError("--draft-model drafts for --speculative model: add that, or leave out --draft-model")
    return {"speculative": speculative or "", "draft_tokens": draft_tokens}
