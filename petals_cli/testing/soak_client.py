"""The soak's own peers: client processes that generate and check every token, and a monitor that counts DHT records.

    python -m petals_cli.testing.soak_client client SETTINGS_JSON
    python -m petals_cli.testing.soak_client monitor SETTINGS_JSON

A client process opens one distributed model (the real client, with ``--verify`` or a list of blocked servers as
the orchestrator says) and runs several sessions in threads, each generating greedily, one generation after
another, from when the orchestrator writes ``go`` until it closes the client's standard input. Every token is
checked against the same model run locally with transformers: one forward pass over the prompt and the swarm's own
tokens gives the local choice after every prefix the swarm took (end-of-sequence tokens aside, as generation with
``min_new_tokens`` never picks them), so a token is wrong when it is not the local argmax (a near tie, within
``TIE_MARGIN`` logits, is counted apart: batching rounds differently). Each generation is one JSON line on stdout;
logs (with Unix times, which the orchestrator reads to time when a fault was noticed) go to stderr.

The monitor reads the model's block records, the model index and pings every announced server every ``period``
seconds, and prints one JSON line of counts each time.

This module knows the public client (``AutoDistributedModelForCausalLM``, ``SwarmClient``), the DHT reading helpers
and transformers, and nothing of the orchestrator (``soak.py``) or of the servers.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import threading
import time
import traceback

import torch

TIE_MARGIN = 1e-3  # logits closer than this are a tie that float32 rounding may break either way
LOG_FORMAT = "%(created).3f %(levelname)s %(name)s: %(message)s"
_BLOCKS = re.compile(r"blocks (\d+):(\d+)")
_OUTPUT = threading.Lock()


def emit(record: dict) -> None:
    """One JSON line on stdout, whole: sessions write from several threads."""
    line = json.dumps(record) + "\n"
    with _OUTPUT:
        sys.stdout.write(line)
        sys.stdout.flush()


def follow_orders(go: threading.Event, stop: threading.Event) -> None:
    """The orchestrator writes ``go`` once the swarm is up, and closes our standard input to stop us."""
    for line in sys.stdin:
        if line.strip() == "go":
            go.set()
    stop.set()
    go.set()


class _Tokens:
    """A streamer that keeps the new tokens (those of a generation that fails too), notes the session's route at
    the first one, and paces the steps."""

    def __init__(self, session, pause: float):
        self.session, self.pause, self.tokens, self.prompt_seen, self.first_route = session, pause, [], False, []

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if not self.tokens:
            self.first_route = [span.peer_id for span in self.session.route]
        self.tokens.extend(value.reshape(-1).tolist())
        if self.pause:
            time.sleep(self.pause)

    def end(self) -> None:
        pass


def check_tokens(local, prompt: list[int], tokens: list[int], suppressed: tuple[int, ...] = ()) -> dict:
    """Each of ``tokens`` against the local model's choice after the same prefix (never one of ``suppressed``: the
    end-of-sequence tokens, which generation with ``min_new_tokens`` does not pick): counts of wrong ones and near
    ties, and the position of the first wrong one."""
    if not tokens:
        return {"wrong": 0, "ties": 0, "first_wrong": None}
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = local(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float()
    logits[:, list(suppressed)] = -torch.inf
    best = logits.argmax(-1)
    wrong = ties = 0
    first_wrong = None
    for position, token in enumerate(tokens):
        if token == best[position]:
            continue
        if 0 <= token < logits.shape[-1] and logits[position, best[position]] - logits[position, token] < TIE_MARGIN:
            ties += 1
            continue
        wrong += 1
        first_wrong = position if first_wrong is None else first_wrong
    return {"wrong": wrong, "ties": ties, "first_wrong": first_wrong}


def end_tokens(local) -> tuple[int, ...]:
    """The model's end-of-sequence tokens (none, one or several)."""
    found = local.generation_config.eos_token_id
    return tuple(found) if isinstance(found, list | tuple) else () if found is None else (found,)


def error_record(error: BaseException) -> dict:
    """What a failed generation raised: its type, one line of message, whether it is one of petals' typed errors,
    and the blocks it names (``missing_blocks``, or ``blocks A:B`` in its message)."""
    from petals_cli.errors import PetalsError

    message = str(error).splitlines()[0][:300] if str(error) else ""
    blocks = sorted(getattr(error, "missing_blocks", ()) or ())
    if not blocks:
        for start, end in _BLOCKS.findall(str(error)):
            blocks.extend(range(int(start), int(end)))
    return {
        "type": type(error).__name__,
        "typed": isinstance(error, PetalsError),
        "message": message,
        "blocks": sorted(set(blocks)),
    }


