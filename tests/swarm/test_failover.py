"""Servers killed for real (SIGKILL) while a client uses them: the client routes around them, exactly."""

import signal
import subprocess
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.client.autograd import RemoteChain
from petals_cli.client.inference import InferenceSession
from petals_cli.config import ClientConfig
from petals_cli.routing import RouteSpan
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm, petals_command

pytestmark = pytest.mark.slow
NUM_LAYERS = 6
PROMPT_IDS = torch.tensor([[1, 57, 210, 33, 98, 402, 17]])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-failover", "llama", num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path).eval()


@pytest.fixture
def swarm(model_path, tmp_path):
    swarm = Swarm(model=model_path, workdir=tmp_path)
    yield swarm
    swarm.stop()


def connect(model_path, swarm, **config):
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(model_path), config=config)


def server_of(swarm, peer_id):
    return next(server for server in swarm.servers if server.addresses()[0].endswith(peer_id))


class KillAt:
    """A streamer that SIGKILLs the server of hop ``hop`` (the last by default) of ``session`` at the n-th token."""

    def __init__(self, swarm, session, at: int, hop: int = -1):
        self.swarm, self.session, self.at, self.hop, self.count = swarm, session, at, hop, 0
        self.killed = ""  # the peer id of the killed server

    def put(self, value):
        self.count += 1
        if self.count == self.at:
            self.killed = self.session.route[self.hop].peer_id
            process = server_of(self.swarm, self.killed).process
            process.send_signal(signal.SIGKILL)
            process.wait()  # dead before the next step is sent

    def end(self):
        pass


def test_sigkill_of_a_server_batching_several_sessions_fails_over_exactly_and_spares_the_others(
    swarm, model_path, local
):
    swarm.start_many("0:3", "3:6", "3:6")
    prompts = [PROMPT_IDS, *(torch.tensor([[1, *range(20 + index, 24 + 2 * index)]]) for index in range(3))]
    expected = [local.generate(prompt, max_new_tokens=40, do_sample=False).tolist() for prompt in prompts]
    model = connect(model_path, swarm)
    outputs, routes, failovers, errors = [None] * 4, [None] * 4, [0] * 4, []
    killer_ready = threading.Event()

    def run(index):
        try:
            with model.inference_session(max_length=prompts[index].shape[1] + 40) as session:
                if index == 0:  # the others are generating by the time it kills the server of its blocks 3:6
                    killer_ready.wait(30)
                    streamer = KillAt(swarm, session, 15)
                else:
                    streamer = FirstRoute(session, killer_ready)
                outputs[index] = model.generate(
                    prompts[index], max_new_tokens=40, do_sample=False, session=session, streamer=streamer
                ).tolist()
                routes[index] = {streamer.killed} if index == 0 else streamer.peers
                failovers[index] = session.failovers
        except Exception as exc:  # reported below with its index
            errors.append((index, exc))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        largest = [engine_figures(model, server)["largest_batch"] for server in swarm.servers[:1]]
    finally:
        model.close()
    assert not errors
    assert outputs == expected  # every session's tokens equal local transformers, the failed-over one too
    assert failovers[0] >= 1
    (killed,) = routes[0]
    for index in range(1, len(prompts)):
        if killed not in routes[index]:  # sessions that never used the killed server never failed over
            assert failovers[index] == 0, (index, failovers)
    assert largest[0] > 1  # the first server batched the sessions' steps


def test_steps_pushed_server_to_server_survive_a_sigkill_of_the_middle_server_exactly(swarm, model_path, local):
    swarm.start_many("0:2", "2:4", "4:6", "2:4")
    expected = local.generate(PROMPT_IDS, max_new_tokens=30, do_sample=False).tolist()
    relayed = {}
    for push in (False, True):
        model = connect(model_path, swarm, push=push)
        try:
            with model.inference_session(max_length=PROMPT_IDS.shape[1] + 30) as session:
                streamer = KillAt(swarm, session, 12, hop=1) if push else None
                output = model.generate(
                    PROMPT_IDS, max_new_tokens=30, do_sample=False, session=session, streamer=streamer
                )
                assert output.tolist() == expected, f"push={push}"
                relayed[push] = session.relayed_hops
                if push:
                    assert session.failovers >= 1 and streamer.killed not in {span.peer_id for span in session.route}
        finally:
            model.close()
    assert relayed[False] == 2 * 30  # without push the client passes every step from server to server itself
    # with push it relays only around the failure: the push to the dead server, then the rebuilt hops of that step
    assert relayed[True] <= 3


