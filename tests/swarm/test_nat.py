"""Servers behind NATs on the emulated WAN (``testing/wan.py``): they find out by themselves that nobody can dial
them, serve through relays (the bootstrap peers), are shown relayed, serve exact tokens (pushed to and from them),
and a relay that dies during a generation leaves them served through the other. The swarm is private: a peer
without its key reaches a relayed server through a relay and is refused. Every peer is a real process in its own
network namespace.

The hosts sit in 11.77.0.0/24, an address range libp2p takes for public: it builds relayed addresses only from
a relay's public addresses (on a private range a server behind a NAT never gets one, as on the real internet).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import security
from petals_cli.testing import make_tiny_model, wan
from petals_cli.testing.swarm import petals_command

PROMPT = "A server behind a router"
SUBNET = "11.77.0"
RTT_MS = 20.0
START_TIMEOUT = 120.0
HOSTS = {"relay_a": 0, "relay_b": 1, "direct": 2, "cone": 3, "symmetric": 4, "client": 5}
SPANS = {"direct": "0:2", "cone": "2:4", "symmetric": "4:6"}

pytestmark = [
    pytest.mark.skipif(wan.unavailable() is not None, reason=f"an emulated WAN {wan.unavailable()}"),
    pytest.mark.timeout(600),
]


class Peers:
    """Processes on the WAN's hosts, each logging to a file; all killed at the end."""

    def __init__(self, network: wan.Wan, workdir: Path):
        self.wan, self.workdir = network, workdir
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, key: Path | None = None) -> Path:
        address_file = self.workdir / f"{name}.addr"
        command = [*self.wan.exec_prefix(HOSTS[name]), *petals_command(*args), "--address-file", str(address_file)]
        command += ["--swarm-key", str(key)] if key else []
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(command, stdout=log, stderr=log)
        return address_file

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def wait(self, name: str, address_file: Path) -> list[str]:
        deadline = time.monotonic() + START_TIMEOUT
        while not (address_file.exists() and address_file.read_text().strip()):
            assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name} did not start:\n{self.log(name)[-3000:]}"
            time.sleep(0.1)
        return address_file.read_text().split()

    def client(self, *args: str, key: Path) -> list[str]:
        return [*self.wan.exec_prefix(HOSTS["client"]), *petals_command(*args), "--swarm-key", str(key)]

    def run(self, *args: str, key: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.client(*args, key=key), capture_output=True, text=True, timeout=timeout)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nat")
    model = make_tiny_model(workdir / "llama", "llama", num_layers=6)
    network = wan.Wan(len(HOSTS), subnet=SUBNET, nat={HOSTS["cone"]: "cone", HOSTS["symmetric"]: "symmetric"})
    network.start()
    peers = Peers(network, workdir)
    key = workdir / "swarm.key"
    key.write_text(security.SwarmKey.generate())
    try:
        network.configure(rtt_ms=RTT_MS)
        relays = []
        for name in ("relay_a", "relay_b"):
            address_file = peers.start(name, "swarm", "bootstrap", "--host", network.address(HOSTS[name]), key=key)
            relays.append(address_file)
        initial = [peers.wait(name, file)[0] for name, file in zip(("relay_a", "relay_b"), relays, strict=True)]
        started, files = {}, {}
        for name, span in SPANS.items():
            started[name] = time.monotonic()
            files[name] = peers.start(
                name, "serve", str(model), "--blocks", span, "--host", network.address(HOSTS[name]),
                *_initial_peers(initial), key=key,
            )  # fmt: skip
        addresses = {name: peers.wait(name, files[name]) for name in SPANS}
        served_after = {name: time.monotonic() - started[name] for name in SPANS}
        yield model, network, peers, initial, addresses, served_after, key
    finally:
        peers.close()
        network.close()


def _status(peers: Peers, initial: list[str], model: Path, key: Path) -> dict[str, dict]:
    result = peers.run("swarm", "status", "--model", str(model), "--json", *_initial_peers(initial), key=key)
    assert result.returncode == 0, result.stderr[-3000:]
    servers = json.loads(result.stdout)["models"][0]["servers"]
    return {server["peer_id"]: server for server in servers}


def _generate_command(peers: Peers, initial: list[str], model: Path, key: Path, tokens: int) -> list[str]:
    generate = ("generate", str(model), "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--json", "-v")
    return peers.client(*generate, *_initial_peers(initial), key=key)


