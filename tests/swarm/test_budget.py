"""Server cache budgets over raw RPCs: full budgets refuse new sessions with a typed error while open sessions
stay exact, absurd sizes are refused before anything is allocated, and tokens come back when a session ends,
its client disconnects or it stays silent past the idle timeout.

One module swarm, two servers of a tiny model: ``budget`` (100 tokens, the default long idle timeout, so only
ending or disconnecting frees tokens there) and ``idle`` (100 tokens, a 2 s idle timeout).
"""

import time
from dataclasses import dataclass

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import transport
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.dht import fetch_snapshot
from petals_cli.errors import CacheExhaustedError, InvalidRequestError, SessionExpiredError, SessionLengthError
from petals_cli.testing import make_tiny_model
from petals_cli.wire import ServerInfo
from tests.conftest import Swarm
from tests.swarm import raw
from tests.swarm.checks import eventually
from tests.swarm.raw import RawSession, peer_id_of

pytestmark = pytest.mark.slow
PREFIX = "tiny-budget"
NUM_LAYERS = 2
HIDDEN_SIZE = 64
BUDGET = 100
PROMPT = "A server keeps the attention caches of many sessions within one budget"


@dataclass
class Servers:
    client: SwarmClient
    embeddings: torch.Tensor  # of a real prompt: realistic inputs for the exactness check
    initial_peers: tuple[str, ...]
    budget: str  # peer ids
    idle: str


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("budget") / PREFIX, "llama", num_layers=NUM_LAYERS)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        budget = swarm.start(":", "--cache-tokens", str(BUDGET), "--alloc-timeout", "0.5")
        idle = swarm.start(":", "--cache-tokens", str(BUDGET), "--session-idle-timeout", "2")
        initial_peers = tuple(swarm.initial_peers)
        client = SwarmClient(ClientConfig(initial_peers=initial_peers))
        try:
            yield Servers(client, prompt_embeddings(model), initial_peers, peer_id_of(budget), peer_id_of(idle))
        finally:
            client.close()
    finally:
        swarm.stop()


def prompt_embeddings(model) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(model)
    input_ids = AutoTokenizer.from_pretrained(model)(PROMPT, return_tensors="pt").input_ids[:, :12]
    with torch.no_grad():
        return local.get_input_embeddings()(input_ids)


async def open_session(client: SwarmClient, peer_id: str, max_length: int, batch_size: int = 1) -> RawSession:
    return await raw.open_session(client.stub(peer_id), PREFIX, NUM_LAYERS, max_length, batch_size)


async def forward(client: SwarmClient, peer_id: str, hidden: torch.Tensor) -> torch.Tensor:
    return await raw.forward(client.stub(peer_id), PREFIX, NUM_LAYERS, hidden)


def cache_tokens_left(client: SwarmClient, peer_id: str) -> int:
    info = client.run(client.stub(peer_id).rpc_info(runtime_pb2.ExpertUID(uid="")), timeout=10)
    return ServerInfo.from_wire(msgpack.unpackb(info.serialized_info)).cache_tokens_left


def announced_tokens_left(client: SwarmClient, peer_id: str) -> int | None:
    snapshot = client.run(fetch_snapshot(client.node, PREFIX, NUM_LAYERS), timeout=10)
    info = snapshot.servers.get(peer_id)
    return None if info is None else info.cache_tokens_left


def test_a_full_budget_refuses_new_sessions_while_the_open_one_stays_exact(servers):
    client, peer = servers.client, servers.budget
    inputs = servers.embeddings
    assert inputs.shape == (1, 12, HIDDEN_SIZE)
    first = client.run(open_session(client, peer, max_length=80), timeout=30)
    try:
        outputs = [client.run(first.step(inputs[:, :5]), timeout=30)]
        assert cache_tokens_left(client, peer) == BUDGET - 80
        with pytest.raises(CacheExhaustedError, match="waited"):
            client.run(open_session(client, peer, max_length=80), timeout=30)
        outputs.append(client.run(first.step(inputs[:, 5:11]), timeout=30))
        outputs.append(client.run(first.step(inputs[:, 11:]), timeout=30))
        # Long before the 30 s periodic announce, the swarm hears that the budget moved.
        assert eventually(lambda: announced_tokens_left(client, peer) == BUDGET - 80)
    finally:
        client.run(first.end(), timeout=30)
    reference = client.run(forward(client, peer, inputs), timeout=30)
    # The tiny model's large init scale drives hidden states into the hundreds; float32 noise grows with them.
    tolerance = 1e-4 + 1e-5 * reference.abs().max().item()
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference, atol=tolerance, rtol=0)
    assert eventually(lambda: cache_tokens_left(client, peer) == BUDGET)
    client.run(client.run(open_session(client, peer, max_length=80), timeout=30).end(), timeout=30)
    assert eventually(lambda: announced_tokens_left(client, peer) == BUDGET)