def run_session(model, local, lock: threading.Lock, settings: dict, number: int, stop: threading.Event) -> None:
    """Generate until ``stop``; one JSON line per generation."""
    vocab = local.config.vocab_size
    suppressed = end_tokens(local)
    rng = random.Random(f"{settings['seed']}/{settings['index']}/{number}")
    new_tokens, prompt_tokens = settings["new_tokens"], settings["prompt_tokens"]
    while not stop.is_set():
        prompt = [rng.randrange(4, vocab) for _ in range(prompt_tokens)]
        streamer = _Tokens(None, settings["step_pause"])
        record = {"kind": "generation", "client": settings["index"], "session": number, "started": time.time()}
        route, failovers, caught, error = [], 0, 0, None
        try:
            with model.inference_session(max_length=prompt_tokens + new_tokens) as session:
                streamer.session = session
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
                    route = [span.peer_id for span in session.route]
                    failovers, caught = session.failovers, session.caught
        except Exception as exc:  # a failed generation is a result: recorded, then the next one starts
            error = error_record(exc)
            logging.getLogger("soak").warning("generation failed: %s: %s", type(exc).__name__, exc)
        record.update(ended=time.time(), tokens=len(streamer.tokens), first_route=streamer.first_route, route=route)
        record.update(failovers=failovers)
        record.update(caught=caught, error=error)
        with lock:
            record.update(check_tokens(local, prompt, streamer.tokens, suppressed))
        emit(record)


def client_main(settings: dict) -> None:
    from transformers import AutoModelForCausalLM

    from petals_cli import AutoDistributedModelForCausalLM
    from petals_cli.config import ClientConfig

    torch.set_num_threads(1)
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING, stream=sys.stderr)
    for name in ("petals_cli.client.swarm", "petals_cli.client.replay"):  # bans and replacements, with their times
        logging.getLogger(name).setLevel(logging.DEBUG)
    config = ClientConfig.from_sources(
        initial_peers=tuple(settings["initial_peers"]),
        verify_rate=settings["verify_rate"],
        blocked_servers=tuple(settings["blocked"]),
    )
    local = AutoModelForCausalLM.from_pretrained(settings["model"]).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(settings["model"], config=config)
    go, stop, lock = threading.Event(), threading.Event(), threading.Lock()
    threading.Thread(target=follow_orders, args=(go, stop), daemon=True).start()
    emit({"kind": "ready", "client": settings["index"], "at": time.time()})
    go.wait()

    def guarded(number: int) -> None:
        try:
            run_session(model, local, lock, settings, number, stop)
        except BaseException:  # anything but a failed generation is this client crashing
            emit({"kind": "crash", "client": settings["index"], "at": time.time(), "error": traceback.format_exc()})
            stop.set()

    threads = [threading.Thread(target=guarded, args=(n,), daemon=True) for n in range(settings["sessions"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    emit({"kind": "summary", "client": settings["index"], "verification": model.petals_verification.to_json()})
    model.close()


def monitor_main(settings: dict) -> None:
    monitor_loop(settings, count_records, timeout_periods=3)


def monitor_loop(settings: dict, read, *, timeout_periods: float) -> None:
    """Every ``settings["period"]`` seconds until ordered to stop, emit ``await read(client, prefix, num_blocks)``
    as a ``dht`` sample (an error sample when it fails or takes over ``timeout_periods`` periods)."""
    from petals_cli.client import SwarmClient
    from petals_cli.config import ClientConfig

    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING, stream=sys.stderr)
    client = SwarmClient(ClientConfig.from_sources(initial_peers=tuple(settings["initial_peers"])))
    stop = threading.Event()
    threading.Thread(target=follow_orders, args=(threading.Event(), stop), daemon=True).start()
    period = settings["period"]
    try:
        while True:
            started = time.time()
            try:
                reading = read(client, settings["prefix"], settings["num_blocks"])
                sample = client.run(reading, period * timeout_periods)
            except Exception as exc:  # a failed read is a sample too: the DHT did not answer
                sample = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            emit({"kind": "dht", "at": started, "read_s": round(time.time() - started, 3), **sample})
            if stop.wait(max(0.0, period - (time.time() - started))):
                break
    finally:
        client.close()


async def count_records(client, prefix: str, num_blocks: int) -> dict:
    """Raw records under the model's server key and in the model index (stale ones until they expire included),
    servers by announced state, servers announced online that do not answer, and the fewest live servers of a
    block."""
    from petals_cli.dht import fetch_snapshot, unreachable_servers
    from petals_cli.wire import MODEL_INDEX_KEY, ServerState, servers_key

    node = client.node
    found = await node.get(servers_key(prefix), latest=True)
    records = len(found.value) if found is not None and isinstance(found.value, dict) else 0
    index = await node.get(MODEL_INDEX_KEY, latest=True)
    index_records = len(index.value) if index is not None and isinstance(index.value, dict) else 0
    snapshot = await fetch_snapshot(node, prefix, num_blocks)
    unreachable = await unreachable_servers(client.p2p, snapshot, client.swarm_key, timeout=1.0)
    states = {state.name.lower(): 0 for state in ServerState}
    for info in snapshot.servers.values():
        states[ServerState(info.state).name.lower()] += 1
    coverage = snapshot.without(unreachable).block_coverage()
    return {
        "records": records,
        "index_records": index_records,
        **states,
        "unreachable": len(unreachable),
        "online_peers": sorted(set(snapshot.online()) - unreachable),
        "min_coverage": min(coverage) if coverage else 0,
    }


def main() -> None:
    mode, settings = sys.argv[1], json.loads(sys.argv[2])
    {"client": client_main, "monitor": monitor_main}[mode](settings)


if __name__ == "__main__":
    main()
