"""The throughput bound of a swarm of paced servers: the most tokens per second its placement can carry.

Pure: spans and device models in, numbers out; no network, no clock. ``scale_report`` applies it to the spans
the servers of a run held.

A server holding blocks [a, b) on a device model D (``testing/paced.py``) with batch capacity B runs one batched
step of B one-token sessions through its whole span in ``D.seconds(b - a, B)``, so it carries at most

    c = B / D.seconds(b - a, B)          tokens per second through all of its blocks.

Every generated token goes through blocks 0..N-1 in order, using each server it visits for a contiguous run of
that server's blocks. We count a visit as one whole-span step of that server, whatever part of its span the token
uses (the pacer charges less for fewer blocks, but the engine batches only steps over the same blocks, so a server
serving sub-spans loses batching instead: the bound assumes each server steps its whole span, full). Then the most
tokens per second the swarm can carry, the max flow of this pipeline of spans, is

    bound = min over blocks k of C_k,    where C_k = sum of c over the servers holding block k.

No flow exceeds it: every token crosses block k on exactly one server holding it (a cut). And a flow reaches it,
which ``spread_flow`` builds block by block from block 0 (the proof, for interval spans): think of the flow F as
the interval [0, F) of token "positions". At each block the servers holding it split [0, F) between them; a server
keeps the positions it took until its span ends and only ever takes more, so each token it carries stays on it
for a contiguous run of blocks and its load is what it holds at its last block. At block k, the positions of the
servers whose span ended at k (all of [0, F) at block 0) are handed to the servers holding k: those starting there
have their whole c, those continuing have c less what they hold, and together that is C_k - (what the continuing
ones hold) >= F - (what they hold) = exactly what is handed out. So no server exceeds its c.

A swarm's sessions can also be too few to fill it (each waits for its own step): the bound is the servers' side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from petals_cli.testing.paced import DeviceModel

TOLERANCE = 1e-9  # of a token per second: what float sums may miss by


@dataclass(frozen=True)
class PacedSpan:
    """One server's blocks [start, end) on its device model."""

    name: str
    start: int
    end: int
    device: DeviceModel

    @property
    def blocks(self) -> int:
        return self.end - self.start

    @property
    def tokens_per_second(self) -> float:
        """``c``: full batches through the whole span, one after another."""
        capacity = self.device.batch_capacity
        return capacity / self.device.seconds(self.blocks, capacity)


def block_capacities(servers: Sequence[PacedSpan], num_blocks: int) -> list[float]:
    """``C_k`` for every block: the summed ``c`` of the servers holding it (0.0 where none does)."""
    totals = [0.0] * num_blocks
    for server in servers:
        for index in range(max(server.start, 0), min(server.end, num_blocks)):
            totals[index] += server.tokens_per_second
    return totals


def pipeline_bound(servers: Sequence[PacedSpan], num_blocks: int) -> float:
    """The max flow of tokens per second through blocks 0..num_blocks-1 (see the module's docstring)."""
    return min(block_capacities(servers, num_blocks), default=0.0)


def spread_flow(servers: Sequence[PacedSpan], num_blocks: int, flow: float) -> list[float]:
    """A flow of ``flow`` tokens per second as each server's load (in the order of ``servers``), built as the
    module's docstring says; raises ValueError when ``flow`` exceeds the bound. Each block's holders carry
    ``flow`` between them, and every load is at most that server's ``c``."""
    loads = [0.0] * len(servers)
    for block in range(num_blocks):
        holders = [index for index, server in enumerate(servers) if server.start <= block < server.end]
        starting = [index for index in holders if servers[index].start == block]
        continuing = [index for index in holders if servers[index].start < block]
        handed = flow - sum(loads[index] for index in continuing)  # what the servers that ended here held
        for index in starting + continuing:  # the starting ones first: their whole capacity is free
            taken = min(handed, servers[index].tokens_per_second - loads[index])
            loads[index] += max(taken, 0.0)
            handed -= max(taken, 0.0)
        if handed > TOLERANCE * max(1.0, flow):
            raise ValueError(f"{flow} tokens/s exceed what block {block}'s servers carry")
    return loads
