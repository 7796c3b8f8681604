"""Typed errors shared by the client, the server and the CLI.

Every error carries a one-line ``hint`` telling the user what to do next and a fixed ``exit_code`` the CLI uses.
Errors that cross the wire are identified by their class name (``code``); see ``error_from_wire``.
This module imports nothing heavy: the CLI loads it to render errors.
"""

from __future__ import annotations

from petals_cli.textsafe import ERROR_CHARACTERS, shown


class PetalsError(Exception):
    """Base class: a message, a next-step hint and a CLI exit code."""

    hint: str = ""
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def code(self) -> str:
        return type(self).__name__

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(PetalsError):
    """Options that contradict each other or cannot be parsed."""

    hint = "check the command's --help for the accepted values"
    exit_code = 2


class ModelNotFoundError(PetalsError):
    """The model path or hub repository cannot be found or read."""

    hint = "pass a local directory with config.json and *.safetensors, or a hub repository id"
    exit_code = 3


class UnsupportedModelError(PetalsError):
    """The checkpoint's architecture has no family adapter."""

    hint = "see README for the supported model families"
    exit_code = 3


class SwarmUnreachableError(PetalsError):
    """No initial peer answered, so the DHT could not be joined."""

    hint = "check --initial-peers (or PETALS_INITIAL_PEERS); start a swarm with `petals serve MODEL --new-swarm`"
    exit_code = 4


class NotDialableError(PetalsError):
    """A server that no peer of the swarm can dial, and that no relay took."""

    hint = "forward a TCP port to this machine and pass --port PORT --announce-host PUBLIC_IP"
    exit_code = 4


class NoRouteError(PetalsError):
    """Some blocks of the model are held by no live server."""

    hint = "start a server for them: `petals serve MODEL --blocks START:END --initial-peers ...`"
    exit_code = 5

    def __init__(self, message: str, *, missing_blocks: tuple[int, ...] = (), hint: str | None = None):
        super().__init__(message, hint=hint)
        self.missing_blocks = tuple(missing_blocks)


class ModelNotServedError(NoRouteError):
    """No server in the swarm announces any block of this model."""

    hint = "start servers with `petals serve MODEL --blocks START:END`, or check the model name"


class InvalidRequestError(PetalsError):
    """A request that a server refused before computing anything."""

    hint = "this is a client/server mismatch or a bug; set PETALS_DEBUG=1 and report it"
    exit_code = 6


class ProtocolMismatchError(InvalidRequestError):
    """Client and server speak different protocol versions."""

    hint = "upgrade petals on the older side so both use the same protocol version"


class CacheExhaustedError(PetalsError):
    """A server has no room left in its attention-cache budget for this session."""

    hint = "ask for a shorter max_length, or try again when other sessions end"
    exit_code = 7


class ServerError(PetalsError):
    """A server failed while computing a request."""

    hint = "the server logs have the details; try again or use another server"
    exit_code = 8


class BlocksNotHeldError(ServerError):
    """The server does not hold the blocks asked for: it moved to others since the client read its record. Clients
    route those blocks elsewhere (as for any ServerError; older clients read it as one)."""

    hint = "the server moved to other blocks; the client routes around it"


class SessionLengthError(PetalsError):
    """An inference session was asked to go past its max_length."""

    hint = "open a session with a larger max_length, or start a new one"
    exit_code = 9


class SessionExpiredError(PetalsError):
    """A server closed an inference session that sent no step for longer than its idle timeout."""

    hint = "open a new session; servers close sessions that send no step for their --session-idle-timeout"
    exit_code = 10


class PeerLimitError(CacheExhaustedError):
    """A server refused a session because this peer already holds its share of the server's sessions."""

    hint = "close some sessions, or let the client use another server; servers cap sessions per peer"


class RequestTooLargeError(InvalidRequestError):
    """A request's tensors are larger than the server accepts in one request."""

    hint = "send smaller batches or fewer tokens per request; servers cap one request's size"


class SwarmKeyError(PetalsError):
    """A peer of a private swarm refused this peer: the swarm key is missing, wrong, or not expected."""

    hint = "every peer of a private swarm needs the same --swarm-key FILE (or PETALS_SWARM_KEY); public peers none"
    exit_code = 11


class SelfCheckError(PetalsError):
    """At start-up, petals' way of running transformers' layers disagreed with transformers' own computation."""

    hint = "install the versions petals was tested with (`pip install -c constraints.txt`, from its repository)"
    exit_code = 12


class VerificationError(PetalsError):
    """Replicas of the same blocks disagreed and no majority could say which server was wrong."""

    hint = "servers holding these blocks compute differently: report them, or leave them out with --blocked-servers"
    exit_code = 13


WIRE_ERRORS: dict[str, type[PetalsError]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequestError,
        ProtocolMismatchError,
        CacheExhaustedError,
        ServerError,
        BlocksNotHeldError,
        SessionLengthError,
        SessionExpiredError,
        PeerLimitError,
        RequestTooLargeError,
        SwarmKeyError,
    )
}


def error_from_wire(code: str, message: str) -> PetalsError:
    """Rebuild a typed error a server sent back; unknown codes become ``ServerError``. The message is another
    peer's text: it becomes one bounded line with control characters made visible before anyone logs or shows it."""
    return WIRE_ERRORS.get(code, ServerError)(shown(message, ERROR_CHARACTERS))