def _generate(peers: Peers, initial: list[str], model: Path, key: Path, tokens: int = 12) -> list[int]:
    result = subprocess.run(_generate_command(peers, initial, model, key, tokens), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["token_ids"]


# a peer without the swarm's key calls a relayed server: through the relay (its daemon finds it there), refused
OUTSIDER = """
import asyncio, sys
from hivemind.proto import runtime_pb2
from petals_cli import daemon, security
async def main():
    p2p = await daemon.create_p2p("0.0.0.0", initial_peers=[sys.argv[1]], client_mode=True)
    try:
        for _ in range(10):  # a new daemon's routing table fills in its first second: "failed to find any peer"
            try:
                stub = security.blocks_stub(p2p, sys.argv[2], None)
                await stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=20)
                print("ANSWERED")
                return
            except Exception as exc:
                if "find any peer" not in str(exc):
                    print("FAILED", exc)
                    return
                await asyncio.sleep(1)
        print("NOT FOUND")
    finally:
        await p2p.shutdown()
asyncio.run(main())
"""


def _local_greedy(model: Path, tokens: int = 12) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return local.generate(input_ids, max_new_tokens=tokens, do_sample=False)[0, input_ids.shape[1] :].tolist()


def _initial_peers(initial: list[str]) -> list[str]:
    return [word for address in initial for word in ("--initial-peers", address)]


def _peer_id(addresses: list[str]) -> str:
    return addresses[0].rsplit("/p2p/", 1)[1]


def test_servers_behind_nats_find_out_serve_through_relays_and_survive_a_relay_dying(setup):
    model, network, peers, initial, addresses, served_after, key = setup
    print("serving after (s):", {name: round(seconds, 1) for name, seconds in served_after.items()})
    relay_ids = [_peer_id([address]) for address in initial]
    # each server found out by itself whether peers could dial it
    assert "behind a NAT" not in peers.log("direct")
    for name in ("cone", "symmetric"):
        assert "behind a NAT or firewall (2 of 2 peers could not dial" in peers.log(name), peers.log(name)[-3000:]
        assert all("/p2p-circuit/" in address for address in addresses[name]), addresses[name]
    assert not any("/p2p-circuit/" in address for address in addresses["direct"])

    status = _status(peers, initial, model, key)
    ids = {name: _peer_id(addresses[name]) for name in SPANS}
    assert status[ids["direct"]]["connection"] == "direct" and status[ids["direct"]]["relays"] == []
    for name in ("cone", "symmetric"):
        assert status[ids[name]]["connection"] == "relayed", status[ids[name]]
        assert status[ids[name]]["state"] == "online"
        assert set(status[ids[name]]["relays"]) <= set(relay_ids) and status[ids[name]]["relays"]

    expected = _local_greedy(model, 160)
    assert _generate(peers, initial, model, key) == expected[:12]  # one server per span: the relayed ones served
    assert network.totals.get("nat_drops", 0) + network.configure(rtt_ms=RTT_MS)["nat_drops"] > 0  # dials refused
    # pushed to a relayed server (direct -> cone) and between two (cone -> symmetric), or relayed by the client when a
    # push fails (a first push through a relay, its connection made on the way, may miss the 1 s push timeout)
    print("pushes that fell back to the client:", {name: peers.log(name).count("push to") for name in SPANS})

    outsider = [*network.exec_prefix(HOSTS["client"]), sys.executable, "-c", OUTSIDER, initial[0], ids["cone"]]
    answer = subprocess.run(outsider, capture_output=True, text=True, timeout=120)
    assert answer.stdout.startswith("FAILED") and "private swarm" in answer.stdout, (answer.stdout, answer.stderr)

    # the relay dies while a generation runs: the servers keep (or take) a slot on the other, and the client
    # finishes exactly, failing over where its connection ran through the dead relay
    generation = subprocess.Popen(
        _generate_command(peers, initial[1:], model, key, 160),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(12)  # the client has joined and is generating (160 tokens take longer than its start)
    peers.kill("relay_a")
    stdout, stderr = generation.communicate(timeout=300)
    assert generation.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["token_ids"] == expected
    print("failovers during the generation:", stderr.count("failing over"))
    deadline = time.monotonic() + 60
    while True:
        status = _status(peers, initial[1:], model, key)
        relays = {name: status.get(ids[name], {}).get("relays", []) for name in ("cone", "symmetric")}
        if all(relays[name] and relay_ids[0] not in relays[name] for name in relays):
            break
        assert time.monotonic() < deadline, relays
        time.sleep(2)
    assert _generate(peers, initial[1:], model, key) == expected[:12]
    for name in ("cone", "symmetric"):
        assert peers.processes[name].poll() is None, peers.log(name)[-3000:]
        assert "relayed addresses now" in peers.log(name)


def test_a_server_nobody_can_dial_and_no_relay_takes_fails_with_what_to_do(tmp_path):
    # on a private range libp2p builds no relayed address from the bootstrap peer's: no relay can be had
    model = make_tiny_model(tmp_path / "llama", "llama", num_layers=2)
    with wan.Wan(2, nat={1: "cone"}, prefix=f"pwan{os.getpid()}x") as network:  # beside the module's WAN
        peers = Peers(network, tmp_path)
        HOSTS_HERE = {"relay_a": 0, "direct": 1}  # noqa: N806 (names of the two hosts of this WAN)
        try:
            bootstrap = peers.start("relay_a", "swarm", "bootstrap", "--host", network.address(0))
            initial = peers.wait("relay_a", bootstrap)[:1]
            command = [
                *network.exec_prefix(HOSTS_HERE["direct"]),
                *petals_command("serve", str(model), "--blocks", "0:2", "--host", network.address(1)),
                *_initial_peers(initial),
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=180)
        finally:
            peers.close()
    assert result.returncode == 4, result.stderr[-3000:]
    assert "this server cannot be dialled (1 of 1 peers could not connect" in result.stderr
    assert "--announce-host" in result.stderr and "Traceback" not in result.stderr
