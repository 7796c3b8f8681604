"""Whether a peer can be dialled from the swarm, found out through the swarm's own peers.

A server behind a NAT or a firewall can dial out but nobody can dial it. At start it asks the peers it joins through
(``check``) to open a TCP connection back to its listening port; each peer answers with the ``DIAL_BACK`` RPC that
every bootstrap peer and reachable server serves (``serve_dial_back``). A peer dials back only the address it sees
the request coming from (never one the asker names, so nobody can point it at a third machine), on the asker's
port, at most once per asker every ``DIAL_BACK_PERIOD`` seconds. A server most of whose peers could not dial it
then reserves a slot on relays (``daemon.create_p2p(relays=...)``) and is reached through their circuit
addresses, which it announces in its record (``ServerInfo.relay_addresses``, for people to read: a caller's daemon
finds a relayed peer by its id through the relays, which know its addresses).

This module owns the check; the server decides what to do with the answer (``server/host.py``),
and the daemon's flags are ``daemon``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from petals_cli.multiaddrs import ip_of

logger = logging.getLogger(__name__)
DIAL_BACK = "petals.dial_back"
DIAL_TIMEOUT = 3.0  # seconds a peer waits for the asker's port to accept a TCP connection
ASK_TIMEOUT = DIAL_TIMEOUT + 5.0  # seconds the asker waits for each answer (the round trip and the dial)
DIAL_BACK_PERIOD = 10.0  # seconds between two dial-backs for one asker
MAX_PEERS_ASKED = 5
REACHABLE, UNREACHABLE, REFUSED = "reachable", "unreachable", "refused"


# --- the peers' side ---------------------------------------------------------------------------------------------


class DialBack:
    """The handler of ``DIAL_BACK`` on one peer: dial the asker's own address on the port it names."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self.last: dict[PeerID, float] = {}
        self.running = asyncio.Semaphore(8)

    async def __call__(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertUID:
        return runtime_pb2.ExpertUID(uid=await self.answer(request.uid, context.remote_id))

    async def answer(self, text: str, asker: PeerID) -> str:
        now = time.monotonic()
        if not text.isdigit() or not 0 < int(text) < 65536:
            return REFUSED
        if now - self.last.get(asker, float("-inf")) < DIAL_BACK_PERIOD:
            return REFUSED
        self.last = {peer: when for peer, when in self.last.items() if now - when < DIAL_BACK_PERIOD}
        self.last[asker] = now
        host = await self._seen_host(asker)
        if host is None:  # reached through a relay, or gone already
            return UNREACHABLE
        async with self.running:
            return REACHABLE if await _accepts(host, int(text)) else UNREACHABLE

    async def _seen_host(self, asker: PeerID) -> str | None:
        seen = [
            ip_of(str(address))
            for peer in await self.p2p.list_peers()
            if peer.peer_id == asker
            for address in peer.addrs
        ]
        return next((host for host in seen if host is not None), None)


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


async def serve_dial_back(p2p: P2P) -> None:
    await p2p.add_protobuf_handler(DIAL_BACK, DialBack(p2p), runtime_pb2.ExpertUID)


# --- the asker's side --------------------------------------------------------------------------------------------


async def check(p2p: P2P, peers: Sequence[str], port: int) -> tuple[int, int]:
    """Ask up to ``MAX_PEERS_ASKED`` of ``peers`` (multiaddrs ending in ``/p2p/ID``) to dial ``port`` back; returns
    (peers that could, peers that answered). Peers that do not answer (older versions, gone) are not counted."""
    ids = list(dict.fromkeys(peer.rsplit("/p2p/", 1)[1] for peer in peers if "/p2p/" in peer))[:MAX_PEERS_ASKED]

    async def ask(peer_id: str) -> str | None:
        try:
            answer = await asyncio.wait_for(
                p2p.call_protobuf_handler(
                    PeerID.from_base58(peer_id), DIAL_BACK, runtime_pb2.ExpertUID(uid=str(port)), runtime_pb2.ExpertUID
                ),
                ASK_TIMEOUT,
            )
        except Exception:  # noqa: BLE001 (no answer: it does not count either way)
            logger.debug("no dial-back answer from %s", peer_id, exc_info=True)
            return None
        return answer.uid

    answers = await asyncio.gather(*(ask(peer_id) for peer_id in ids))
    counted = [answer for answer in answers if answer in (REACHABLE, UNREACHABLE)]
    return sum(answer == REACHABLE for answer in counted), len(counted)


def reachable(dialled: int, answered: int) -> bool:
    """Reachable unless most peers that answered could not dial back (none answering proves nothing)."""
    return answered == 0 or 2 * dialled >= answered
