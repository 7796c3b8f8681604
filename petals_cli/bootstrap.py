"""A DHT-only peer for private swarms: it hosts no blocks, it only lets others find each other.

``run_bootstrap`` starts a libp2p daemon and a DHT node (server mode), reports the multiaddrs others pass to
``--initial-peers``, and runs until SIGINT/SIGTERM. With ``identity_path`` its peer id survives restarts
(hivemind creates the key file when it is missing), so the address others configured stays valid.
Network hygiene comes from ``daemon.create_p2p``: a loopback host never probes the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from petals_cli.config import _FromSources, check_host, check_port, check_readable, check_writable_in

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapConfig(_FromSources):
    """Where the bootstrap peer listens and how it keeps its identity."""

    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str = ""
    identity_path: str = ""
    address_file: str = ""
    swarm_key: str = ""

    def __post_init__(self):
        check_port(self.port)
        check_host("--host", self.host)
        if self.announce_host:
            check_host("--announce-host", self.announce_host)
        check_writable_in("--identity", self.identity_path)
        check_writable_in("--address-file", self.address_file)
        check_readable("--swarm-key", self.swarm_key)


def initial_peers_line(maddrs: list[str]) -> str:
    """The exact option others should add to join through this peer."""
    return "--initial-peers " + " ".join(maddrs)


def run_bootstrap(config: BootstrapConfig, on_ready: Callable[[list[str]], None] | None = None) -> None:
    """Blocking entry point for `petals swarm bootstrap`; ``on_ready`` gets the multiaddrs once reachable."""
    asyncio.run(_serve(config, on_ready))


async def _serve(config: BootstrapConfig, on_ready: Callable[[list[str]], None] | None) -> None:
    from petals_cli import daemon, reachability, security
    from petals_cli.dht import start_dht
    from petals_cli.errors import SwarmUnreachableError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        p2p = await daemon.create_p2p(
            config.host,
            config.port,
            announce_host=config.announce_host or None,
            identity_path=config.identity_path or None,
        )
    except Exception as exc:  # a taken port or an unreadable identity file surface here
        raise SwarmUnreachableError(f"cannot start the bootstrap peer ({exc})") from exc
    node = None
    try:
        node = await start_dht(p2p, (), client_mode=False, swarm_key=security.SwarmKey.from_file(config.swarm_key))
        await reachability.serve_dial_back(p2p)  # servers joining through it find out whether they can be dialled
        maddrs = [str(addr) for addr in await p2p.get_visible_maddrs()]
        _write_address_file(config.address_file, maddrs)
        logger.info("bootstrap peer %s is up; stop it with Ctrl-C", p2p.peer_id)
        if on_ready is not None:
            on_ready(maddrs)
        await stop.wait()
    finally:
        if config.address_file:
            Path(config.address_file).unlink(missing_ok=True)
        if node is not None:
            await node.shutdown()
        await p2p.shutdown()
    logger.info("bootstrap peer stopped")


def _write_address_file(path: str, maddrs: list[str]) -> None:
    if not path:
        return
    temporary = Path(path).with_name(Path(path).name + ".tmp")
    temporary.write_text("".join(f"{maddr}\n" for maddr in maddrs))
    os.replace(temporary, path)
