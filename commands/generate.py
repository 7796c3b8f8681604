"""`petals generate`: complete a prompt through the swarm."""

import json
import sys
from typing import Annotated

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    AdapterOpt,
    InitialPeersOpt,
    JsonOpt,
    ModelArg,
    ModelPrefixOpt,
    PromptsOpt,
    VerboseOpt,
)


@handle_errors
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue ('-' reads stdin).")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="How many tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling probability mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest tokens (0 = all).")] = 0,
    repetition_penalty: Annotated[float, typer.Option(min=0.0, help="Above 1 discourages repeats.")] = 1.0,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop at this text (repeatable); it is not printed.", show_default=False)
    ] = None,
    stream: Annotated[
        bool | None, typer.Option("--stream/--no-stream", help="Print tokens as they come.", show_default="on a tty")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same output).")] = None,
    initial_peers: InitialPeersOpt = None,
    model_prefix: ModelPrefixOpt = None,
    prompts: PromptsOpt = None,
    adapter: AdapterOpt = None,
    route_wait: Annotated[
        float | None, typer.Option(help="Seconds to wait for servers of missing blocks.", show_default="10")
    ] = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate a continuation of --prompt with MODEL's blocks served by the swarm."""
    from petals_cli.config import ClientConfig
    from petals_cli.generation import GenerationOptions, generate, open_model

    setup_logging(verbose)
    config = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()),
        model_prefix=model_prefix,
        route_wait=route_wait,
        active_adapter=adapter,
    )
    options = GenerationOptions(max_new_tokens, temperature, top_p, top_k, repetition_penalty, tuple(stop or ()), seed)
    prompt = sys.stdin.read() if prompt == "-" else prompt
    stream = sys.stdout.isatty() if stream is None else stream
    distributed, tokenizer = open_model(model, config, prompts=prompts)
    try:
        on_text = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if stream and not json_output else None
        result = generate(distributed, tokenizer, prompt, options, on_text=on_text)
    finally:
        distributed.close()
    if json_output:
        typer.echo(json.dumps(result.to_json()))
    else:
        typer.echo("" if on_text else result.text)
