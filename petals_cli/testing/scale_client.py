"""The scale benchmark's own peers: client processes whose sessions generate without pause, and a monitor that
records where every server sits.

    python -m petals_cli.testing.scale_client client SETTINGS_JSON
    python -m petals_cli.testing.scale_client monitor SETTINGS_JSON

A client process opens one distributed model and runs ``sessions`` sessions in threads, each generating greedily,
one generation after another, from when the orchestrator writes ``go`` until it closes the client's standard input
(a generation in progress then stops at its next token). Each generation is one JSON line on stdout: the Unix time
of every new token (the first one is the prompt's step; the gaps after it are one-token steps), its route, and, for
a sample of generations (``check_rate``, and each session's first), how many tokens differ from local transformers
(``soak_client.check_tokens``). The routing rule's decisions are timed inside the process (the pure
``routing.inference_route`` call, as the client makes it) and reported with each generation.

``routing`` names the rule, passed to the client as ``ClientConfig.routing``: ``load`` (the default: each server
costed by its expected step time under its live load, near-equal routes spread at random) or ``idle`` (each server
costed by its idle, announced throughput, as before). Another rule registers in ``ROUTING_RULES`` as a function
with ``routing.inference_route``'s signature; the client process then routes with it, and the benchmark reports the
rules side by side.

The monitor reads the model's block records every ``period`` seconds and pings every announced server; each read
is one JSON line: every server's span and state, and those that did not answer.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable

import torch

from petals_cli import routing
from petals_cli.testing.soak_client import (
    LOG_FORMAT,
    check_tokens,
    emit,
    end_tokens,
    error_record,
    follow_orders,
    monitor_loop,
)

# None: routing.inference_route as it is, with the rule of that name (routing.RULES) in the client's config
ROUTING_RULES: dict[str, Callable | None] = {rule: None for rule in routing.RULES}


class _Stopped(Exception):
    """The orchestrator said stop: the generation in progress ends at its next token."""


class _Decisions:
    """Times ``routing.inference_route`` (or the rule chosen in its place) at every call in this process."""

    def __init__(self, rule: Callable):
        self.rule, self.lock, self.seconds = rule, threading.Lock(), []

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.rule(*args, **kwargs)
        finally:
            with self.lock:
                self.seconds.append(time.perf_counter() - started)

    def drain(self) -> list[float]:
        with self.lock:
            taken, self.seconds = self.seconds, []
        return [round(seconds, 6) for seconds in taken]


class _Times:
    """A streamer noting the Unix time of every new token; stops the generation once ``stop`` is set."""

    def __init__(self, stop: threading.Event):
        self.stop, self.times, self.tokens, self.prompt_seen = stop, [], [], False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(round(time.time(), 4))
        self.tokens.extend(value.reshape(-1).tolist())
        if self.stop.is_set():
            raise _Stopped

    def end(self) -> None:
        pass


def run_session(model, local, lock, settings: dict, number: int, stop, decisions: _Decisions) -> None:
    """Generate until ``stop``; one JSON line per generation."""
    vocab, suppressed = local.config.vocab_size, end_tokens(local)
    rng = random.Random(f"{settings['seed']}/{settings['index']}/{number}")
    new_tokens, prompt_tokens = settings["new_tokens"], settings["prompt_tokens"]
    first = True
    while not stop.is_set():
        prompt = [rng.randrange(4, vocab) for _ in range(prompt_tokens)]
        streamer = _Times(stop)
        record = {"kind": "generation", "client": settings["index"], "session": number, "started": time.time()}
        route, error = [], None
        try:
            with model.inference_session(max_length=prompt_tokens + new_tokens) as session:
                try:
                    model.generate(
                        torch.tensor([prompt]),
                        attention_mask=torch.ones(1, prompt_tokens, dtype=torch.long),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        session=session,
                        streamer=streamer,
                    )
                finally:
                    route = [[span.peer_id, span.start, span.end] for span in session.route]
                    record["failovers"] = session.failovers
        except _Stopped:
            record["stopped"] = True
        except Exception as exc:  # a failed generation is a result: recorded, then the next one starts
            error = error_record(exc)
            logging.getLogger("scale").warning("generation failed: %s: %s", type(exc).__name__, exc)
        record.update(ended=time.time(), times=streamer.times, route=route, error=error)
        record["decisions"] = decisions.drain()
        if first or rng.random() < settings["check_rate"]:
            with lock:
                record.update(checked=True, **check_tokens(local, prompt, streamer.tokens, suppressed))
        first = False
        emit(record)


def client_main(settings: dict) -> None:
    from transformers import AutoModelForCausalLM

    from petals_cli import AutoDistributedModelForCausalLM
    from petals_cli.config import ClientConfig

    torch.set_num_threads(1)
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING, stream=sys.stderr)
    decisions = _Decisions(ROUTING_RULES[settings["routing"]] or routing.inference_route)
    routing.inference_route = decisions  # the client looks it up in the module at every route
    rule = settings["routing"] if settings["routing"] in routing.RULES else "load"
    config = ClientConfig.from_sources(initial_peers=tuple(settings["initial_peers"]), routing=rule)
    local = AutoModelForCausalLM.from_pretrained(settings["model"]).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(settings["model"], config=config)
    go, stop, lock = threading.Event(), threading.Event(), threading.Lock()
    threading.Thread(target=follow_orders, args=(go, stop), daemon=True).start()
    emit({"kind": "ready", "client": settings["index"], "at": time.time()})
    go.wait()
    arguments = (model, local, lock, settings)
    threads = [
        threading.Thread(target=run_session, args=(*arguments, number, stop, decisions), daemon=True)
        for number in range(settings["sessions"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    model.close()


def monitor_main(settings: dict) -> None:
    monitor_loop(settings, read_spans, timeout_periods=5)


async def read_spans(client, prefix: str, num_blocks: int) -> dict:
    """Every announced server's span and state (online, joining, offline), and those that did not answer a ping."""
    from petals_cli.dht import fetch_snapshot, unreachable_servers
    from petals_cli.wire import ServerState

    snapshot = await fetch_snapshot(client.node, prefix, num_blocks)
    unreachable = await unreachable_servers(client.p2p, snapshot, client.swarm_key, timeout=1.0)
    servers = {
        peer: [info.start_block, info.end_block, ServerState(info.state).name.lower()]
        for peer, info in snapshot.servers.items()
    }
    return {"servers": servers, "unreachable": sorted(unreachable)}


def main() -> None:
    mode, settings = sys.argv[1], json.loads(sys.argv[2])
    {"client": client_main, "monitor": monitor_main}[mode](settings)


if __name__ == "__main__":
    main()
