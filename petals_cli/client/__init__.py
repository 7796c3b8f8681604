"""The client: a connection to the swarm, and sessions and remote blocks over it.

One module per concern, as on the server side:
- ``swarm``: ``SwarmClient``, the event loop thread, P2P daemon, DHT node, snapshots, pings and bans;
- ``streams``: one span's stream and its I/O, ``ServerFailure`` and its guard, the one builder of span requests,
  the session's ``Opener``, the chain run and unary calls;
- ``replay``: every path that rebuilds servers' caches from kept inputs, and the failover count;
- ``push``: the pushed step, and when pushing is possible;
- ``checks``: verification, with its own per-span state, returning typed verdicts;
- ``inference``: ``InferenceSession``, the only place that changes a route, applying what the others return;
- ``autograd``: forward and backward requests and the differentiable ``RemoteBlocks``.

Never imports server code.
"""

from petals_cli.client.swarm import SwarmClient

__all__ = ["SwarmClient"]
