"""CacheBudget: reservations, releases, waiting for space with a time limit, change notifications; its settings."""

import asyncio

import pytest

from petals_cli.config import ServerConfig
from petals_cli.errors import CacheExhaustedError, ConfigError
from petals_cli.server.cache import CacheBudget


def test_reserve_and_release_count_tokens():
    changes = []
    budget = CacheBudget(100, on_change=lambda: changes.append(budget.tokens_left))
    budget.reserve("a", 60)
    budget.reserve("b", 40)
    assert budget.tokens_left == 0
    with pytest.raises(CacheExhaustedError, match="0 of 100"):
        budget.reserve("c", 1)
    with pytest.raises(CacheExhaustedError, match="already open"):
        budget.reserve("a", 0)
    budget.release("a")
    budget.release("a")  # a second release of the same session changes nothing
    budget.release("unknown")
    assert budget.tokens_left == 60
    assert changes == [40, 0, 60]


def test_allocate_reserves_at_once_when_there_is_room():
    async def scenario():
        budget = CacheBudget(100)
        await budget.allocate("a", 80, timeout=0)
        return budget.tokens_left

    assert asyncio.run(scenario()) == 20


def test_allocate_waits_for_a_release():
    async def scenario():
        budget = CacheBudget(100)
        budget.reserve("a", 80)
        waiting = asyncio.create_task(budget.allocate("b", 80, timeout=30))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        budget.reserve("small", 10)  # a change that does not make room keeps it waiting
        await asyncio.sleep(0.01)
        assert not waiting.done()
        budget.release("a")
        await waiting
        return budget.reserved

    assert asyncio.run(scenario()) == {"small": 10, "b": 80}


def test_allocate_times_out_with_a_typed_error_and_reserves_nothing():
    async def scenario():
        budget = CacheBudget(100)
        budget.reserve("a", 80)
        with pytest.raises(CacheExhaustedError, match="waited"):
            await budget.allocate("b", 80, timeout=0.05)
        return budget.reserved

    assert asyncio.run(scenario()) == {"a": 80}


def test_allocate_refuses_more_than_the_whole_budget_without_waiting():
    async def scenario():
        budget = CacheBudget(100)
        with pytest.raises(CacheExhaustedError, match="whole budget"):
            await asyncio.wait_for(budget.allocate("a", 101, timeout=3600), timeout=5)
        return budget.tokens_left

    assert asyncio.run(scenario()) == 100


def test_a_cancelled_wait_reserves_nothing_and_others_still_get_the_space():
    async def scenario():
        budget = CacheBudget(100)
        budget.reserve("a", 80)
        first = asyncio.create_task(budget.allocate("b", 80, timeout=30))
        second = asyncio.create_task(budget.allocate("c", 80, timeout=30))
        await asyncio.sleep(0.01)
        first.cancel()
        budget.release("a")
        await second
        with pytest.raises(asyncio.CancelledError):
            await first
        return budget.reserved

    assert asyncio.run(scenario()) == {"c": 80}


def test_one_release_lets_in_only_what_fits():
    async def scenario():
        budget = CacheBudget(100)
        budget.reserve("a", 100)
        waiters = [asyncio.create_task(budget.allocate(name, 60, timeout=0.2)) for name in ("b", "c")]
        await asyncio.sleep(0.01)
        budget.release("a")
        results = await asyncio.gather(*waiters, return_exceptions=True)
        return budget.tokens_left, [type(result).__name__ for result in results]

    tokens_left, outcomes = asyncio.run(scenario())
    assert tokens_left == 40
    assert sorted(outcomes) == ["CacheExhaustedError", "NoneType"]


def test_budget_settings_take_a_flag_over_the_environment_over_the_default(monkeypatch):
    monkeypatch.setenv("PETALS_ALLOC_TIMEOUT", "2.5")
    monkeypatch.setenv("PETALS_SESSION_IDLE_TIMEOUT", "60")
    config = ServerConfig.from_sources(model="m", new_swarm=True, session_idle_timeout=5.0, max_session_length=None)
    assert (config.alloc_timeout, config.session_idle_timeout) == (2.5, 5.0)
    assert config.max_session_length == ServerConfig.max_session_length
    with pytest.raises(ConfigError, match="--session-idle-timeout"):
        ServerConfig.from_sources(model="m", new_swarm=True, session_idle_timeout=0.0)
    with pytest.raises(ConfigError, match="--alloc-timeout"):
        ServerConfig.from_sources(model="m", new_swarm=True, alloc_timeout=-1.0)
