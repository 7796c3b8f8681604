"""`petals finetune`: train prompts through the swarm's frozen blocks."""

import json
import sys
from typing import Annotated, Literal

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import InitialPeersOpt, JsonOpt, ModelArg, ModelPrefixOpt, VerboseOpt, VerifyOpt

_CLIENT_OPTIONS = ("initial_peers", "model_prefix", "verify", "json_output", "verbose")


@handle_errors
def finetune(
    model: ModelArg,
    dataset: Annotated[
        list[str],
        typer.Option(
            metavar="PATH",
            help="JSONL, JSON, CSV or text file, or a directory saved by datasets.",
            show_default=False,
        ),
    ],
    method: Annotated[
        Literal["ptune", "deep_ptune", "lora"],
        typer.Option(
            help="ptune: an input prefix; deep_ptune: per-block prompts too; lora: LoRA weights on the remote "
            "blocks, owned and trained by this client (saved as a peft adapter directory)."
        ),
    ] = "ptune",
    text_field: Annotated[str, typer.Option(help="The field holding the text (JSONL, CSV, saved datasets).")] = "text",
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per training sequence.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step.")] = 4,
    pre_seq_len: Annotated[int, typer.Option(min=1, help="Length of the trained prompt, in positions.")] = 16,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-2,
    steps: Annotated[int | None, typer.Option(min=1, help="Train this many steps.", show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Train this many epochs.", show_default="1")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the prompts' initial values and the data order.")] = 0,
    output: Annotated[
        str | None,
        typer.Option(help="Save prompts and trainer state here; without it nothing is saved.", show_default=False),
    ] = None,
    save_every: Annotated[int, typer.Option(min=0, help="Also save to --output every N steps (0 = at the end).")] = 0,
    resume: Annotated[
        str | None, typer.Option(help="Continue from this checkpoint directory.", show_default=False)
    ] = None,
    lora_r: Annotated[int, typer.Option(min=1, max=64, help="--method lora: the rank.")] = 8,
    lora_alpha: Annotated[float, typer.Option(min=0.0, help="--method lora: alpha (the scale is alpha / r).")] = 16.0,
    lora_target_modules: Annotated[
        list[str] | None,
        typer.Option(
            help="--method lora: modules to adapt, as peft names them (repeatable).", show_default="q_proj v_proj"
        ),
    ] = None,
    initial_peers: InitialPeersOpt = None,
    model_prefix: ModelPrefixOpt = None,
    verify: VerifyOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train soft prompts or a LoRA adapter for MODEL on a dataset.

    The swarm runs the frozen blocks forward and backward; --method picks ptune, deep_ptune or lora."""
    options = {name: value for name, value in locals().items() if name not in _CLIENT_OPTIONS}  # = config fields
    from petals_cli.config import ClientConfig, FinetuneConfig
    from petals_cli.finetune import finetune as run_finetune

    setup_logging(verbose)
    options.update(dataset=_one_dataset(dataset), steps=steps or 0, epochs=epochs or 0)
    options.update(output=output or "", resume=resume or "")
    options.update(lora_target_modules=tuple(lora_target_modules or ("q_proj", "v_proj")))
    config = FinetuneConfig(**options)
    client = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()), model_prefix=model_prefix, verify_rate=verify
    )
    with _Progress() as on_step:
        result = run_finetune(config, client, on_step=on_step)
    if json_output:
        typer.echo(json.dumps(result.to_json()))
    else:
        what = "LoRA adapter" if method == "lora" else "prompts"
        where = f"; {what} saved to {result.output}" if result.output else f"; {what} not saved (no --output)"
        typer.echo(f"trained {result.steps} steps, final loss {result.losses[-1]:.4f}{where}")


def _one_dataset(paths: list[str]) -> str:
    """The one --dataset: a repeated path is harmless, two different ones a mistake that the parser would settle by
    keeping the last without a word."""
    from pathlib import Path

    from petals_cli.errors import ConfigError

    distinct: dict[Path, str] = {}
    for path in paths:
        distinct.setdefault(Path(path).resolve(), path)
    if len(distinct) > 1:
        raise ConfigError(
            f"--dataset given {len(distinct)} different paths ({', '.join(distinct.values())}); finetune takes one",
            hint="join them into one file (e.g. `cat a.jsonl b.jsonl > both.jsonl`) and pass that",
        )
    return paths[0]


class _Progress:
    """A rich progress bar on stderr (only on a terminal) showing step, loss and tokens/s."""

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tokens/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("train", total=None, loss="—", speed="—")
        self.bar.start()
        return self.update

    def update(self, report) -> None:
        self.bar.update(
            self.task,
            completed=report.step,
            total=report.total_steps,
            loss=f"{report.loss:.4f}",
            speed=f"{report.tokens_per_second:.0f}",
        )

    def __exit__(self, *exc_info):
        if hasattr(self, "bar"):
            self.bar.stop()
