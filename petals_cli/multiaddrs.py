"""Reading libp2p multiaddrs as text: direct or relayed, through which relay, on which port. Pure string work, so
that the CLI's light modules (``swarm``) can use it without loading hivemind."""

from __future__ import annotations

from collections.abc import Iterable

_CIRCUIT = "p2p-circuit"


def is_relayed(address: str) -> bool:
    return f"/{_CIRCUIT}" in address


def relayed_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(address for address in addresses if is_relayed(address)))


def relay_of(address: str) -> str:
    """The peer id of the relay in a circuit address (``.../p2p/RELAY/p2p-circuit/p2p/PEER``)."""
    return address.split(f"/{_CIRCUIT}", 1)[0].rsplit("/p2p/", 1)[-1]


def tcp_port(addresses: Iterable[str]) -> int | None:
    """The TCP port of the first direct address in ``addresses``."""
    for address in addresses:
        words = address.split("/")
        if not is_relayed(address) and "tcp" in words:
            return int(words[words.index("tcp") + 1])
    return None


def ip_of(address: str) -> str | None:
    """The IP address of a direct ``/ip4/`` or ``/ip6/`` multiaddr (None for a relayed or DNS one)."""
    words = address.split("/")
    return words[2] if not is_relayed(address) and len(words) > 2 and words[1] in ("ip4", "ip6") else None
