import pytest

from petals_cli.config import ClientConfig, ServerConfig, parse_blocks
from petals_cli.errors import ConfigError

PEER_A, PEER_B, PEER_C = (
    f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooW{letter * 44}" for port, letter in enumerate("ABC", 1)
)


def test_flag_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv("PETALS_INITIAL_PEERS", f"{PEER_A} {PEER_B}")
    monkeypatch.setenv("PETALS_REQUEST_TIMEOUT", "5")
    from_env = ClientConfig.from_sources()
    assert from_env.initial_peers == (PEER_A, PEER_B)
    assert from_env.request_timeout == 5.0
    from_flag = ClientConfig.from_sources(initial_peers=(PEER_C,), request_timeout=None)
    assert from_flag.initial_peers == (PEER_C,)
    assert from_flag.request_timeout == 5.0
    monkeypatch.delenv("PETALS_REQUEST_TIMEOUT")
    assert ClientConfig.from_sources().request_timeout == ClientConfig().request_timeout


def test_bad_environment_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("PETALS_PORT", "eighty")
    with pytest.raises(ConfigError, match="PETALS_PORT"):
        ServerConfig.from_sources(model="m", new_swarm=True)


def test_server_needs_a_swarm_choice():
    with pytest.raises(ConfigError, match="--new-swarm"):
        ServerConfig.from_sources(model="m")
    with pytest.raises(ConfigError):
        ServerConfig.from_sources(model="m", new_swarm=True, initial_peers=("/ip4/127.0.0.1/tcp/1",))


@pytest.mark.parametrize("spec, expected", [("0:4", (0, 4)), (":", (0, 8)), ("3:", (3, 8)), (":2", (0, 2))])
def test_parse_blocks(spec, expected):
    assert parse_blocks(spec, 8) == expected


@pytest.mark.parametrize("spec", ["4:2", "0:9", "a:b", "3", "-1:2"])
def test_parse_blocks_rejects_bad_ranges(spec):
    with pytest.raises(ConfigError):
        parse_blocks(spec, 8)


def test_a_swarm_flag_wins_over_the_other_swarm_option_from_the_environment(monkeypatch, caplog):
    # README's Usage exports PETALS_INITIAL_PEERS; `petals serve --new-swarm` must still start a swarm
    monkeypatch.setenv("PETALS_INITIAL_PEERS", PEER_A)
    with caplog.at_level("INFO", logger="petals_cli.config"):
        config = ServerConfig.from_sources(model="m", new_swarm=True, initial_peers=())
    assert config.new_swarm and config.initial_peers == ()
    assert [record.getMessage() for record in caplog.records] == [
        "PETALS_INITIAL_PEERS ignored: a flag on the command line excludes it"
    ]
    assert ServerConfig.from_sources(model="m", new_swarm=None).initial_peers == (PEER_A,)
    monkeypatch.delenv("PETALS_INITIAL_PEERS")
    monkeypatch.setenv("PETALS_NEW_SWARM", "1")
    joined = ServerConfig.from_sources(model="m", new_swarm=None, initial_peers=(PEER_B,))
    assert not joined.new_swarm and joined.initial_peers == (PEER_B,)
    monkeypatch.setenv("PETALS_INITIAL_PEERS", PEER_A)
    with pytest.raises(ConfigError, match="cannot be combined"):  # both from the environment: still a contradiction
        ServerConfig.from_sources(model="m", new_swarm=None, initial_peers=())
