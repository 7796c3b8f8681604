"""Load-aware routing with real servers: two paced replicas of a whole tiny model, each running one session per
step (``--batch-capacity 1``), so that sessions beyond the first wait in its queue. A first client keeps the replica
that announces the higher throughput busy with six sessions; a second client's new sessions then go to the idle
replica (under the idle rule they would go to the busy one), and every token equals local transformers."""

import signal
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM, routing
from petals_cli.config import ClientConfig
from petals_cli.testing import make_tiny_model
from petals_cli.wire import model_prefix_for
from tests.conftest import Swarm
from tests.swarm.checks import eventually

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
PROMPT_IDS = torch.tensor([[1, 57, 210, 33, 98, 402, 17]])
NEW_TOKENS = 8
BUSY_TOKENS = 200  # the first client's generations: long enough to stay open while the second client routes
# Idle, the "fast" replica's step costs 20 + 4 x 11 = 64 ms and the other's 20 + 4 x 21 = 104 ms: the idle rule
# prefers "fast". With six sessions waiting at one per step, a new session's step there waits for six others.
FAST = ("--overhead-ms", "20", "--block-ms", "10", "--token-ms", "1", "--batch-capacity", "1")
OTHER = ("--overhead-ms", "20", "--block-ms", "20", "--token-ms", "1", "--batch-capacity", "1")
BUSY_SESSIONS, NEW_SESSIONS = 6, 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-load", "llama", num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path).eval()


def peer_of(server) -> str:
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


def connect(model_path, swarm, **config):
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(model_path), config=config)


class Stopped(Exception):
    pass


class Tokens:
    """A streamer keeping the new tokens; it ends the generation once ``stop`` is set."""

    def __init__(self, stop: threading.Event):
        self.stop, self.tokens, self.prompt_seen = stop, [], False

    def put(self, value):
        if self.prompt_seen:
            self.tokens.extend(value.reshape(-1).tolist())
        self.prompt_seen = True
        if self.stop.is_set():
            raise Stopped

    def end(self):
        pass


def keep_busy(model, stop: threading.Event, generated: list) -> None:
    """One session generating a long greedy continuation until ``stop``; its tokens so far go to ``generated``."""
    streamer = Tokens(stop)
    try:
        with model.inference_session(max_length=PROMPT_IDS.shape[1] + BUSY_TOKENS) as session:
            model.generate(PROMPT_IDS, max_new_tokens=BUSY_TOKENS, do_sample=False, session=session, streamer=streamer)
    except Stopped:
        pass
    finally:
        generated.append(streamer.tokens)


def test_new_sessions_avoid_a_replica_kept_busy_by_another_client_and_stay_exact(model_path, local, tmp_path):
    swarm = Swarm(model=model_path, workdir=tmp_path)
    busy_model = new_model = None
    stop, threads, busy_outputs = threading.Event(), [], []
    try:
        fast = peer_of(swarm.start(f"0:{NUM_LAYERS}", paced=FAST))
        other = peer_of(swarm.start(f"0:{NUM_LAYERS}", paced=OTHER))
        busy_model = connect(model_path, swarm, routing="idle", allowed_servers=(fast,))
        for _ in range(BUSY_SESSIONS):
            threads.append(threading.Thread(target=keep_busy, args=(busy_model, stop, busy_outputs), daemon=True))
            threads[-1].start()

        new_model = connect(model_path, swarm)  # the default rule: load
        client = new_model.petals_client

        def fast_is_busy() -> bool:
            client.run(client.is_alive(fast), timeout=10)  # a ping reads its live load
            return client.live[fast][1].sessions >= BUSY_SESSIONS

        assert eventually(fast_is_busy, timeout=60, interval=0.5), client.live.get(fast)
        client.run(client.is_alive(other), timeout=10)
        assert client.live[other][1].sessions == 0 and client.live[other][1].batch_capacity == 1

        sessions = [
            new_model.inference_session(max_length=PROMPT_IDS.shape[1] + NEW_TOKENS) for _ in range(NEW_SESSIONS)
        ]
        try:
            for session in sessions:
                session.__enter__()
            outputs = [
                new_model.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False, session=session).tolist()
                for session in sessions
            ]
            routes = [[span.peer_id for span in session.route] for session in sessions]
        finally:
            for session in sessions:
                session.__exit__(None, None, None)
        expected = local.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
        assert routes == [[other]] * NEW_SESSIONS, (routes, fast, other)
        assert outputs == [expected] * NEW_SESSIONS

        # the idle rule, for contrast, would have sent them to the busy replica (its idle throughput is the higher)
        snapshot = client.run(client.snapshot(model_prefix_for(str(model_path)), NUM_LAYERS), timeout=30)
        assert [span.peer_id for span in routing.inference_route(snapshot, rtts=client.rtts, rule="idle")] == [fast]
    finally:
        stop.set()
        for model in (busy_model, new_model):
            if model is not None:
                for thread in threads if model is busy_model else ():
                    thread.join(60)
                model.close()
        swarm.stop()
    expected_busy = local.generate(PROMPT_IDS, max_new_tokens=BUSY_TOKENS, do_sample=False)[0, PROMPT_IDS.shape[1] :]
    assert len(busy_outputs) == BUSY_SESSIONS
    assert all(tokens and tokens == expected_busy[: len(tokens)].tolist() for tokens in busy_outputs), busy_outputs


