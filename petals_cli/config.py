"""Frozen configuration for clients and servers, with one precedence: flag > ``PETALS_*`` variable > default.

The CLI builds these from its options (passing ``None`` for options the user did not give) through
``from_sources``; library users may construct them directly. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from petals_cli.errors import ConfigError

QUANT_MODES = ("none", "int8", "nf4")

ENV_PREFIX = "PETALS_"
logger = logging.getLogger(__name__)


def split_peers(text: str | None) -> tuple[str, ...]:
    """Multiaddrs separated by spaces, commas or newlines."""
    return tuple(part for part in re.split(r"[\s,]+", text or "") if part)


def _env_value(name: str, default: Any) -> Any:
    raw = os.environ.get(ENV_PREFIX + name.upper())
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return split_peers(raw)
    try:
        return type(default)(raw) if default is not None else raw
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type(default).__name__}") from None


def _given(value: Any) -> bool:
    return value is not None and value != ()


class _FromSources:
    # options that exclude each other: one given as a flag keeps the others from being read from the environment
    _EXCLUSIVE: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_sources(cls, **flags: Any):
        """Build from CLI flags; a flag given as None falls back to the environment, then the default."""
        unread = set()
        for group in cls._EXCLUSIVE:
            if any(_given(flags.get(name)) and flags[name] is not False for name in group):
                unread |= {name for name in group if not _given(flags.get(name))}
        values = {}
        for field in dataclasses.fields(cls):
            given = flags.pop(field.name, None)
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if not _given(given):
                variable = ENV_PREFIX + field.name.upper()
                if field.name in unread and variable in os.environ:
                    logger.info("%s ignored: a flag on the command line excludes it", variable)
                    values[field.name] = default
                else:
                    values[field.name] = _env_value(field.name, default)
            else:
                values[field.name] = tuple(given) if isinstance(default, tuple) else given
        if flags:
            raise TypeError(f"unknown options for {cls.__name__}: {sorted(flags)}")
        return cls(**values)


@dataclass(frozen=True)
class ClientConfig(_FromSources):
    """How a client reaches the swarm and runs its local modules."""

    initial_peers: tuple[str, ...] = ()
    model_prefix: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    revision: str = ""
    token: str = ""
    connect_timeout: float = 20.0
    request_timeout: float = 60.0  # the most one step or forward/backward request may take
    liveness_interval: float = 0.25  # while waiting longer than this for an answer, check the server is alive
    liveness_timeout: float = 0.75  # a liveness check (an info RPC) unanswered for this long: the server is hung
    route_wait: float = 10.0  # how long to wait for servers of missing blocks before NoRouteError
    snapshot_refresh: float = 5.0  # seconds between background reads of the swarm (and pings)
    max_retries: int = 8  # failovers per request or step before giving up
    swarm_key: str = ""  # file with the pre-shared secret of a private swarm
    allowed_servers: tuple[str, ...] = ()  # when given, route only through these peer ids
    blocked_servers: tuple[str, ...] = ()  # never route through these peer ids
    active_adapter: str = ""  # run blocks with this LoRA adapter: only servers announcing it are used


@dataclass(frozen=True)
class ServerConfig(_FromSources):
    """What a server hosts and how it joins the swarm."""

    # `--new-swarm` with PETALS_INITIAL_PEERS exported (as README's Usage does) starts a swarm, and vice versa
    _EXCLUSIVE = (("new_swarm", "initial_peers"),)

    model: str = ""
    blocks: str = ""
    new_swarm: bool = False
    initial_peers: tuple[str, ...] = ()
    model_prefix: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str = ""
    device: str = "cpu"
    dtype: str = "auto"
    quant: str = "none"  # none, int8 or nf4 (bitsandbytes) for the blocks' linear layers
    public_name: str = ""
    address_file: str = ""
    identity_path: str = ""
    cache_tokens: int = 16384  # attention-cache budget, in token positions across all sessions
    max_session_length: int = 8192  # the largest max_length one session may ask for
    alloc_timeout: float = 0.5  # how long a new session waits for a full budget to free up before refusal
    session_idle_timeout: float = 600.0  # a session that sends no step for this long is closed
    max_request_mib: int = 64  # tensor bytes one request or inference step may carry, in MiB
    max_sessions_per_peer: int = 16  # open inference sessions of one peer id
    step_timeout: float = 60.0  # seconds one step or forward/backward may compute before it fails
    kept_graphs_mib: int = 512  # activations kept from training forwards until their backwards, in MiB
    swarm_key: str = ""  # file with the pre-shared secret of a private swarm
    num_blocks: int = 0  # place this many blocks where the swarm needs them (0: see `blocks`)
    placement_delay: float = 1.0  # at most this random wait before choosing blocks, to spread servers out
    balance_period: float = 60.0  # seconds between rebalancing checks of auto-placed servers (0: never)
    balance_quality: float = 0.15  # move only if the weakest block gets this much (a fraction) stronger
    network_rps: float = 0.0  # the network's limit in steps/s, when known; 0 = unknown (never guessed)
    adapters: tuple[str, ...] = ()  # directories of peft LoRA adapters to serve (named by their directory)
    announce_period: float = 30.0
    revision: str = ""
    token: str = ""

    def __post_init__(self):
        if not self.model:
            raise ConfigError("serve: MODEL is required")
        if self.new_swarm and self.initial_peers:
            raise ConfigError("--new-swarm starts a swarm; it cannot be combined with --initial-peers")
        if not self.new_swarm and not self.initial_peers:
            raise ConfigError(
                "serve: pass --new-swarm to start a swarm, or --initial-peers MADDR to join one",
                hint="e.g. `petals serve MODEL --blocks 0:4 --new-swarm --address-file swarm.addr`",
            )
        if self.cache_tokens < 0 or self.max_session_length <= 0:
            raise ConfigError("--cache-tokens must be >= 0 and --max-session-length > 0")
        if self.alloc_timeout < 0 or self.session_idle_timeout <= 0:
            raise ConfigError("--alloc-timeout must be >= 0 and --session-idle-timeout > 0")
        if self.kept_graphs_mib < 0:
            raise ConfigError("--kept-graphs-mib must be >= 0 (0: backward always recomputes the forward)")
        if self.max_request_mib <= 0 or self.max_sessions_per_peer <= 0 or self.step_timeout <= 0:
            raise ConfigError("--max-request-mib, --max-sessions-per-peer and --step-timeout must be positive")
        if self.num_blocks < 0 or self.placement_delay < 0 or self.balance_period < 0 or self.network_rps < 0:
            raise ConfigError("--num-blocks, placement delay, balance period and --network-rps must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be from 0 (any free port) to 65535")
        check_device(self.device)
        if self.quant not in QUANT_MODES:
            raise ConfigError(f"--quant {self.quant!r}: choose one of {', '.join(QUANT_MODES)}")
        if self.announce_period <= 0:
            raise ConfigError("announce period must be positive")
        for directory in self.adapters:
            if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
                raise ConfigError(
                    f"--adapters {directory}: no adapter_config.json (expected a peft adapter directory)"
                )


def check_device(device: str) -> None:
    """Refuse, as a bad option, a device that torch does not know or that this machine does not have."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r}: not a torch device", hint="e.g. cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda":
        present = torch.cuda.device_count() > (parsed.index or 0)
    else:
        present = parsed.type == "cpu" or (parsed.type == "mps" and torch.backends.mps.is_available())
    if not present:
        raise ConfigError(
            f"--device {device!r}: this machine has no such device", hint="use --device cpu, or a device torch sees"
        )


