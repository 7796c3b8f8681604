"""Graceful degradation: a server that loses its DHT keeps serving; a step past its deadline fails alone."""

import asyncio
import os
import resource
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.errors import ServerError
from petals_cli.testing import make_tiny_model
from petals_cli.wire import ServerState, model_prefix_for
from tests.conftest import ServerProcess, Swarm, petals_command
from tests.swarm.checks import eventually
from tests.swarm.raw import open_session, peer_id_of

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_bootstrap(workdir, port: int) -> tuple[subprocess.Popen, str]:
    command = petals_command("swarm", "bootstrap", "--identity", str(workdir / "bootstrap.key"), "--port", str(port))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return process, process.stdout.readline().strip().split()[1]  # "--initial-peers MADDR"


def online_servers(model) -> set[int]:
    client = model.petals_client
    snapshot = client.run(client.snapshot(model.petals_prefix, model.petals_num_blocks, max_age=0), timeout=30)
    return {info.start_block for info in snapshot.servers.values() if info.state == ServerState.ONLINE}


def test_a_server_serves_on_without_its_dht_peer_and_reannounces_when_it_returns(tmp_path):
    model_path = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2)
    port = free_port()
    bootstrap, address = start_bootstrap(tmp_path, port)
    swarm = Swarm(model=model_path, workdir=tmp_path)
    log_file, address_file = tmp_path / "server.log", tmp_path / "server.addr"
    command = petals_command(
        "serve", str(model_path), "--blocks", "0:2", "--initial-peers", address, "--address-file", str(address_file)
    )
    with open(log_file, "wb") as log:
        env = {**os.environ, "PETALS_ANNOUNCE_PERIOD": "1"}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess("0:2", process, address_file, log_file)
    swarm.servers.append(server)
    distributed = None
    try:
        swarm.wait_ready(server)
        distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model_path), initial_peers=[address])
        local = AutoModelForCausalLM.from_pretrained(model_path).eval()
        input_ids = torch.tensor([[1, 40, 41, 42, 43]])
        expected = local.generate(input_ids, max_new_tokens=12, do_sample=False)
        with distributed.inference_session(max_length=32) as session:
            first = distributed.generate(input_ids, max_new_tokens=6, do_sample=False, session=session)
            bootstrap.send_signal(signal.SIGKILL)  # the server's only DHT peer is gone
            bootstrap.wait()
            output = distributed.generate(first, max_new_tokens=6, do_sample=False, session=session)
        assert output.tolist() == expected.tolist()
        assert server.process.poll() is None
        bootstrap, _ = start_bootstrap(tmp_path, port)  # back, with an empty DHT, at the same address
        newcomer = AutoDistributedModelForCausalLM.from_pretrained(str(model_path), initial_peers=[address])
        try:
            assert eventually(lambda: online_servers(newcomer) == {0}, timeout=30)
            again = newcomer.generate(input_ids, max_new_tokens=12, do_sample=False)
            assert again.tolist() == expected.tolist()
        finally:
            newcomer.close()
    finally:
        if distributed is not None:
            distributed.close()
        swarm.stop()
        bootstrap.kill()
        bootstrap.wait()


def test_a_step_past_the_deadline_fails_alone_and_the_server_serves_on(tmp_path):
    model_path = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2, hidden_size=256, num_heads=4)
    swarm = Swarm(model=model_path, workdir=tmp_path)
    try:
        server = swarm.start("0:2", "--step-timeout", "0.05")
        client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
        try:
            stub = client.stub(peer_id_of(server))
            prefix = model_prefix_for(str(model_path))

            async def scenario():
                slow = await open_session(stub, prefix, 2, 4096)
                with pytest.raises(ServerError, match="deadline"):
                    await slow.step(torch.randn(1, 4000, 256))  # seconds of compute here: far past 0.05 s
                await slow.abort()  # the server ended this broken session itself
                for _ in range(100):  # the compute thread finishes the slow step first; then steps are quick again
                    quick = await open_session(stub, prefix, 2, 16)
                    try:
                        outputs = [await quick.step(torch.randn(1, 1, 256)) for _ in range(3)]
                    except ServerError as error:
                        assert "deadline" in str(error)
                        await quick.abort()
                        await asyncio.sleep(0.2)
                        continue
                    await quick.end()
                    return outputs
                raise AssertionError("the server never became quick again")

            outputs = client.run(scenario(), timeout=120)
            assert all(output.shape == (1, 1, 256) and torch.isfinite(output).all() for output in outputs)
        finally:
            client.close()
        assert server.process.poll() is None
    finally:
        swarm.stop()


def test_running_out_of_memory_fails_that_request_only(tmp_path):
    # a wide MLP: an 8000-token prefill needs several 125 MiB activations, whatever attention kernel runs
    model_path = make_tiny_model(
        tmp_path / "tiny", "llama", num_layers=2, hidden_size=256, num_heads=4, intermediate_size=4096
    )
    swarm = Swarm(model=model_path, workdir=tmp_path)
    try:
        server = swarm.start("0:2")
        steps = torch.randn(3, 1, 1, 256, generator=torch.Generator().manual_seed(0))
        client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
        try:
            stub = client.stub(peer_id_of(server))
            prefix = model_prefix_for(str(model_path))

            async def warm_up():  # the compute thread and torch's thread pool exist before memory gets short
                session = await open_session(stub, prefix, 2, 512)
                await session.step(torch.randn(1, 512, 256))
                await session.end()

            async def scenario():
                greedy = await open_session(stub, prefix, 2, 8000)
                with pytest.raises(ServerError, match="ran out of memory"):
                    await greedy.step(torch.randn(1, 8000, 256))
                await greedy.abort()  # the server ended this session after the failed step
                modest = await open_session(stub, prefix, 2, 16)
                outputs = [await modest.step(hidden) for hidden in steps]
                await modest.end()
                return outputs

            client.run(warm_up(), timeout=120)
            # From now on the server process may map only 64 MiB more (its libp2p daemon, already running, is
            # unaffected): the long prefill's activations cannot be allocated, small steps still can.
            status = Path(f"/proc/{server.process.pid}/status").read_text()
            mapped = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
            resource.prlimit(server.process.pid, resource.RLIMIT_AS, (mapped + 64 * 2**20, resource.RLIM_INFINITY))
            outputs = client.run(scenario(), timeout=120)
        finally:
            client.close()
        assert server.process.poll() is None
        local = load_span_for(model_path)
        cache = local.make_cache(0, 2)
        with torch.no_grad():
            expected = [local(hidden, 0, 2, cache) for hidden in steps]
        for output, reference in zip(outputs, expected, strict=True):
            torch.testing.assert_close(output, reference, atol=1e-4, rtol=1e-4)
    finally:
        swarm.stop()


def load_span_for(model_path):
    from petals_cli.checkpoint import resolve_model
    from petals_cli.server.blocks import load_span, read_model_config

    source = resolve_model(str(model_path))
    return load_span(source, read_model_config(source), 0, 2, device="cpu", dtype=torch.float32)
