"""`petals bench`: throughput through the swarm, side by side with local transformers."""

import json
from typing import Annotated

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    AllowedServersOpt,
    BlockedServersOpt,
    InitialPeersOpt,
    JsonOpt,
    ModelArg,
    ModelPrefixOpt,
    SwarmKeyOpt,
    VerboseOpt,
    trust_options,
)


@handle_errors
def bench(
    model: ModelArg,
    mode: Annotated[str, typer.Option(help="inference, forward, training or all.")] = "all",
    seq_len: Annotated[int, typer.Option(min=1, help="Prompt / sequence length in tokens.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per request.")] = 1,
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per inference run.")] = 128,
    repeats: Annotated[int, typer.Option(min=1, help="Measured runs per figure (after one warm-up).")] = 3,
    compare_local: Annotated[
        bool, typer.Option("--compare-local", help="Also run the model locally in transformers; report ratios.")
    ] = False,
    local_swarm: Annotated[
        int, typer.Option(min=0, help="Start N servers on 127.0.0.1 splitting the blocks; stop them after.")
    ] = 0,
    initial_peers: InitialPeersOpt = None,
    model_prefix: ModelPrefixOpt = None,
    swarm_key: SwarmKeyOpt = None,
    allowed_servers: AllowedServersOpt = None,
    blocked_servers: BlockedServersOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure inference steps/s, time to first token, forward and training tokens/s (medians, min-max)."""
    from petals_cli.bench import run_bench
    from petals_cli.config import BenchConfig, ClientConfig

    setup_logging(verbose)
    config = BenchConfig(model, mode, seq_len, batch_size, new_tokens, repeats, compare_local, local_swarm)
    client = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()),
        model_prefix=model_prefix,
        **trust_options(swarm_key, allowed_servers, blocked_servers),
    )
    if not local_swarm and not client.initial_peers:
        from petals_cli.errors import ConfigError

        raise ConfigError("bench needs a swarm: pass --initial-peers, or --local-swarm N to start one")
    report = run_bench(config, client)
    if json_output:
        typer.echo(json.dumps(report.to_json()))
        return
    _render(report)


def _render(report) -> None:
    from rich.console import Console
    from rich.table import Table

    ratios = report.ratios()
    table = Table(
        title=f"petals bench {report.model}" + (f" ({len(report.servers)} local servers)" * bool(report.servers))
    )
    for column in ("figure", "swarm", "local", "swarm/local"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name, measured in report.swarm.items():
        local = report.local.get(name)
        table.add_row(
            f"{measured.name} ({measured.unit})",
            f"{measured.median:.4g} [{measured.low:.4g}–{measured.high:.4g}]",
            f"{local.median:.4g} [{local.low:.4g}–{local.high:.4g}]" if local else "—",
            f"{ratios[name]:.3f}×" if name in ratios else "—",
        )
    Console().print(table)