def parse_blocks(spec: str, num_blocks: int) -> tuple[int, int]:
    """'START:END' (END exclusive; either side may be omitted) -> a validated (start, end)."""
    match = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", spec or "")
    if match is None:
        raise ConfigError(f"--blocks {spec!r}: expected START:END, e.g. 0:8")
    start = int(match.group(1)) if match.group(1) else 0
    end = int(match.group(2)) if match.group(2) else num_blocks
    if not 0 <= start < end <= num_blocks:
        raise ConfigError(f"--blocks {spec!r}: the model has blocks 0:{num_blocks}")
    return start, end


@dataclass(frozen=True)
class FinetuneConfig(_FromSources):
    """What `petals finetune` trains, on what data, and where it keeps its checkpoints."""

    model: str = ""
    method: str = "ptune"  # ptune | deep_ptune
    dataset: str = ""  # JSONL, JSON, CSV, plain text, or a directory saved by `datasets`
    text_field: str = "text"
    seq_len: int = 64
    batch_size: int = 4
    pre_seq_len: int = 16
    lr: float = 1e-2
    steps: int = 0  # 0: run --epochs instead
    epochs: int = 0  # 0 with --steps 0: one epoch
    seed: int = 0
    output: str = ""  # prompts and trainer state go here (at the end and every save_every steps)
    save_every: int = 0
    resume: str = ""  # continue from this checkpoint directory

    def __post_init__(self):
        if self.method not in ("ptune", "deep_ptune"):
            raise ConfigError(f"--method {self.method!r}: choose ptune or deep_ptune")
        if not self.dataset:
            raise ConfigError("finetune: --dataset PATH is required")
        if min(self.seq_len, self.batch_size, self.pre_seq_len) < 1 or self.lr <= 0:
            raise ConfigError("--seq-len, --batch-size, --pre-seq-len must be >= 1 and --lr > 0")
        if self.steps < 0 or self.epochs < 0 or self.save_every < 0:
            raise ConfigError("--steps, --epochs and --save-every must be >= 0")
        if self.steps and self.epochs:
            raise ConfigError("pass --steps or --epochs, not both")
        if self.save_every and not (self.output or self.resume):
            raise ConfigError("--save-every needs --output DIR to save into")


BENCH_MODES = ("inference", "forward", "training", "all")


@dataclass(frozen=True)
class BenchConfig(_FromSources):
    """What `petals bench` measures."""

    model: str = ""
    mode: str = "all"
    seq_len: int = 64
    batch_size: int = 1
    new_tokens: int = 128
    repeats: int = 3
    compare_local: bool = False
    local_swarm: int = 0  # start this many servers on 127.0.0.1 splitting the blocks, and stop them after

    def __post_init__(self):
        if self.mode not in BENCH_MODES:
            raise ConfigError(f"--mode {self.mode!r}: choose one of {', '.join(BENCH_MODES)}")
        if min(self.seq_len, self.batch_size, self.new_tokens, self.repeats) < 1 or self.local_swarm < 0:
            raise ConfigError("--seq-len, --batch-size, --new-tokens and --repeats must be >= 1")
