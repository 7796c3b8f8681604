"""Starting a peer's libp2p daemon (hivemind's ``P2P``) with the options its role needs.

Loopback peers never probe the network (no NAT mapping, relays or auto-NAT). Servers and bootstrap peers off
loopback listen and relay for others within ``RELAY_LIMITS``; clients off loopback listen too (a server behind a NAT
dials its caller back to upgrade a relayed connection) but relay for nobody; a server nobody can dial starts behind
relays (``server/reach.py``). hivemind's ``P2P.create`` has no argument for some daemon flags: ``_Daemon`` adds
them. This module owns start-up only; what travels over the daemon is ``transport``'s.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from hivemind.p2p import P2P

from petals_cli import hivemind_fix  # noqa: F401 (patches hivemind's daemon reader on import)

# what one relay grants (circuit relay v2, in hivemind's daemon): a reachable peer relays for others within these
RELAY_LIMITS = {
    "relayMaxReservations": 128,  # peers holding a slot on this relay at once
    "relayMaxCircuits": 16,  # relayed connections open at once per peer
    "relayDataLimit": 2**32,  # bytes each way on one relayed connection before the relay resets it
    "relayTimeLimit": "30m",  # how long one relayed connection may last (a session then fails over)
}


class _Daemon(P2P):
    """hivemind's P2P with daemon flags that ``P2P.create`` has no argument for (``flags``, set per subclass)."""

    flags: dict = {}

    @classmethod
    def _make_process_args(cls, *args, **kwargs) -> list[str]:
        return P2P._make_process_args(*args, **{**kwargs, **cls.flags})


async def create_p2p(
    host: str = "127.0.0.1",
    port: int = 0,
    initial_peers: Sequence[str] = (),
    *,
    announce_host: str | None = None,
    identity_path: str | None = None,
    client_mode: bool = False,
    fresh_identity: bool = False,
    relays: Sequence[str] = (),
) -> P2P:
    """Start a libp2p daemon (see ``daemon_options``)."""
    kwargs, flags = daemon_options(
        host, port, initial_peers, announce_host=announce_host, client_mode=client_mode, relays=relays
    )
    kwargs.update(identity_path=identity_path, check_if_identity_free=not fresh_identity)
    daemon = type("Daemon", (_Daemon,), {"flags": flags}) if flags else P2P
    return await daemon.create(**kwargs)


def daemon_options(
    host: str,
    port: int,
    initial_peers: Sequence[str],
    *,
    announce_host: str | None = None,
    client_mode: bool = False,
    relays: Sequence[str] = (),
) -> tuple[dict, dict]:
    """``P2P.create``'s arguments and the daemon's extra flags. Loopback hosts never probe the network (no NAT
    mapping, relays or auto-NAT). Other listening peers relay for others within ``RELAY_LIMITS``. With ``relays``
    (multiaddrs of reachable peers) the peer is taken to be unreachable: it reserves a slot on those relays at once
    (discovering relays instead waits minutes before the first reservation) and is dialled through them."""
    local = is_loopback(host)
    # a client off loopback listens too, relaying for nobody: a server behind a NAT can then reach it directly
    # (libp2p's hole punching dials the relayed peer's caller back; a peer that does not listen stays relayed)
    listening = not client_mode or not local
    kwargs = dict(
        initial_peers=list(initial_peers),
        host_maddrs=[f"/ip{_ip_version(host)}/{host}/tcp/{port}"] if listening else [],
        announce_maddrs=[f"/ip{_ip_version(announce_host)}/{announce_host}/tcp/{port}"] if announce_host else None,
        nat_port_map=not local,
        auto_nat=not local,
        use_relay=not local,
        use_auto_relay=bool(relays),
        dht_mode="client" if client_mode or relays else "server",
        no_listen=not listening,
    )
    if local:
        kwargs["force_reachability"] = "public"
        return kwargs, {}
    if not client_mode and not relays:
        return kwargs, dict(RELAY_LIMITS)
    flags = {"relayService": 0}
    if relays:
        kwargs.update(force_reachability="private", trusted_relays=list(relays))
        flags["relayDiscovery"] = 0
    return kwargs, flags


def local_host_for(peers: Sequence[str]) -> str:
    """Loopback when every peer is on this machine (so nothing probes the network), else all interfaces."""
    loopback = ("/ip4/127.", "/ip6/::1/", "/dns/localhost/", "/dns4/localhost/")
    return "127.0.0.1" if peers and all(peer.startswith(loopback) for peer in peers) else "0.0.0.0"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _ip_version(host: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 4
