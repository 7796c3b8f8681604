"""Remote blocks without caches, differentiable: forward and backward requests through a route.

``RemoteBlocks`` is the autograd function the model calls; ``RemoteChain`` runs its requests span by span,
replacing a failed span with another route as it goes. Deep prompts ([num_blocks, prefix, hidden], see
``SpanRunner.forward``) travel with every request, each span getting its own blocks' rows, and so do the weights
of client-owned LoRA; backward returns their gradients. With ``--verify``, requests are checked by ``checks``'s
``RequestChecks``; a server it catches is failed over like any other failure. Knows nothing about tokens or heads.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import torch

from petals_cli.client.checks import RequestChecks
from petals_cli.client.streams import Connection, ServerFailure, call_unary
from petals_cli.client.verdicts import ServerCaught
from petals_cli.errors import ServerError
from petals_cli.lora import ClientLora, SpanLora
from petals_cli.routing import RouteSpan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hop:
    """One span of a differentiable forward: who ran it, on what, and the graph it may have kept for backward."""

    span: RouteSpan
    hidden: torch.Tensor
    graph_id: str = ""


class RemoteChain:
    """Forward and backward through a route, replacing failed spans as it goes.

    With ``keep_graphs``, each forward asks its server to keep the autograd graph for the backward that
    follows (saving a recomputation there); a backward that fails over to another server recomputes."""

    def __init__(
        self,
        client: Connection,
        prefix: str,
        num_blocks: int,
        *,
        keep_graphs: bool = False,
        lora: ClientLora | None = None,
        lora_weights: list[torch.Tensor] | None = None,
    ):
        self.client, self.prefix, self.num_blocks = client, prefix, num_blocks
        self.keep_graphs = keep_graphs
        # client-owned LoRA: its structure, the weights sent (in wire order) and their gradients, summed here
        self.lora, self.lora_weights = lora, lora_weights
        self.grad_lora = None if lora_weights is None else [torch.zeros_like(weight) for weight in lora_weights]
        self.checks = RequestChecks(client, prefix)

    def _lora(self, start: int, end: int) -> SpanLora | None:
        return None if self.lora is None else self.lora.for_span(self.lora_weights, start, end)

    def _add_lora_grads(self, start: int, end: int, grads: list[torch.Tensor]) -> None:
        if self.grad_lora is not None:
            indices = range(len(self.grad_lora))[self.lora.span_slice(start, end)]
            for index, grad in zip(indices, grads, strict=True):
                self.grad_lora[index] += grad

    async def route(self, start: int, end: int) -> list[RouteSpan]:
        return await self.client.route(self.prefix, self.num_blocks, start, end, inference=False)

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int, prompts: torch.Tensor | None = None
    ) -> tuple[list[Hop], torch.Tensor]:
        """Outputs of blocks [start, end), and the hops that computed them (for backward).

        ``prompts`` holds the deep prompts of all blocks (indexed by absolute block) or is None."""
        hops = []
        for _ in range(self.client.config.max_retries + 1):
            route = await self.route(start, end)
            try:
                for span in route:
                    graph_id = uuid.uuid4().hex if self.keep_graphs else ""
                    (output,) = await self._call(span, "rpc_forward", [hidden], prompts, graph_id)
                    self.client.succeed(span.peer_id)
                    hops.append(Hop(span, hidden, graph_id))
                    hidden, start = output, span.end
                return hops, hidden
            except ServerFailure as failure:
                logger.warning("%s; failing over", failure)
                self.client.ban(failure.span.peer_id)
        raise ServerError(f"forward of blocks {start}:{end} failed {self.client.config.max_retries + 1} times")

    async def backward(
        self,
        hops: list[Hop],
        grad: torch.Tensor,
        prompts: torch.Tensor | None = None,
        grad_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The gradient for the first hop's input; with ``prompts``, accumulates theirs into ``grad_prompts``."""
        for hop in reversed(hops):
            grad = await self._backward_span(hop, grad, prompts, grad_prompts)
        return grad

    async def _backward_span(self, hop: Hop, grad, prompts, grad_prompts) -> torch.Tensor:
        span, hidden, graph_id = hop.span, hop.hidden, hop.graph_id
        for _ in range(self.client.config.max_retries + 1):
            try:
                grads = await self._call(span, "rpc_backward", [hidden, grad], prompts, graph_id)
                self.client.succeed(span.peer_id)
                if prompts is not None:
                    grad_prompts[span.start : span.end] += grads[1]
                self._add_lora_grads(span.start, span.end, grads[1 + (prompts is not None) :])
                return grads[0]
            except ServerFailure as failure:
                logger.warning("%s; failing over", failure)
                self.client.ban(failure.span.peer_id)
            route = await self.route(span.start, span.end)
            if len(route) > 1:  # the replacement splits the span: recompute its inner inputs first
                hops, _ = await self.forward(hidden, span.start, span.end, prompts)
                return await self.backward(hops, grad, prompts, grad_prompts)
            span, graph_id = route[0], ""  # a graph kept by the failed server is of no use elsewhere
        raise ServerError(
            f"backward of blocks {span.start}:{span.end} failed {self.client.config.max_retries + 1} times"
        )

    async def _call(self, span: RouteSpan, method: str, tensors, prompts, graph_id: str = "") -> list[torch.Tensor]:
        """One request, checked against a replica when ``checks`` chooses it. A server caught computing wrongly
        (banned and reported by the check) fails over like any failure (ServerFailure)."""

        async def rerun(exclude: set[str]):
            return await self._replica_call(span, method, tensors, prompts, exclude)

        check = self.checks.start(span, rerun)
        try:
            lora = self._lora(span.start, span.end)
            outputs = await call_unary(self.client, self.prefix, span, method, tensors, prompts, graph_id, lora)
        except BaseException:
            await self.checks.abandon(check)
            raise
        if check is None:
            return outputs
        verdict = await self.checks.settle(span, method, tensors, outputs, check, rerun)
        if isinstance(verdict, ServerCaught):
            raise ServerFailure(span, "outvoted by other servers holding its blocks", ban=False)
        return outputs

    async def _replica_call(self, span: RouteSpan, method: str, tensors, prompts, exclude) -> tuple:
        """The same request run by other servers holding blocks [span.start, span.end): (their route, outputs)."""
        route = await self.client.route(
            self.prefix, self.num_blocks, span.start, span.end, inference=False, wait=0.0, exclude=exclude
        )
        hidden, inputs = tensors[0], []
        for member in route if method == "rpc_forward" else route[:-1]:  # a backward needs each hop's input
            inputs.append(hidden)
            lora = self._lora(member.start, member.end)
            (hidden,) = await call_unary(self.client, self.prefix, member, "rpc_forward", [hidden], prompts, lora=lora)
        if method == "rpc_forward":
            return route, [hidden]
        inputs.append(hidden)
        grad = tensors[1]
        grad_prompts = None if prompts is None else torch.zeros_like(prompts[span.start : span.end])
        grad_lora: dict[int, list[torch.Tensor]] = {}
        for member, member_input in zip(reversed(route), reversed(inputs), strict=True):
            lora = self._lora(member.start, member.end)
            grads = await call_unary(
                self.client, self.prefix, member, "rpc_backward", [member_input, grad], prompts, lora=lora
            )
            grad = grads[0]
            if grad_prompts is not None:
                grad_prompts[member.start - span.start : member.end - span.start] += grads[1]
            grad_lora[member.start] = grads[1 + (prompts is not None) :]
        lora_grads = [tensor for start in sorted(grad_lora) for tensor in grad_lora[start]]
        return route, [grad, *([] if grad_prompts is None else [grad_prompts]), *lora_grads]


