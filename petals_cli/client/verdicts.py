"""What every check decides and shares: typed verdicts, the vote of a third replica, and one client's verifier.

A check (``checks``) ends in a ``Verdict``; only ``ServerCaught`` asks the caller to change anything. ``vote`` is
the one arbitration of inference checks and of forward/backward checks alike. ``Verifier`` is what all checks of
one swarm connection share: the seeded draws (one sequence per run), the servers already checked, the counts the
CLI reports, and the identity that signs evidence against a server caught computing wrongly (``evidence``).

Never imports the session, replay or push; changes no route.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from petals_cli.client.streams import Connection, ServerFailure, SpanStream
from petals_cli.errors import NoRouteError, VerificationError
from petals_cli.routing import RouteSpan
from petals_cli.verify import VerificationCounts, compare

logger = logging.getLogger(__name__)


# --- verdicts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confirmed:
    """The replica agreed with the server on ``tokens`` more tokens (a request: on its outputs)."""

    tokens: int = 0


@dataclass(frozen=True)
class Unverifiable:
    """No other server holds these blocks: the server's outputs stand unchecked."""


@dataclass(frozen=True)
class ReplicaFailed:
    """The replica failed (it is dropped; another one checks later); the server's outputs stand."""

    reason: str


@dataclass(frozen=True)
class ReplicaCaught:
    """The replica was outvoted (banned and reported): the server's outputs stand, and the judge checks it now."""

    peers: tuple[str, ...]


@dataclass(frozen=True)
class Superseded:
    """The check no longer applies: its tokens were rolled back or redone, or it was abandoned."""


@dataclass(frozen=True)
class ServerCaught:
    """The server was outvoted (banned and reported). ``replacement`` (the replica's streams; none for a request)
    takes its place; ``honest`` are the true outputs of the tokens the check covered, from ``start`` to ``end``
    (where the replacement's caches end: the server may have been sent more since), and ``position`` is the first
    one the server got wrong."""

    replacement: list[SpanStream]
    honest: torch.Tensor | list[torch.Tensor]
    position: int = 0
    start: int = 0
    end: int = 0


Verdict = Confirmed | Unverifiable | ReplicaFailed | ReplicaCaught | Superseded | ServerCaught


_VERIFIERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Outvoted:
    """What a caught server's evidence holds: the ``inputs`` it was given, its ``wrong`` outputs, the ``right``
    ones, and the peer ids of the ``witnesses`` that computed them."""

    inputs: torch.Tensor
    wrong: torch.Tensor
    right: torch.Tensor
    witnesses: list[str]


class Verifier:
    """What all checks of one client share: the seeded draws, the servers already checked once, what was found,
    and the identity that signs evidence. One per swarm connection (``Verifier.of``)."""

    def __init__(self, rate: float, seed: int | None):
        self.rate = rate
        self.rng = random.Random(seed)  # which steps and requests are re-run elsewhere
        self.verified_peers: set[str] = set()  # servers whose first forward/backward request was checked
        self.counts = VerificationCounts()
        self._reporter = None

    @classmethod
    def of(cls, conn: Connection) -> Verifier:
        """The verifier of ``conn``, made at first use (its draws are one sequence for the whole run). It holds no
        reference to ``conn``, so it goes with the connection."""
        verifier = _VERIFIERS.get(conn)
        if verifier is None:
            verifier = _VERIFIERS[conn] = cls(conn.config.verify_rate, conn.config.verify_seed)
        return verifier

    def confirmed(self, outputs: int) -> None:
        self.counts.checks += 1
        self.counts.outputs += outputs

    def caught(
        self, conn: Connection, prefix: str, span: RouteSpan, what: str, kind: str, position: int, proof: Outvoted
    ) -> None:
        """Ban a server caught computing wrongly for the rest of the run, say so (it returned ``what``), and keep
        signed evidence of ``proof``."""
        conn.ban_forever(span.peer_id)
        self.counts.caught.append(span.peer_id)
        logger.warning(
            "server %s (blocks %d:%d) returned %s (outvoted by %s); banned for this run",
            span.peer_id[-8:],
            span.start,
            span.end,
            what,
            ", ".join(peer[-8:] for peer in proof.witnesses),
        )
        self._report(prefix, kind, span, position, proof)

    def _report(self, prefix: str, kind: str, span: RouteSpan, position: int, proof: Outvoted) -> None:
        """Write signed evidence that ``span``'s server computed ``proof.wrong`` where the witnesses computed
        ``proof.right`` (see ``evidence``); a log that cannot be written is a warning, never a failure."""
        from petals_cli import evidence

        comparison = compare(proof.wrong, proof.right)
        try:
            if self._reporter is None:
                self._reporter = evidence.reporter_identity()
            record = evidence.Evidence(
                kind=kind,
                prefix=prefix,
                start=span.start,
                end=span.end,
                position=position,
                inputs_sha256=evidence.tensor_sha256(proof.inputs),
                suspect=span.peer_id,
                suspect_sha256=evidence.tensor_sha256(proof.wrong),
                witnesses=tuple(proof.witnesses),
                witness_sha256=evidence.tensor_sha256(proof.right),
                max_error=comparison.max_error,
                tolerance=comparison.tolerance,
                time=time.time(),
            )
            evidence.append(evidence.sign(record, self._reporter))
        except Exception as exc:  # a read-only home or a full disk must not stop generation
            logger.warning("could not write the evidence against %s: %s", span.peer_id[-8:], exc)


@dataclass(frozen=True)
class Vote:
    """A third replica's decision: whether the server was right, and the judges' peer ids."""

    server_right: bool
    witnesses: list[str]


async def vote(
    span: RouteSpan,
    replica_peers: list[str],
    judge: Callable[[set[str]], Awaitable[tuple[list[str], object]]],
    agrees: Callable[[object, object], bool],
    answers: tuple[object, object],
    *,
    disagreement: str,
    outputs: str = "outputs",
) -> Vote:
    """``span``'s server and its replica (``replica_peers``) gave ``answers`` (server's, replica's) that disagree:
    ``judge(exclude)`` runs the same work on other servers and returns (their peer ids, their answer). Without a
    majority, a ``VerificationError`` that names every server (``disagreement`` says how the two disagree)."""
    names = f"{span.peer_id} and {', '.join(replica_peers)}"
    where = f"blocks {span.start}:{span.end}"
    try:
        judges, verdict = await judge({span.peer_id, *replica_peers})
    except NoRouteError:
        raise VerificationError(
            f"{where}: servers {names} {disagreement} and no third server holds these blocks to decide which is wrong"
        ) from None
    except ServerFailure as failure:
        raise VerificationError(
            f"{where}: servers {names} disagree and the third server failed ({failure})"
        ) from failure
    server_right, replica_right = (agrees(answer, verdict) for answer in answers)
    if server_right == replica_right:
        raise VerificationError(f"{where}: servers {names} and {', '.join(judges)} compute three different {outputs}")
    return Vote(server_right, judges)
