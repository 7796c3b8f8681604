"""Autograd graphs a server keeps from a training forward until its backward, so backward need not recompute.

A client that will differentiate sends a random ``graph_id`` with its forward request; the server runs that
forward with gradients on and keeps the inputs and outputs under the id, and the backward request with the
same id differentiates them directly. Kept graphs are bounded in number, age and the bytes of the activations
they hold (the oldest go first; a graph larger than the whole allowance is not kept); a
backward whose graph is gone (evicted, or failed over to another server) recomputes the forward, so keeping
is only ever an optimisation. Everything here runs on the step engine's single compute thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_KEPT_GRAPHS = 8
KEPT_GRAPH_SECONDS = 60.0
KEPT_GRAPH_BYTES = 512 * 2**20


@dataclass
class KeptGraph:
    key: tuple  # (start, end, adapter, LoRA targets/rank/scaling): a backward must ask for the same computation
    inputs: list[torch.Tensor]  # hidden states (and prompts, and a client's LoRA weights), leaves of the graph
    outputs: torch.Tensor
    expires_at: float
    nbytes: int = 0  # activations the graph holds on to (weights excluded)


class KeptGraphs:
    def __init__(
        self,
        max_graphs: int = MAX_KEPT_GRAPHS,
        seconds: float = KEPT_GRAPH_SECONDS,
        max_bytes: int = KEPT_GRAPH_BYTES,
        clock=time.monotonic,
    ):
        self.max_graphs, self.seconds, self.max_bytes, self.clock = max_graphs, seconds, max_bytes, clock
        self._graphs: OrderedDict[str, KeptGraph] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(graph.nbytes for graph in self._graphs.values())

    def __len__(self) -> int:
        return len(self._graphs)

    def keep(
        self, graph_id: str, key: tuple, inputs: list[torch.Tensor], outputs: torch.Tensor, nbytes: int = 0
    ) -> None:
        now = self.clock()
        self._graphs.pop(graph_id, None)
        if nbytes > self.max_bytes:
            return  # its backward recomputes
        self._graphs[graph_id] = KeptGraph(key, inputs, outputs, now + self.seconds, nbytes)
        while self._graphs and (
            len(self._graphs) > self.max_graphs
            or self.nbytes > self.max_bytes
            or next(iter(self._graphs.values())).expires_at < now
        ):
            self._graphs.popitem(last=False)

    def take(self, graph_id: str, key: tuple, inputs: list[torch.Tensor]) -> KeptGraph | None:
        """The graph kept under ``graph_id`` if it computed exactly this (same blocks, same inputs, LoRA weights
        included); removed."""
        graph = self._graphs.pop(graph_id, None) if graph_id else None
        if graph is None or graph.key != key or graph.expires_at < self.clock() or len(graph.inputs) != len(inputs):
            return None
        for kept, sent in zip(graph.inputs, inputs, strict=True):
            if kept.shape != sent.shape or not torch.equal(kept.detach(), sent.to(kept.dtype)):
                return None
        return graph


class SavedBytes:
    """Counts the bytes autograd saves for backward while active (a ``saved_tensors_hooks`` context), each
    storage once, leaving out ``exclude`` (the model's weights, which exist anyway)."""

    def __init__(self, exclude: list[torch.Tensor]):
        self._excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
        self._seen: set[int] = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded and pointer not in self._seen:
            self._seen.add(pointer)
            self.nbytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)
