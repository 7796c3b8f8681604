"""The error map: a typed petals error becomes one line on stderr, a hint, and a fixed exit code."""

import functools
import logging
import os
import sys

import typer

DEBUG_VARIABLE = "PETALS_DEBUG"


def setup_logging(verbose: bool = False) -> None:
    """Logs go to stderr in one compact line each; results own stdout."""
    level = logging.DEBUG if verbose or os.environ.get(DEBUG_VARIABLE) == "1" else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING if level > logging.DEBUG else logging.DEBUG)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # asyncio warns about event loops that hivemind's daemon left behind at exit: nothing a user can act on
    logging.getLogger("asyncio").setLevel(logging.ERROR if level > logging.DEBUG else logging.DEBUG)


def handle_errors(function):
    """Run a command body; map petals errors (and a few others) to one line and an exit code."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from petals_cli.errors import PetalsError

        try:
            return function(*args, **kwargs)
        except PetalsError as error:
            _report(f"{error.message}", error.hint, error.exit_code)
        except KeyboardInterrupt:
            _report("interrupted", "", 130)
        except Exception as error:  # anything unexpected: still one line, the traceback on request
            _report(f"unexpected {type(error).__name__}: {error}", "this is a bug; please report it", 70)

    return wrapper


def _report(message: str, hint: str, exit_code: int) -> None:
    if os.environ.get(DEBUG_VARIABLE) == "1" and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    line = f"error: {message}"
    if hint:
        line += f" (hint: {hint})"
    if os.environ.get(DEBUG_VARIABLE) != "1":
        line += f"; set {DEBUG_VARIABLE}=1 for the traceback"
    typer.echo(line, err=True)
    raise typer.Exit(exit_code)
