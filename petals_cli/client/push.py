"""The pushed step: servers pass a step's output on to the next server themselves.

The client sends the step to the first server only, naming the sessions that follow; each server computes and
pushes its output on, and still answers its own stream with that output, so the client keeps every span's inputs
for failover. A server that could not push says so, and the client relays that hop itself. ``pushed_step`` returns
what every server answered (``Pushed``), or raises ``Interrupted`` at the first one that failed, with what came
before it: the session decides what to do with either.

Built on ``streams`` only.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from petals_cli.client.streams import ServerFailure, SpanStream
from petals_cli.step import Step


def possible(enabled: bool, streams: list[SpanStream], position: int, prefix_length: int) -> bool:
    """Servers pass the step on themselves when pushing is on, there is a next server to pass it to, and the step
    carries no deep prompts (each span has its own; ``prefix_length`` is their number of tokens)."""
    return enabled and len(streams) > 1 and position >= prefix_length


@dataclasses.dataclass(frozen=True)
class Pushed:
    """Every stream's output for the step (the last one is the route's), and the hops this client relayed."""

    outputs: list[torch.Tensor]
    relayed: int


class Interrupted(Exception):
    """A pushed step failed at stream ``index``, whose input was ``inputs``; ``outputs`` are the answers of the
    streams before it, ``relayed`` the hops relayed until then."""

    def __init__(self, index: int, inputs: torch.Tensor, failure: ServerFailure, outputs, relayed: int):
        super().__init__(str(failure))
        self.index, self.inputs, self.failure = index, inputs, failure
        self.outputs, self.relayed = outputs, relayed


async def pushed_step(
    streams: list[SpanStream], step: Step, on_input: Callable[[SpanStream, torch.Tensor], None]
) -> Pushed:
    """Push ``step`` through ``streams``; ``on_input`` is told each stream's input as soon as it is known (before
    its answer is awaited). Each stream keeps its input once it has answered."""
    hops = tuple((stream.span.peer_id, stream.session_id) for stream in streams[1:])
    streams[0].send(dataclasses.replace(step, next_hops=hops))
    for stream in streams[1:]:
        stream.expect(step)
    inputs, outputs, relayed, started = step.hidden, [], 0, time.monotonic()
    for index, stream in enumerate(streams):
        on_input(stream, inputs)
        try:
            watch = [later.span.peer_id for later in streams[index + 1 :]]  # a frozen one stalls this answer
            response, output = await stream.answer(inputs.shape, watch=watch, since=started)
        except ServerFailure as failure:
            raise Interrupted(index, inputs, failure, outputs, relayed) from failure
        stream.conn.succeed(stream.span.peer_id)
        stream.history.append(inputs)
        outputs.append(output)
        inputs = output
        if index + 1 < len(streams) and not response.pushed:
            relayed += 1
            streams[index + 1].send(dataclasses.replace(step, hidden=inputs, next_hops=hops[index + 1 :]))
    return Pushed(outputs, relayed)