class SlowDownAt:
    """A streamer that SIGUSR1s the session's server at token ``at`` (a paced server started with --slow-on-usr1
    gets that many times slower) and remembers which server that was."""

    def __init__(self, session, swarm, at: int):
        self.session, self.swarm, self.at, self.count, self.slowed = session, swarm, at, 0, ""

    def put(self, value):
        self.count += 1
        if self.count == self.at:
            (span,) = self.session.route
            self.slowed = span.peer_id
            server = next(server for server in self.swarm.servers if peer_of(server) == span.peer_id)
            server.process.send_signal(signal.SIGUSR1)

    def end(self):
        pass


def test_a_session_whose_server_gets_slow_moves_to_the_other_replica_at_a_token_boundary(model_path, local, tmp_path):
    swarm = Swarm(model=model_path, workdir=tmp_path)
    try:
        pacing = ("--overhead-ms", "5", "--block-ms", "5", "--token-ms", "0", "--slow-on-usr1", "20")
        for _ in range(2):
            swarm.start(f"0:{NUM_LAYERS}", paced=pacing)  # 25 ms a step; 500 ms once slowed
        new_tokens = 40
        model = connect(model_path, swarm, snapshot_refresh=1.0)  # live load read every second
        try:
            with model.inference_session(max_length=PROMPT_IDS.shape[1] + new_tokens) as session:
                slower = SlowDownAt(session, swarm, at=4)
                output = model.generate(
                    PROMPT_IDS, max_new_tokens=new_tokens, do_sample=False, session=session, streamer=slower
                )
                (span,) = session.route
                moves, failovers = session.moves, session.failovers
        finally:
            model.close()
        expected = local.generate(PROMPT_IDS, max_new_tokens=new_tokens, do_sample=False)
        assert output.tolist() == expected.tolist()  # exact across the move: the cache was rebuilt from its inputs
        assert slower.slowed and span.peer_id != slower.slowed  # it ended on the replica that stayed fast
        assert moves == 1 and failovers == 0  # moved once, by choice: nothing failed
    finally:
        swarm.stop()


def test_a_client_at_a_servers_per_peer_cap_routes_its_next_sessions_elsewhere_without_a_refusal(
    model_path, local, tmp_path
):
    """Two replicas letting one peer open 2 sessions each; under the idle rule every session would go to the
    replica announcing the higher throughput, and a third would be refused there (PeerLimitError, a failover and a
    ban). The client counts its own sessions on each server (the server says how many in its info answers): the
    third and fourth go to the other replica, nothing fails, every token is exact."""
    swarm = Swarm(model=model_path, workdir=tmp_path)
    try:
        cap = ("--max-sessions-per-peer", "2")
        fast = peer_of(swarm.start(f"0:{NUM_LAYERS}", *cap, paced=FAST))
        other = peer_of(swarm.start(f"0:{NUM_LAYERS}", *cap, paced=OTHER))
        model = connect(model_path, swarm, routing="idle")
        sessions, outputs, routes, failovers = [], [], [], []
        try:
            for _ in range(4):  # each one open on its server before the next is routed, and kept open
                session = model.inference_session(max_length=PROMPT_IDS.shape[1] + NEW_TOKENS)
                sessions.append(session.__enter__())
                output = model.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False, session=session)
                outputs.append(output.tolist())
                routes.append([span.peer_id for span in session.route])
                failovers.append(session.failovers)
            client = model.petals_client
            client.run(client.is_alive(fast), timeout=10)
            held_on_fast = client.live[fast][1].your_sessions
            failed = dict(client.bans.failures)  # a refused opening is rerouted at once, but bans the refuser
        finally:
            for session in sessions:
                session.__exit__(None, None, None)
            model.close()
        expected = local.generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
        assert routes == [[fast], [fast], [other], [other]], (routes, fast, other)
        assert failovers == [0, 0, 0, 0] and failed == {}
        assert held_on_fast == 2  # the server's own count of this client's sessions, as it answered
        assert outputs == [expected] * 4
    finally:
        swarm.stop()