def test_absurd_sizes_are_refused_before_allocating_and_steps_stay_within_max_length(servers):
    client, peer = servers.client, servers.budget
    for max_length, batch_size in [(10**9, 1), (0, 1), (10, 10**6), (10, 0)]:
        with pytest.raises(InvalidRequestError):
            client.run(open_session(client, peer, max_length=max_length, batch_size=batch_size), timeout=30)
    with pytest.raises(CacheExhaustedError, match="whole budget"):
        client.run(open_session(client, peer, max_length=BUDGET + 1), timeout=30)
    session = client.run(open_session(client, peer, max_length=10), timeout=30)
    try:
        hidden = torch.randn(1, 8, HIDDEN_SIZE)
        assert client.run(session.step(hidden), timeout=30).shape == hidden.shape
        with pytest.raises(SessionLengthError):
            client.run(session.step(torch.randn(1, 3, HIDDEN_SIZE)), timeout=30)
        client.run(session.step(torch.randn(1, 2, HIDDEN_SIZE)), timeout=30)  # the refused step changed nothing
        assert session.position == 10
        with pytest.raises(SessionLengthError):
            client.run(session.step(torch.randn(1, 1, HIDDEN_SIZE)), timeout=30)
    finally:
        client.run(session.end(), timeout=30)
    assert eventually(lambda: cache_tokens_left(client, peer) == BUDGET)


def test_a_client_that_disconnects_gives_its_tokens_back(servers):
    client, peer = servers.client, servers.budget
    dropped = client.run(open_session(client, peer, max_length=80), timeout=30)
    client.run(dropped.step(torch.randn(1, 4, HIDDEN_SIZE)), timeout=30)
    assert cache_tokens_left(client, peer) == BUDGET - 80
    client.run(dropped.abort(), timeout=30)
    assert eventually(lambda: cache_tokens_left(client, peer) == BUDGET)

    # A whole client process going away (its P2P daemon with it) frees its sessions too.
    other = SwarmClient(ClientConfig(initial_peers=servers.initial_peers))
    try:
        orphan = other.run(open_session(other, peer, max_length=80), timeout=30)
        other.run(orphan.step(torch.randn(1, 4, HIDDEN_SIZE)), timeout=30)
        assert cache_tokens_left(client, peer) == BUDGET - 80
    finally:
        other.close()
    assert eventually(lambda: cache_tokens_left(client, peer) == BUDGET)


def test_a_silent_session_expires_while_an_active_one_lives_on(servers):
    client, peer = servers.client, servers.idle
    silent = client.run(open_session(client, peer, max_length=40), timeout=30)
    active = client.run(open_session(client, peer, max_length=40), timeout=30)
    try:
        client.run(silent.step(torch.randn(1, 4, HIDDEN_SIZE)), timeout=30)
        for _ in range(6):  # 3 s of steps half a second apart: longer than the 2 s idle timeout
            client.run(active.step(torch.randn(1, 1, HIDDEN_SIZE)), timeout=30)
            time.sleep(0.5)
        assert eventually(lambda: cache_tokens_left(client, peer) == BUDGET - 40)
        with pytest.raises(SessionExpiredError):
            transport.check_response(client.run(silent.receive(), timeout=30))
        client.run(active.step(torch.randn(1, 1, HIDDEN_SIZE)), timeout=30)
    finally:
        client.run(silent.abort(), timeout=30)
        client.run(active.end(), timeout=30)
    assert eventually(lambda: cache_tokens_left(client, peer) == BUDGET)
