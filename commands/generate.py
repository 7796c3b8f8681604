"""`petals generate`: complete a prompt through the swarm."""

import json
import sys
from typing import Annotated

import typer

from petals_cli.commands._errors import handle_errors, setup_logging
from petals_cli.commands._options import (
    AdapterOpt,
    AllowedServersOpt,
    BlockedServersOpt,
    DraftModelOpt,
    DraftTokensOpt,
    InitialPeersOpt,
    JsonOpt,
    ModelArg,
    ModelPrefixOpt,
    PromptsOpt,
    SpeculativeOpt,
    SwarmKeyOpt,
    VerboseOpt,
    VerifyOpt,
    WireDtypeOpt,
    speculation_options,
    trust_options,
)
from petals_cli.commands._progress import open_model_with_feedback, spinner


@handle_errors
def generate(
    model: ModelArg,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The text to continue ('-' reads stdin).", show_default=False)
    ] = None,
    prompts_file: Annotated[
        str | None,
        typer.Option(
            help="Continue every prompt of FILE (one per line, or JSON lines) in padded batches (one prompt at "
            "a time with --speculative).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch with --prompts-file.")] = 8,
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
    speculative: SpeculativeOpt = None,
    draft_tokens: DraftTokensOpt = 8,
    draft_model: DraftModelOpt = None,
    initial_peers: InitialPeersOpt = None,
    model_prefix: ModelPrefixOpt = None,
    swarm_key: SwarmKeyOpt = None,
    allowed_servers: AllowedServersOpt = None,
    blocked_servers: BlockedServersOpt = None,
    verify: VerifyOpt = None,
    prompts: PromptsOpt = None,
    adapter: AdapterOpt = None,
    wire_dtype: WireDtypeOpt = None,
    route_wait: Annotated[
        float | None, typer.Option(help="Seconds to wait for servers of missing blocks.", show_default="10")
    ] = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Continue a prompt with MODEL, its blocks run by the swarm.

    Generates a continuation of --prompt, or of every prompt in --prompts-file."""
    from petals_cli.config import ClientConfig
    from petals_cli.errors import ConfigError

    with spinner("Loading petals…"):  # torch and transformers: seconds of a blank terminal otherwise
        from petals_cli.generation import GenerationOptions, generate, generate_batch, read_prompts
    from petals_cli.textsafe import escape_line, for_terminal

    setup_logging(verbose)
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give either --prompt or --prompts-file")
    config = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()),
        model_prefix=model_prefix,
        route_wait=route_wait,
        active_adapter=adapter,
        wire_dtype=wire_dtype,
        verify_rate=verify,
        **trust_options(swarm_key, allowed_servers, blocked_servers),
    )
    options = GenerationOptions(
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        tuple(stop or ()),
        seed,
        **speculation_options(speculative, draft_tokens, draft_model),
    )
    if prompts_file is not None:
        texts = read_prompts(prompts_file)
        if not texts:
            raise ConfigError(f"no prompts in {prompts_file}")
        distributed, tokenizer = open_model_with_feedback(model, config, prompts=prompts)
        try:
            drafting = _drafting(draft_model, distributed)
            for first in range(0, len(texts), batch_size):
                results = generate_batch(
                    distributed, tokenizer, texts[first : first + batch_size], options, **drafting
                )
                for index, result in enumerate(results, first):  # one line per result, whatever the text holds
                    typer.echo(
                        json.dumps({"index": index, **result.to_json()}) if json_output else escape_line(result.text)
                    )
            if config.verify_rate > 0:
                typer.echo(distributed.petals_verification.summary(), err=True)
        finally:
            distributed.close()
        return
    prompt = sys.stdin.read() if prompt == "-" else prompt
    stream = sys.stdout.isatty() if stream is None else stream
    # one result, printed as it is; only a terminal gets control characters as visible escapes
    show = for_terminal if sys.stdout.isatty() else str
    distributed, tokenizer = open_model_with_feedback(model, config, prompts=prompts)
    try:
        drafting = _drafting(draft_model, distributed)
        on_text = (lambda text: print(show(text), end="", flush=True)) if stream and not json_output else None
        result = generate(distributed, tokenizer, prompt, options, on_text=on_text, **drafting)
    finally:
        distributed.close()
    verification = distributed.petals_verification if config.verify_rate > 0 else None
    if json_output:
        extra = {} if verification is None else {"verification": verification.to_json()}
        typer.echo(json.dumps({**result.to_json(), **extra}))
    else:  # print, not typer.echo: echo strips ANSI sequences from redirected text
        print("" if on_text else show(result.text))
        if verification is not None:
            typer.echo(verification.summary(), err=True)


def _drafting(draft_model: str | None, distributed) -> dict:
    """generate()'s draft model argument: loaded once, checked against MODEL's vocabulary (none without one)."""
    if draft_model is None:
        return {}
    from petals_cli.speculative import load_draft_model

    with spinner(f"Loading the draft model {draft_model}…"):
        return {"draft_model": load_draft_model(draft_model, distributed)}
