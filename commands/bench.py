"""`petals bench`: throughput through the swarm, side by side with local transformers."""

import json
from typing import Annotated, Literal

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    AllowedServersOpt,
    BlockedServersOpt,
    DraftModelOpt,
    DraftTokensOpt,
    InitialPeersOpt,
    JsonOpt,
    ModelArg,
    ModelPrefixOpt,
    SpeculativeOpt,
    SwarmKeyOpt,
    VerboseOpt,
    VerifyOpt,
    WireDtypeOpt,
    speculation_options,
    trust_options,
)
from petals_cli.commands._progress import spinner


@handle_errors
def bench(
    model: ModelArg,
    mode: Annotated[Literal["inference", "forward", "training", "all"], typer.Option(help="What to measure.")] = "all",
    seq_len: Annotated[int, typer.Option(min=1, help="Prompt / sequence length in tokens.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per request.")] = 1,
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per inference run.")] = 128,
    repeats: Annotated[int, typer.Option(min=1, help="Measured runs per figure (after a warm-up).")] = 3,
    compare_local: Annotated[
        bool, typer.Option("--compare-local", help="Also run the model locally in transformers; report ratios.")
    ] = False,
    local_swarm: Annotated[
        int, typer.Option(min=0, help="Start N servers on 127.0.0.1 splitting the blocks; stop them after.")
    ] = 0,
    sessions: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="Also run N inference sessions at once: aggregate tokens/s and step latency."
        ),
    ] = 1,
    speculative: SpeculativeOpt = None,
    draft_tokens: DraftTokensOpt = 8,
    draft_model: DraftModelOpt = None,
    initial_peers: InitialPeersOpt = None,
    model_prefix: ModelPrefixOpt = None,
    swarm_key: SwarmKeyOpt = None,
    allowed_servers: AllowedServersOpt = None,
    blocked_servers: BlockedServersOpt = None,
    verify: VerifyOpt = None,
    wire_dtype: WireDtypeOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure inference and training speed through the swarm.

    Steps/s, time to first token, forward and training tokens/s (medians, min-max); --speculative: drafts accepted."""
    from petals_cli.config import BenchConfig, ClientConfig
    from petals_cli.errors import ConfigError

    setup_logging(verbose)
    config = BenchConfig(model, mode, seq_len, batch_size, new_tokens, repeats, compare_local, local_swarm, sessions)
    speculation = speculation_options(speculative, draft_tokens, draft_model)
    if speculative:
        _check_speculation(config)
    client = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()),
        model_prefix=model_prefix,
        wire_dtype=wire_dtype,
        verify_rate=verify,
        **trust_options(swarm_key, allowed_servers, blocked_servers),
    )
    if not local_swarm and not client.initial_peers:
        raise ConfigError("bench needs a swarm: pass --initial-peers, or --local-swarm N to start one")
    with spinner("Loading petals…") as feedback:
        from petals_cli.bench import run_bench

        def on_phase(phase: str) -> None:
            feedback.say(f"{phase[:1].upper()}{phase[1:]}…")

        report = run_bench(config, client, on_phase, feedback.route_wait, draft_model=draft_model, **speculation)
    if json_output:
        typer.echo(json.dumps(report.to_json()))
        return
    _render(report)


def _check_speculation(config) -> None:
    """What --speculative cannot go with: it speeds up inference, one prompt at a time, through the swarm."""
    from petals_cli.errors import ConfigError

    problems = [
        (config.batch_size > 1, f"--batch-size {config.batch_size}: speculation continues one prompt at a time"),
        (config.mode not in ("inference", "all"), f"--mode {config.mode}: speculation speeds up inference only"),
        (config.compare_local, "--compare-local: local transformers runs plain decoding (bench without speculation)"),
    ]
    for wrong, message in problems:
        if wrong:
            raise ConfigError(f"--speculative with {message}")


def _render(report) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from petals_cli.measurements import SPREAD_LIMIT

    ratios, unstable, repeats = report.ratios(), report.unstable(), report.config["repeats"]
    title = escape(f"petals bench {report.model}") + f" ({len(report.servers)} local servers)" * bool(report.servers)
    if report.config.get("speculative"):
        title += (
            f", speculative {report.config['speculative']} (at most {report.config['draft_tokens']} drafts a trip)"
        )
    table = Table(title=title, caption=f"median of {repeats} run{'s' * (repeats != 1)} ± half their range")
    for column in ("figure", "swarm", "local", "swarm/local"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name, measured in report.swarm.items():
        local = report.local.get(name)
        table.add_row(
            f"{measured.name} ({measured.unit})",
            _cell(measured, f"swarm.{name}" in unstable),
            _cell(local, f"local.{name}" in unstable) if local else "—",
            f"{ratios[name]:.3f}×" if name in ratios else "—",
        )
    console = Console()
    console.print(table)
    if unstable:
        load, cpus = report.machine.get("load_average"), report.machine.get("cpus")
        busy = f" on a machine with load {load} on {cpus} CPUs" * (load is not None)
        console.print(
            f"[yellow]warning:[/] the runs of {len(unstable)} figure(s) (marked !) differ by more than "
            f"{SPREAD_LIMIT:.0%} of their median{busy}: not reliable; rerun on an idle machine or with more --repeats"
        )


def _cell(measured, unstable: bool) -> str:
    """The median ± half the runs' range (as a share of the median), and ! when they differ too much."""
    median = f"{measured.median:,.0f}" if measured.median >= 1000 else f"{measured.median:.4g}"
    return f"{median} ±{measured.spread / 2:.0%}" + (" !" if unstable else "")
