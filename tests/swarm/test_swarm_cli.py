"""`petals swarm bootstrap` and `petals swarm status`, as real processes on 127.0.0.1.

One private swarm for the module: a bootstrap peer, two servers of one model and one of another, all joined
through the bootstrap's printed address. The tests run in order: the SIGTERM test breaks the first model,
the last one restarts the bootstrap peer.
"""

import json
import os
import re
import signal
import subprocess

import pytest

from petals_cli.testing import make_tiny_model
from tests.conftest import ServerProcess, Swarm, petals_command

pytestmark = pytest.mark.slow
MADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")


HOSTILE_NAME = "[reverse]HACKED[/reverse] [link=https://evil.example]click[/link]\x1b[2J"


def start_bootstrap(workdir, identity):
    address_file = workdir / "bootstrap.addr"
    command = petals_command("swarm", "bootstrap", "--identity", str(identity), "--address-file", str(address_file))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline().strip()  # printed once the peer is up
    return process, line, address_file


def stop(process) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def join(swarm: Swarm, model, blocks: str, bootstrap: list[str], *extra: str) -> ServerProcess:
    index = len(swarm.servers)
    address_file, log_file = swarm.workdir / f"server{index}.addr", swarm.workdir / f"server{index}.log"
    args = [
        "serve",
        str(model),
        "--blocks",
        blocks,
        "--address-file",
        str(address_file),
        "--initial-peers",
        *bootstrap,
        *extra,
    ]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(petals_command(*args), stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(blocks, process, address_file, log_file)
    swarm.servers.append(server)
    return server


def peer_of(address: str) -> str:
    return address.rsplit("/p2p/", 1)[1]


def swarm_status(bootstrap: list[str], *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = petals_command("swarm", "status", "--initial-peers", *bootstrap, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def private_swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("private")
    model = make_tiny_model(root / "tiny-cli", "llama", num_layers=4)
    other = make_tiny_model(root / "tiny-other", "llama", num_layers=2)
    process, line, address_file = start_bootstrap(root, root / "bootstrap.key")
    swarm = Swarm(model=model, workdir=root)
    try:
        bootstrap = line.split()[1:]
        servers = [join(swarm, model, "0:2", bootstrap), join(swarm, model, "2:4", bootstrap)]
        servers.append(join(swarm, other, "0:2", bootstrap, "--public-name", HOSTILE_NAME))
        for server in servers:
            swarm.wait_ready(server)
        yield dict(bootstrap=process, line=line, address_file=address_file, root=root, swarm=swarm)
    finally:
        swarm.stop()
        stop(process)


def test_bootstrap_prints_the_initial_peers_line_and_writes_its_address(private_swarm):
    line = private_swarm["line"]
    assert line.startswith("--initial-peers ")
    assert all(MADDR.fullmatch(address) for address in line.split()[1:])
    assert private_swarm["address_file"].read_text().split() == line.split()[1:]


def test_status_lists_every_model_of_the_index_with_servers_and_coverage(private_swarm):
    bootstrap, servers = private_swarm["line"].split()[1:], private_swarm["swarm"].servers
    result = swarm_status(bootstrap, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["schema_version"] == 1 and status["error"] is None
    models = {model["prefix"]: model for model in status["models"]}
    assert set(models) == {"tiny-cli", "tiny-other"}
    model = models["tiny-cli"]
    assert (model["num_blocks"], model["family"], model["healthy"]) == (4, "llama", True)
    assert model["coverage"] == [1, 1, 1, 1] and model["missing_blocks"] == []
    spans = {server["peer_id"]: (server["start_block"], server["end_block"]) for server in model["servers"]}
    assert spans == {peer_of(servers[0].addresses()[0]): (0, 2), peer_of(servers[1].addresses()[0]): (2, 4)}
    for server in model["servers"]:
        assert server["state"] == "online" and server["connection"] in ("direct", "unknown")
        assert server["rtt"] is None or 0 < server["rtt"] < 5
    assert models["tiny-other"]["healthy"] and len(models["tiny-other"]["servers"]) == 1


def test_a_hostile_public_name_is_printed_as_the_text_it_is(private_swarm):
    """Tried as a user would: a server announces Rich markup and terminal escapes as its name; every reader's
    `swarm status` shows them literally (on a terminal too), never as reverse video, a hyperlink or a cleared
    screen."""
    bootstrap = private_swarm["line"].split()[1:]
    result = swarm_status(bootstrap, "--model", "tiny-other", env=os.environ | {"FORCE_COLOR": "1", "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    assert "[reverse]HACKED[/reverse] [link=https://evil.example]click[/link]\\x1b[2J" in result.stdout
    assert "\x1b[7m" not in result.stdout and "\x1b]8;" not in result.stdout and "\x1b[2J" not in result.stdout
    assert "\x1b[32monline" in result.stdout  # the terminal did get styles: the ones petals chose
    (model,) = json.loads(swarm_status(bootstrap, "--model", "tiny-other", "--json").stdout)["models"]
    assert (
        model["servers"][0]["public_name"]
        == "[reverse]HACKED[/reverse] [link=https://evil.example]click[/link]\\x1b[2J"
    )


def test_status_of_one_model_after_sigterm_names_the_missing_blocks(private_swarm):
    bootstrap, late = private_swarm["line"].split()[1:], private_swarm["swarm"].servers[1]
    late_peer = peer_of(late.addresses()[0])
    assert stop(late.process) == 0
    result = swarm_status(bootstrap, "--json", "--model", "tiny-cli")
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(result.stdout)["models"]
    assert model["prefix"] == "tiny-cli" and model["healthy"] is False
    assert model["missing_blocks"] == [2, 3] and model["coverage"] == [1, 1, 0, 0]
    states = {server["peer_id"]: server["state"] for server in model["servers"]}
    assert states.get(late_peer, "offline") == "offline"  # announced OFFLINE, or already gone
    text = swarm_status(bootstrap, "--model", "tiny-cli")
    assert text.returncode == 0 and "broken" in text.stdout and "blocks 2:4" in text.stdout


def test_status_within_seconds_of_a_sigkill_says_broken_and_the_server_unreachable(private_swarm):
    bootstrap, only = private_swarm["line"].split()[1:], private_swarm["swarm"].servers[2]
    only_peer = peer_of(only.addresses()[0])
    only.process.kill()  # no OFFLINE announce: its records stay in the DHT until they expire
    only.process.wait(10)
    result = swarm_status(bootstrap, "--json", "--model", "tiny-other")
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(result.stdout)["models"]
    assert model["healthy"] is False and model["missing_blocks"] == [0, 1] and model["coverage"] == [0, 0]
    assert {server["peer_id"]: server["state"] for server in model["servers"]} == {only_peer: "unreachable"}
    text = swarm_status(bootstrap, "--model", "tiny-other")
    assert "unreachable" in text.stdout and "no server for blocks 0:2" in text.stdout


def test_bootstrap_restarted_with_its_identity_keeps_its_peer_id(private_swarm):
    root, first = private_swarm["root"], private_swarm["line"].split()[1]
    assert stop(private_swarm["bootstrap"]) == 0
    assert not private_swarm["address_file"].exists()
    process, line, address_file = start_bootstrap(root, root / "bootstrap.key")
    try:
        assert peer_of(line.split()[1]) == peer_of(first)
    finally:
        assert stop(process) == 0
    assert not address_file.exists()
