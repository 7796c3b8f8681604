"""Verification through a real swarm: servers that tamper with their outputs (``petals_cli.testing.tamper``) are
caught by replicas of their blocks, outvoted by a third, banned and reported; honest replicas never disagree.

One swarm of a tiny two-block model: two honest replicas, each made of two servers (blocks 0:1 and 1:2), and two
servers holding both blocks, one that tampers with every output and one that tampers with 5% of them. A one-server
route is cheaper than a two-server one (and the liars announce an inflated throughput, as a server that wants
traffic would), so routes go through whichever liar a test lets the client use, and replicas are honest pairs.
"""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM, evidence
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.errors import VerificationError
from petals_cli.testing import make_tiny_model
from petals_cli.verify import checks_needed
from petals_cli.wire import model_prefix_for
from tests.cli.inprocess import run_here
from tests.conftest import Swarm
from tests.swarm.checks import eventually

pytestmark = pytest.mark.slow
PROMPT = torch.tensor([[1, 57, 210, 33, 98, 402, 17]])
RARE = 0.05  # the share of outputs the second tamperer alters


def peer_of(server) -> str:
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "llama", num_layers=2)
    swarm = Swarm(model=path, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        # honest replicas are two servers each (0:1 then 1:2): a liar holding both blocks is the one-hop route that
        # routing prefers, and every check and verdict needs a replica made of two servers
        honest = [swarm.start("0:1")]  # the first is every other's initial peer; the rest start side by side
        honest += [swarm.start(blocks, wait=False) for blocks in ("1:2", "0:1", "1:2")]
        always = swarm.start("0:2", wait=False, tamper=("--mode", "noise", "--scale", "0.05", "--attract"))
        rare = swarm.start(
            "0:2",
            wait=False,
            tamper=("--mode", "shift", "--scale", "0.5", "--probability", str(RARE), "--seed", "3", "--attract"),
        )
        for server in swarm.servers[1:]:
            swarm.wait_ready(server)
        everyone = {peer_of(server) for server in swarm.servers}
        client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
        try:  # every record visible before a test routes (a check that finds no replica would verify nothing)
            prefix = model_prefix_for(str(path))

            def announced() -> bool:
                return set(client.run(client.snapshot(prefix, 2, max_age=0)).online()) >= everyone

            assert eventually(announced, timeout=30, interval=0.2)
        finally:
            client.close()
        yield swarm, [peer_of(server) for server in honest], peer_of(always), peer_of(rare)
    finally:
        swarm.stop()


@pytest.fixture
def log(tmp_path, monkeypatch):
    path = tmp_path / "verification.jsonl"
    monkeypatch.setenv("PETALS_EVIDENCE_LOG", str(path))
    monkeypatch.setenv("PETALS_CACHE_DIR", str(tmp_path))  # the reporter's key
    return path


def routes_through(model, peer: str, timeout: float = 20.0) -> bool:
    """Wait until ``model``'s client would route a session through ``peer``: a server that missed a ping under load
    is avoided until its round-trip time, which that miss raised, has come down again."""
    client = model.petals_client

    def chosen() -> bool:
        route = client.run(client.route(model.petals_prefix, model.petals_num_blocks, cache_tokens_needed=64, wait=0))
        return peer in {span.peer_id for span in route}

    return eventually(chosen, timeout=timeout, interval=0.5)


@pytest.fixture
def routed(monkeypatch) -> list[set[str]]:
    """The servers of every route a client of this process chose (sessions, replicas and judges), in order."""
    peers: list[set[str]] = []
    choose_route = SwarmClient.route

    async def recorded_route(client, *args, **kwargs):
        route = await choose_route(client, *args, **kwargs)
        peers.append({span.peer_id for span in route})
        return route

    monkeypatch.setattr(SwarmClient, "route", recorded_route)
    return peers


def caught_at_the_first_step(record: evidence.Evidence, model_path, input_ids: torch.Tensor) -> bool:
    """Whether the check that caught a liar of the first blocks covered exactly the prompt: the inputs it reports
    (their hash holds their shape) are the first step's, the prompt's embeddings, and the first wrong output is its
    first token. A later catch reports the inputs of every token up to the step it checked."""
    embeddings = AutoModelForCausalLM.from_pretrained(model_path).get_input_embeddings()(input_ids).detach()
    return record.position == 0 and record.inputs_sha256 == evidence.tensor_sha256(embeddings)


def open_model(swarm, **config):
    # routes by idle throughput: the load rule spreads near-equal routes at random, and would now and then send the
    # first block through an honest server and only the second through a liar (caught on other inputs than the prompt)
    config.setdefault("routing", "idle")
    config = ClientConfig(initial_peers=tuple(swarm[0].initial_peers), **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(swarm[0].model), config=config)


@pytest.mark.parametrize("push", [True, False])
def test_a_server_tampering_every_step_is_caught_at_once_and_the_tokens_stay_honest(swarm, log, routed, push):
    servers, honest, always, rare = swarm
    model = open_model(swarm, verify_rate=0.1, verify_seed=1, blocked_servers=(rare,), push=push)
    try:
        for _ in range(3):  # a liar that missed a ping under load is routed around for a moment: then try again
            routes_through(model, always)
            routed.clear()
            with model.inference_session(max_length=64) as session:
                output = model.generate(PROMPT, max_new_tokens=20, do_sample=False, session=session)
                route = [span.peer_id for span in session.route]
            if session.caught:
                break
            # a retry is fair only when no route of this try (session, replicas, judges) went through the liar
            assert routed and not any(always in chosen for chosen in routed), "the liar served it and was not caught"
            time.sleep(2)
        assert session.caught == 1 and always not in route
        assert always in model.petals_client.bans.forever
    finally:
        model.close()
    local = AutoModelForCausalLM.from_pretrained(servers.model).eval()
    assert output.tolist() == local.generate(PROMPT, max_new_tokens=20, do_sample=False).tolist()
    records = evidence.read(log)
    assert len(records) == 1 and records[0][1]  # signed by this machine's reporter key
    record = records[0][0]
    assert record.suspect == always and set(record.witnesses) <= set(honest) and record.kind == "inference"
    assert record.max_error > record.tolerance and evidence.flagged(log) == {always: 1}
    assert caught_at_the_first_step(record, servers.model, PROMPT), record


def test_without_a_third_replica_the_client_stops_naming_both_servers(swarm, log):
    _, honest, always, _ = swarm
    model = open_model(swarm, verify_rate=0.1, allowed_servers=(always, honest[0], honest[1]))
    try:
        with pytest.raises(VerificationError) as stopped, model.inference_session(max_length=32) as session:
            model.generate(PROMPT, max_new_tokens=4, do_sample=False, session=session)
        assert always in str(stopped.value) and honest[0] in str(stopped.value)
    finally:
        model.close()
    assert evidence.read(log) == []  # no majority, no accusation


def test_forward_and_backward_of_a_tampering_server_are_caught_and_gradients_stay_exact(swarm, log):
    """Training routes spread requests over replicas at random; a server's first request is always checked, so the
    tamperer is caught the first time a route (or a check) uses it, and every result stays exact."""
    servers, honest, always, rare = swarm
    model = open_model(swarm, verify_rate=0.1, verify_seed=2, blocked_servers=(rare,))
    local = AutoModelForCausalLM.from_pretrained(servers.model).eval()
    reference_embeddings = local.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
    reference = local(inputs_embeds=reference_embeddings).logits
    reference.square().mean().backward()
    try:
        for _ in range(10):
            embeddings = model.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
            remote = model(inputs_embeds=embeddings).logits
            remote.square().mean().backward()
            torch.testing.assert_close(remote, reference, atol=1e-4, rtol=0)
            torch.testing.assert_close(embeddings.grad, reference_embeddings.grad, atol=1e-5, rtol=1e-4)
            if always in model.petals_client.bans.forever:
                break
        assert always in model.petals_client.bans.forever
    finally:
        model.close()
    kinds = {record.kind for record, valid in evidence.read(log) if valid and record.suspect == always}
    assert kinds and kinds <= {"forward", "backward"}


def test_a_server_tampering_rarely_is_caught_within_the_predicted_number_of_steps(swarm, log):
    """P(caught within n steps) >= 95% for n = checks_needed(rate, p): 20 sessions, each stepping until the
    tamperer is caught or n steps pass (then the checks still running are settled). Binomial(20, 0.95) falls to 16
    or fewer successes with probability 1.6%, so 17 is the bar."""
    _, honest, always, rare = swarm
    rate = 0.2
    limit = checks_needed(rate, RARE)
    model = open_model(swarm, verify_rate=rate, verify_seed=4, blocked_servers=(always,))
    client, generator = model.petals_client, torch.Generator().manual_seed(0)
    caught_at = []
    try:
        for _ in range(40):
            if len(caught_at) == 20:
                break
            client.bans.forever.discard(rare)  # each trial starts trusting it again
            with model.inference_session(max_length=limit + 8) as session:
                session.step(torch.randn(1, 4, model.config.hidden_size, generator=generator))
                routed_around = rare not in [span.peer_id for span in session.route] and not session.caught
                if routed_around:  # the liar missed a ping under load: not a trial
                    time.sleep(1)
                    continue
                steps = 1
                while not session.caught and steps < limit:
                    session.step(torch.randn(1, 1, model.config.hidden_size, generator=generator))
                    steps += 1
                session.settle_checks()  # checks started by step n count: they cover every token up to it
                caught_at.append(steps if session.caught else None)
    finally:
        model.close()
    within = [steps for steps in caught_at if steps is not None]
    assert len(caught_at) == 20 and len(within) >= 17, (limit, caught_at)
    assert evidence.flagged(log) == {rare: len(within)}


def test_honest_replicas_never_disagree(swarm, log):
    """Checks back to back, padded batches of two, 159 tokens: no check may fail (benchmarks/verify.py runs 10,000
    steps)."""
    _, honest, _, _ = swarm
    model = open_model(swarm, verify_rate=1.0, allowed_servers=tuple(honest))
    generator = torch.Generator().manual_seed(5)
    try:
        with model.inference_session(max_length=160, batch_size=2) as session:
            mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
            session.step(torch.randn(2, 9, model.config.hidden_size, generator=generator), attention_mask=mask)
            for _ in range(150):
                session.step(torch.randn(2, 1, model.config.hidden_size, generator=generator))
            assert session.caught == 0 and session.verified_tokens >= 140  # the last checks may still be running
    finally:
        model.close()
    assert not log.exists()


def test_the_cli_verifies_and_swarm_status_flags_the_liar(swarm, log, routed, monkeypatch, capsys):
    from transformers import AutoTokenizer

    servers, honest, always, rare = swarm
    peers = ("--initial-peers", *servers.initial_peers)
    monkeypatch.setenv("PETALS_ROUTING", "idle")  # as open_model: the liar serves both blocks or none
    expected = run_here(
        monkeypatch, capsys, "generate", str(servers.model), "--prompt", "one two three", "--max-new-tokens", "8",
        "--allowed-servers", honest[0], "--allowed-servers", honest[1], "--json", *peers,
    )  # fmt: skip
    for _ in range(3):  # each run is a new client: under load it may route around a liar that missed a ping
        routed.clear()
        result = run_here(
            monkeypatch, capsys, "generate", str(servers.model), "--prompt", "one two three", "--max-new-tokens", "8",
            "--verify", "0.1", "--blocked-servers", rare, "--json", *peers,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        verified = json.loads(result.stdout)
        assert verified["token_ids"] == json.loads(expected.stdout)["token_ids"]
        if verified["verification"]["caught"]:
            break
        # a retry is fair only when no route of this run (session, replicas, judges) went through the liar
        assert routed and not any(always in chosen for chosen in routed), "the liar served the run and was not caught"
        time.sleep(2)
    assert verified["verification"]["caught"] == [always]
    assert "verification" not in json.loads(expected.stdout)  # only with --verify
    (record, signed), *others = evidence.read(log)
    assert not others and signed and record.suspect == always
    input_ids = AutoTokenizer.from_pretrained(servers.model)("one two three", return_tensors="pt").input_ids
    assert caught_at_the_first_step(record, servers.model, input_ids), record  # its first check, the prompt's
    status = run_here(monkeypatch, capsys, "swarm", "status", "--json", *peers)
    flags = {
        server["peer_id"]: server["flagged"]
        for model in json.loads(status.stdout)["models"]
        for server in model["servers"]
    }
    assert flags[always] == 1 and flags[honest[0]] == flags[honest[1]] == 0
