"""What runs on a server's compute thread: inference steps (alone or batched), training forwards and backwards.

``SpanCompute`` holds the span, its adapters and the graphs kept between a training forward and its backward;
the step engine calls ``run_group`` for inference and the handler hands ``forward``/``backward`` to the engine's
``run``. Every call names its blocks and adapter, or the LoRA weights its client sent, explicitly: nothing is left
selected between calls. A backward returns the gradients of every tensor the client sent to train (hidden states,
prompts, LoRA weights).
``describe_failure`` turns an exception from here into the ``ServerError`` a client fails over on (out of memory
told apart, and torch's cached memory freed). Knows nothing about the network or about sessions.
"""

from __future__ import annotations

import logging

import torch

from petals_cli.errors import ServerError
from petals_cli.families.base import SpanRunner
from petals_cli.server.adapters import RequestLora, SpanAdapters
from petals_cli.server.engine import StepJob
from petals_cli.server.graphs import KeptGraphs, SavedBytes
from petals_cli.wire import SpanRequest

logger = logging.getLogger(__name__)


class SpanCompute:
    def __init__(self, span: SpanRunner, graphs: KeptGraphs, adapters: SpanAdapters | None = None):
        self.span, self.graphs = span, graphs
        self.adapters = SpanAdapters() if adapters is None else adapters

    def replace(self, span: SpanRunner, adapters: SpanAdapters | None = None) -> None:
        """Compute with other blocks from now on (rebalancing)."""
        self.span = span
        self.adapters = SpanAdapters() if adapters is None else adapters

    @torch.inference_mode()
    def run_group(self, group: list[StepJob]) -> list[torch.Tensor]:
        """The engine's compute: one step alone, or one-token steps of several sessions as one batch."""
        first = group[0]
        if any(job.span is not None and job.span is not self.span for job in group):
            # a step accepted before a move and computed after it: its cache belongs to the old blocks
            raise ServerError("this server moved to other blocks; open a new session")
        with self._lora(first.adapter, first.lora):
            if len(group) == 1:
                output = self.span(
                    first.hidden, *first.blocks, first.cache,
                    attention_mask=first.attention_mask, position_ids=first.position_ids, prompts=first.prompts,
                )  # fmt: skip
                return [output]
            return self.span.forward_batched(
                [job.hidden for job in group],
                *first.blocks,
                [job.cache for job in group],
                [job.attention_mask for job in group],
                [job.position_ids for job in group],
            )

    def forward(
        self, hidden: torch.Tensor, request: SpanRequest, prompts, lora: RequestLora | None = None
    ) -> list[torch.Tensor]:
        """A forward request; with a ``graph_id`` its graph is kept for the backward that will follow."""
        start, end = request.start_block, request.end_block
        if not request.graph_id:
            with torch.inference_mode(), self._lora(request.adapter, lora):
                return [self.span(hidden, start, end, prompts=prompts)]
        with SavedBytes(exclude=list(self.span.parameters())) as saved:
            inputs, outputs = self._differentiable_forward(hidden, request, prompts, lora)
        self.graphs.keep(request.graph_id, _graph_key(request, lora), inputs, outputs, saved.nbytes)
        return [outputs.detach()]

    def backward(self, hidden, grad_output, request: SpanRequest, prompts, lora: RequestLora | None = None):
        """Gradients for the span's input hidden states and, when sent, for its deep prompts and the client's LoRA
        weights (in the order sent); from the graph the forward kept when there is one, else by recomputing the
        forward."""
        sent = [hidden, *([] if prompts is None else [prompts]), *([] if lora is None else lora.tensors)]
        kept = self.graphs.take(request.graph_id, _graph_key(request, lora), sent)
        if kept is not None:
            inputs, outputs = kept.inputs, kept.outputs
        else:
            inputs, outputs = self._differentiable_forward(hidden, request, prompts, lora)
        with torch.enable_grad():
            grads = torch.autograd.grad(
                outputs, inputs, grad_outputs=grad_output.to(outputs.dtype), allow_unused=lora is not None
            )
        # a targeted layer the blocks never call (some families carry unused ones) has zero gradients
        return [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(inputs, grads, strict=True)]

    def _differentiable_forward(self, hidden, request: SpanRequest, prompts, lora: RequestLora | None):
        inputs = [hidden.detach().requires_grad_(True)]
        if prompts is not None:
            inputs.append(prompts.detach().requires_grad_(True))
        weights = [] if lora is None else [tensor.detach().requires_grad_(True) for tensor in lora.tensors]
        with torch.enable_grad(), self._lora(request.adapter, lora, weights):
            deep = inputs[1] if prompts is not None else None
            return [*inputs, *weights], self.span(inputs[0], request.start_block, request.end_block, prompts=deep)

    def _lora(self, adapter: str, lora: RequestLora | None, weights: list[torch.Tensor] | None = None):
        """The call's LoRA: a served adapter by name, or the weights a client sent (``weights``: leaves to
        differentiate in their place)."""
        if lora is None:
            return self.adapters.active(adapter)
        if lora.span is not self.span:  # checked against blocks this server no longer computes with
            raise ServerError("this server moved to other blocks; send the request again")
        return self.adapters.applying(lora.layers(weights))


def _graph_key(request: SpanRequest, lora: RequestLora | None) -> tuple:
    """What a kept graph computed, besides its inputs: a backward must ask for the same computation."""
    return (request.start_block, request.end_block, request.adapter, None if lora is None else lora.identity)


def describe_failure(what: str, exc: Exception) -> ServerError:
    """Log a compute failure and describe it; out of memory frees what torch holds for later requests."""
    cpu_allocation = isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # torch on a CPU
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or cpu_allocation:
        logger.warning("%s ran out of memory: %s", what, exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ServerError(f"{what} ran out of memory on this server; try a smaller request or another server")
    logger.exception("%s failed", what)
    return ServerError(f"{what} failed: {exc.__class__.__name__}: {exc}")
