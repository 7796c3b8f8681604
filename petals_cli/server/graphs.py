"""Autograd graphs a server keeps from a training forward until its backward, so backward need not recompute.

A client that will differentiate sends a random ``graph_id`` with its forward request; the server runs that
forward with gradients on and keeps the inputs and outputs under the id, and the backward request with the
same id differentiates them directly. Kept graphs are bounded in number and age (the oldest go first); a
backward whose graph is gone (evicted, or failed over to another server) recomputes the forward, so keeping
is only ever an optimisation. Everything here runs on the handler's single compute thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_KEPT_GRAPHS = 8
KEPT_GRAPH_SECONDS = 60.0


@dataclass
class KeptGraph:
    key: tuple  # (start, end, adapter): a backward must ask for the same computation
    inputs: list[torch.Tensor]  # hidden states (and prompts), leaves of the graph
    outputs: torch.Tensor
    expires_at: float


class KeptGraphs:
    def __init__(self, max_graphs: int = MAX_KEPT_GRAPHS, seconds: float = KEPT_GRAPH_SECONDS, clock=time.monotonic):
        self.max_graphs, self.seconds, self.clock = max_graphs, seconds, clock
        self._graphs: OrderedDict[str, KeptGraph] = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def keep(self, graph_id: str, key: tuple, inputs: list[torch.Tensor], outputs: torch.Tensor) -> None:
        now = self.clock()
        self._graphs.pop(graph_id, None)
        self._graphs[graph_id] = KeptGraph(key, inputs, outputs, now + self.seconds)
        while self._graphs and (
            len(self._graphs) > self.max_graphs or next(iter(self._graphs.values())).expires_at < now
        ):
            self._graphs.popitem(last=False)

    def take(self, graph_id: str, key: tuple, inputs: list[torch.Tensor]) -> KeptGraph | None:
        """The graph kept under ``graph_id`` if it computed exactly this (same blocks, same inputs); removed."""
        graph = self._graphs.pop(graph_id, None) if graph_id else None
        if graph is None or graph.key != key or graph.expires_at < self.clock() or len(graph.inputs) != len(inputs):
            return None
        for kept, sent in zip(graph.inputs, inputs, strict=True):
            if kept.shape != sent.shape or not torch.equal(kept.detach(), sent.to(kept.dtype)):
                return None
        return graph
