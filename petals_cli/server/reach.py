"""How a server makes itself reachable: a dial-back check at start, and a relay when peers cannot dial it.

``reach`` takes the daemon a server started with; when the check (``reachability.check``) says most peers cannot
open a connection to it (a home router, a cloud NAT, a firewall), it restarts the daemon as an unreachable peer
with slots reserved on the reachable peers it joined through (bootstrap peers: libp2p circuit relay v2, run by
hivemind's daemon), waits for its relayed addresses, and says so in one log line. No relay in ``RELAY_TIMEOUT``
is one clear error saying what to do instead. Loopback swarms and servers given ``--announce-host`` (their operator
forwarded a port) are not checked.

``watch`` keeps a relayed server's relayed addresses current (a relay that leaves takes its address with it).
This module knows the check (``reachability``); the host starts the daemon (``daemon``) and announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from hivemind.p2p import P2P

from petals_cli import multiaddrs, reachability
from petals_cli.errors import NotDialableError

logger = logging.getLogger(__name__)
RELAY_TIMEOUT = 30.0  # seconds to wait for a relayed address after restarting behind relays
WATCH_PERIOD = 5.0


async def visible_addresses(p2p: P2P) -> list[str]:
    """The daemon's current addresses (hivemind's ``get_visible_maddrs`` keeps the ones read at start)."""
    try:
        return [str(address) for address in await p2p.get_visible_maddrs(latest=True)]
    except ValueError:  # an unreachable peer has no address until a relay grants it one
        return []


async def reach(
    p2p: P2P,
    initial_peers: list[str],
    restart: Callable[[list[str]], Awaitable[P2P]],
    *,
    check: bool,
) -> tuple[P2P, tuple[str, ...]]:
    """The daemon to serve from and its relayed addresses (none for a reachable server). ``restart(relays)`` starts
    the daemon again behind those relays, after this one has shut down."""
    if not check or not initial_peers:
        return p2p, ()
    port = multiaddrs.tcp_port(await visible_addresses(p2p))
    if port is None:
        return p2p, ()
    dialled, answered = await reachability.check(p2p, initial_peers, port)
    if reachability.reachable(dialled, answered):
        logger.debug("reachable: %d of %d peers dialled port %d back", dialled, answered, port)
        return p2p, ()
    await p2p.shutdown()
    started = time.monotonic()
    p2p = await restart(initial_peers)
    try:
        relayed = await _relayed_addresses(p2p, RELAY_TIMEOUT)
    except BaseException:
        await p2p.shutdown()
        raise
    if not relayed:
        await p2p.shutdown()
        raise NotDialableError(
            f"this server cannot be dialled ({answered - dialled} of {answered} peers could not connect to port "
            f"{port}) and none of its initial peers granted it a relay slot in {RELAY_TIMEOUT:.0f}s",
            hint="forward a TCP port of your router to this machine and pass --port PORT --announce-host PUBLIC_IP, "
            "or pass --initial-peers of a reachable peer with a public address (it relays)",
        )
    relays = sorted({multiaddrs.relay_of(address) for address in relayed})
    logger.info(
        "behind a NAT or firewall (%d of %d peers could not dial port %d): reachable through relay %s after %.1fs",
        answered - dialled,
        answered,
        port,
        ", ".join(relays),
        time.monotonic() - started,
    )
    return p2p, relayed


async def _relayed_addresses(p2p: P2P, timeout: float) -> tuple[str, ...]:
    deadline = time.monotonic() + timeout
    while not (relayed := multiaddrs.relayed_addresses(await visible_addresses(p2p))):
        if time.monotonic() > deadline:
            return ()
        await asyncio.sleep(0.25)
    return relayed


async def watch(p2p: P2P, relayed: tuple[str, ...], update: Callable[[tuple[str, ...]], None]) -> None:
    """Call ``update`` with a relayed server's addresses whenever they change (a relay left, one was added)."""
    while True:
        await asyncio.sleep(WATCH_PERIOD)
        with contextlib.suppress(Exception):  # a busy daemon: next time
            current = multiaddrs.relayed_addresses(await visible_addresses(p2p))
            if current != relayed:
                if current:
                    logger.info("relayed addresses now: %s", " ".join(current))
                else:
                    logger.warning("no relay holds a slot for this server now; clients cannot reach it until one does")
                relayed = current
                update(current)