def test_generate_losing_the_only_server_of_a_span_exits_5_naming_its_blocks_in_few_lines(swarm, model_path):
    swarm.start_many("0:3", "3:6")
    command = petals_command(
        "generate", str(model_path), "--prompt", "hello", "--max-new-tokens", "1000", "--stream", "--route-wait", "1",
        "--initial-peers", *swarm.initial_peers,
    )  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.read(4)  # tokens are streaming: the session runs through both servers
        swarm.servers[1].process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)  # the timeout only bounds a hang
    finally:
        process.kill()
    lines = stderr.decode(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert process.returncode == 5, lines  # NoRouteError, not a server error nor "a bug"
    assert len(errors) == 1 and errors[0].startswith("error: no live server holds blocks 3:6"), lines
    # One line said the server failed and a failover began; no retry, ban or transport chatter besides.
    assert len(lines) <= 2 and "failing over" in lines[0], lines


class FirstRoute:
    """A streamer that notes the servers of a session's route at its first token, and then sets ``ready``."""

    def __init__(self, session, ready: threading.Event):
        self.session, self.ready, self.peers = session, ready, set()

    def put(self, value):
        if not self.peers and self.session.route:
            self.peers = {span.peer_id for span in self.session.route}
            self.ready.set()

    def end(self):
        pass


class FirstRouteThrough(RemoteChain):
    """Sends the first request of blocks [3, 6) to a chosen (dead) server; real routing afterwards."""

    def __init__(self, *args, first_peer: str):
        super().__init__(*args)
        self.first_peer = first_peer

    async def route(self, start, end):
        if self.first_peer and start == 3:
            peer, self.first_peer = self.first_peer, ""
            return [RouteSpan(peer, start, end)]
        return await super().route(start, end)


def test_training_survives_sigkill_in_forward_and_in_backward(swarm, model_path, local):
    swarm.start_many("0:3", "3:6", "3:6")
    model = connect(model_path, swarm)
    try:
        embeddings = local.get_input_embeddings()(PROMPT_IDS).detach()
        client = model.petals_client
        snapshot = client.run(client.snapshot(model.petals_prefix, NUM_LAYERS))
        replicas = [peer for peer, info in snapshot.online().items() if info.start_block == 3]
        # Forward: the first server asked for blocks 3:6 is already dead.
        server_of(swarm, replicas[0]).process.send_signal(signal.SIGKILL)
        server_of(swarm, replicas[0]).process.wait()
        chain = FirstRouteThrough(client, model.petals_prefix, NUM_LAYERS, first_peer=replicas[0])
        hops, output = client.run(chain.forward(embeddings, 0, NUM_LAYERS))
        assert hops[-1].span.peer_id == replicas[1]
        with torch.no_grad():
            torch.testing.assert_close(output, _blocks_output(local, embeddings), atol=1e-5, rtol=0)
        # Backward: the server that did the forward of blocks 0:3 dies before the backward; restart a replica.
        swarm.start("0:3")
        server_of(swarm, hops[0].span.peer_id).process.send_signal(signal.SIGKILL)
        grad_output = torch.randn_like(output, generator=torch.Generator().manual_seed(1))
        grad = client.run(chain.backward(hops, grad_output))
    finally:
        model.close()
    leaf = embeddings.clone().requires_grad_(True)
    _blocks_output(local, leaf).backward(grad_output)
    torch.testing.assert_close(grad, leaf.grad, atol=1e-5, rtol=1e-4)


def _blocks_output(local, embeddings):
    """Hidden states after the last block, before the final norm (what the swarm returns)."""
    captured = {}
    handle = local.model.norm.register_forward_pre_hook(lambda module, args: captured.setdefault("h", args[0]))
    try:
        local(inputs_embeds=embeddings)
    finally:
        handle.remove()
    return captured["h"]


def test_eight_concurrent_sessions_give_the_same_tokens_as_one_by_one(swarm, model_path, local):
    swarm.start_many("0:2", "2:6", "0:4", "4:6")
    prompts = [torch.tensor([[1, *range(10 + index, 10 + index + 3 + index)]]) for index in range(8)]
    expected = [local.generate(prompt, max_new_tokens=12, do_sample=False) for prompt in prompts]
    model = connect(model_path, swarm)
    results, errors = [None] * len(prompts), []

    def run(index):
        try:
            results[index] = model.generate(prompts[index], max_new_tokens=12, do_sample=False)
        except Exception as exc:  # reported below with its index
            errors.append((index, exc))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        largest = [engine_figures(model, server)["largest_batch"] for server in swarm.servers]
    finally:
        model.close()
    assert not errors
    for result, reference in zip(results, expected, strict=True):
        assert result.tolist() == reference.tolist()
    assert max(largest) > 1, largest  # the servers' step engines ran steps of several sessions as one batch


def engine_figures(model, server) -> dict:
    """A server's live rpc_info, as a ServerInfo's fields."""
    import msgpack
    from hivemind.proto import runtime_pb2

    from petals_cli.wire import ServerInfo

    client, peer = model.petals_client, server.addresses()[0].rsplit("/p2p/", 1)[1]
    answer = client.run(client.stub(peer).rpc_info(runtime_pb2.ExpertUID(uid="")), timeout=10)
    info = ServerInfo.from_wire(msgpack.unpackb(answer.serialized_info, raw=False))
    return {"largest_batch": info.largest_batch, "batch_size": info.batch_size, "queue_length": info.queue_length}


def FirstOpenOn(*args, first_peer: str, **kwargs) -> InferenceSession:
    """A session that opens its first streams on ``first_peer``, whatever the client's snapshot says; real routing
    afterwards."""
    session = InferenceSession(*args, **kwargs)
    real_route, first = session.opener.route, [first_peer]

    async def route(start, end, *, wait=None, exclude=()):
        if first:
            return [RouteSpan(first.pop(), start, end)]
        return await real_route(start, end, wait=wait, exclude=exclude)

    session.opener.route = route
    return session


def test_a_full_server_refuses_cleanly_and_sessions_go_elsewhere(swarm, model_path, local):
    small = swarm.start("0:6", "--cache-tokens", "64")
    big = swarm.start("0:6")
    small_peer, big_peer = (server.addresses()[0].rsplit("/p2p/", 1)[1] for server in (small, big))
    model = connect(model_path, swarm)
    prompts = [torch.tensor([[1, 40 + index, 41, 42 + index]]) for index in range(3)]
    try:
        # Each session asks the small server first: a client whose snapshot shows it full (or the other server
        # cheaper) would never ask it. 64 tokens fit the first session of 60, not the next two.
        sessions = [
            FirstOpenOn(model.petals_client, model.petals_prefix, NUM_LAYERS, max_length=60, first_peer=small_peer)
            for _ in prompts
        ]
        first = [
            model.generate(prompt, max_new_tokens=10, do_sample=False, session=session)
            for prompt, session in zip(prompts, sessions, strict=True)
        ]
        # Every session is still open; now each continues where it stopped, on whichever server holds it.
        second = [
            model.generate(output, max_new_tokens=10, do_sample=False, session=session)
            for output, session in zip(first, sessions, strict=True)
        ]
        routes = [session.route for session in sessions]
        failovers = [session.failovers for session in sessions]
        for session in sessions:
            session.close()
    finally:
        model.close()
    assert [route[0].peer_id for route in routes] == [small_peer, big_peer, big_peer]
    assert failovers == [0, 0, 0]  # the refusals came at opening; no open session was disturbed
    # The small server itself refused the other two, with the typed error, while the first one held its tokens.
    refusals = [line for line in small.log().splitlines() if "session refused" in line]
    assert len(refusals) == 2
    assert all(
        "CacheExhaustedError: session needs 60 cache tokens, this server has 4 of 64 left" in line for line in refusals
    )
    for prompt, output in zip(prompts, second, strict=True):
        assert output.tolist() == local.generate(prompt, max_new_tokens=20, do_sample=False).tolist()