class RemoteBlocks(torch.autograd.Function):
    """Differentiable run of all remote blocks: forward RPCs, then backward RPCs in reverse.

    ``prompts`` ([num_blocks, prefix, hidden] deep prompts, or None) get gradients too, and so do the weights of a
    client-owned ``lora`` (``ClientLora``; its parameters follow as the last arguments, in wire order)."""

    @staticmethod
    def forward(ctx, hidden, prompts, client, prefix: str, num_blocks: int, lora=None, *weights):
        # Servers keep their graphs only when a backward will follow (inside apply, grad mode is always off).
        will_differentiate = any(ctx.needs_input_grad[:2]) or any(ctx.needs_input_grad[6:])
        sent_weights = [weight.detach().cpu() for weight in weights] if lora is not None else None
        chain = RemoteChain(
            client, prefix, num_blocks, keep_graphs=will_differentiate, lora=lora, lora_weights=sent_weights
        )
        sent_prompts = None if prompts is None else prompts.detach().cpu()
        hops, output = client.run(chain.forward(hidden.detach().cpu(), 0, num_blocks, sent_prompts))
        ctx.chain, ctx.hops, ctx.prompts = chain, hops, sent_prompts
        ctx.prompts_to = None if prompts is None else {"dtype": prompts.dtype, "device": prompts.device}
        ctx.weights_to = [{"dtype": weight.dtype, "device": weight.device} for weight in weights]
        return output.to(hidden)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_prompts = None if ctx.prompts is None else torch.zeros_like(ctx.prompts)
        grad = ctx.chain.client.run(
            ctx.chain.backward(ctx.hops, grad_output.detach().cpu(), ctx.prompts, grad_prompts)
        )
        if grad_prompts is not None:
            grad_prompts = grad_prompts.to(**ctx.prompts_to)
        grad_weights = [
            lora_grad.to(**where) for lora_grad, where in zip(ctx.chain.grad_lora or [], ctx.weights_to, strict=True)
        ]
        return grad.to(grad_output), grad_prompts, None, None, None, None, *grad_weights
