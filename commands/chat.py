"""`petals chat`: an interactive conversation through the swarm, one inference session across turns."""

import signal
import sys
import threading
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

HELP = "commands: /reset, /params [temperature=T top_p=P max_tokens=N], /stats, /save FILE, /help, /exit (or Ctrl-D)"


@handle_errors
def chat(
    model: ModelArg,
    system: Annotated[str, typer.Option(help="A system prompt.")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per reply.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling probability mass.")] = 1.0,
    max_length: Annotated[int, typer.Option(min=16, help="Longest conversation, in tokens.")] = 2048,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
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
    verbose: VerboseOpt = False,
) -> None:
    """Chat with MODEL in the terminal; replies stream as generated.

    Ctrl-C stops a reply, Ctrl-D leaves; /help lists the in-chat commands."""
    from petals_cli.chat import Conversation
    from petals_cli.config import ClientConfig
    from petals_cli.generation import GenerationOptions

    setup_logging(verbose)
    # Ctrl-C must stop a reply even when a parent shell started us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = ClientConfig.from_sources(
        initial_peers=tuple(initial_peers or ()),
        model_prefix=model_prefix,
        active_adapter=adapter,
        wire_dtype=wire_dtype,
        verify_rate=verify,
        **trust_options(swarm_key, allowed_servers, blocked_servers),
    )
    options = GenerationOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        **speculation_options(speculative, draft_tokens, draft_model),
    )
    distributed, tokenizer = open_model_with_feedback(model, config, prompts=prompts)
    conversation = Conversation(distributed, tokenizer, options, system=system, max_length=max_length)
    try:
        if draft_model is not None:
            from petals_cli.speculative import load_draft_model

            with spinner(f"Loading the draft model {draft_model}…"):
                conversation.draft_model = load_draft_model(draft_model, distributed)
        typer.echo(f"chatting with {model}; {HELP}", err=True)
        while (line := _read_line()) is not None:
            if line.startswith("/"):
                if not _command(conversation, line):
                    break
            elif line.strip():
                _reply(conversation, line)
    finally:
        conversation.close()
        distributed.close()


def _read_line() -> str | None:
    try:
        return input("> ")
    except EOFError:
        typer.echo("", err=True)
        return None
    except KeyboardInterrupt:
        typer.echo("", err=True)
        return ""


def _reply(conversation, text: str) -> None:
    from petals_cli.errors import PetalsError
    from petals_cli.textsafe import for_terminal

    errors: list[PetalsError] = []

    def show(piece: str) -> None:  # the model's control characters (ESC, BEL, \r, ...) must not drive the terminal
        sys.stdout.write(for_terminal(piece))
        sys.stdout.flush()

    def work():
        try:
            conversation.reply(text, on_text=show)
        except PetalsError as error:
            errors.append(error)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        try:
            worker.join(0.1)
        except KeyboardInterrupt:
            conversation.stop.set()  # the reply ends at the next token; the session stays consistent
            typer.echo(" [stopped]", err=True)
    typer.echo("")
    for error in errors:
        typer.echo(f"error: {error.message} (hint: {error.hint})", err=True)


def _command(conversation, line: str) -> bool:
    """Run an in-chat command; False means leave the chat."""
    name, _, argument = line.strip().partition(" ")
    if name == "/exit":
        return False
    if name == "/reset":
        conversation.reset()
        typer.echo("conversation reset", err=True)
    elif name == "/stats":
        typer.echo(
            f"context {conversation.position}/{conversation.max_length} tokens on the servers; "
            f"last turn sent {conversation.sent_last_turn} new tokens",
            err=True,
        )
        typer.echo(_speculation_stats(conversation), err=True)
    elif name == "/save" and argument:
        try:
            conversation.save(argument)
        except OSError as error:  # a bad path must not end the conversation
            typer.echo(f"cannot save to {argument}: {error.strerror or error}", err=True)
        else:
            typer.echo(f"saved to {argument}", err=True)
    elif name == "/save":
        typer.echo(f"/save needs a file name; {HELP}", err=True)
    elif name == "/params":
        from petals_cli.errors import ConfigError

        names = {"temperature": float, "top_p": float, "max_tokens": int}
        for pair in argument.split():
            key, _, value = pair.partition("=")
            if key not in names:
                typer.echo(f"unknown parameter {key!r}; known: {', '.join(names)}", err=True)
                continue
            try:
                conversation.set_options(**{"max_new_tokens" if key == "max_tokens" else key: names[key](value)})
            except ValueError:
                typer.echo(f"{key} needs a number, got {value!r}", err=True)
            except ConfigError as error:  # the same check as the command-line flags; the old value stays
                typer.echo(f"{error}; {key} unchanged", err=True)
        options = conversation.options
        typer.echo(
            f"temperature={options.temperature} top_p={options.top_p} max_tokens={options.max_new_tokens}", err=True
        )
    elif name == "/help":
        typer.echo(HELP, err=True)
    else:
        typer.echo(f"unknown command {name}; {HELP}", err=True)
    return True


def _speculation_stats(conversation) -> str:
    """/stats' line on speculative decoding: the figures of this conversation's replies."""
    mode = conversation.options.speculative
    if not mode:
        return "speculation off (start the chat with --speculative ngram|model to draft tokens)"
    figures = conversation.speculation.to_json()
    if not figures["trips"]:
        return f"speculation {mode}: no reply yet"
    acceptance = "-" if figures["acceptance"] is None else f"{figures['acceptance']:.0%}"
    return (
        f"speculation {mode}: {figures['trips']} trips, {figures['drafted']} tokens drafted, {figures['accepted']} "
        f"accepted (acceptance {acceptance}), {figures['tokens_per_trip']} tokens per trip"
    )
