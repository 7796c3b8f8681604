"""Frozen configuration for clients and servers, with one precedence: flag > ``PETALS_*`` variable > default.

The CLI builds these from its options (passing ``None`` for options the user did not give) through
``from_sources``; library users may construct them directly. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from petals_cli.errors import ConfigError

QUANT_MODES = ("none", "int8", "nf4")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")

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
    push: bool = True  # servers pass each step on to the next server themselves (PETALS_PUSH=0: the client relays)
    routing: str = "load"  # inference routes by servers' live load ("load") or by idle throughput only ("idle")
    wire_dtype: str = "auto"  # activations of inference steps travel in this dtype (auto: as the client computes)
    verify_rate: float = 0.0  # share of steps and forward/backward requests re-run on another replica and compared
    verify_seed: int | None = None  # seeds the choice of what to verify (tests); None: unpredictable

    def __post_init__(self):
        check_initial_peers(self.initial_peers)
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ConfigError(f"--verify {self.verify_rate:g}: a share of steps between 0 (off) and 1 (every step)")
        check_peer_ids("--allowed-servers", self.allowed_servers)
        check_peer_ids("--blocked-servers", self.blocked_servers)
        check_device(self.device, "PETALS_DEVICE")
        check_readable("--swarm-key", self.swarm_key)
        if self.dtype not in DTYPE_NAMES[1:]:
            raise ConfigError(f"PETALS_DTYPE={self.dtype!r}: choose one of {', '.join(DTYPE_NAMES[1:])}")
        if self.routing not in ("load", "idle"):  # routing.RULES
            raise ConfigError(f"PETALS_ROUTING={self.routing!r}: choose load (the default) or idle")
        if self.wire_dtype not in DTYPE_NAMES:
            raise ConfigError(f"--wire-dtype {self.wire_dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
        timeouts = (self.connect_timeout, self.request_timeout, self.liveness_interval, self.liveness_timeout)
        if min(timeouts) <= 0 or self.snapshot_refresh <= 0:
            raise ConfigError("connect, request and liveness timeouts and the snapshot refresh must be positive")
        if self.route_wait < 0:
            raise ConfigError(f"--route-wait {self.route_wait:g}: must be >= 0 (0: fail at once)")
        if self.max_retries < 0:
            raise ConfigError(f"PETALS_MAX_RETRIES={self.max_retries}: must be >= 0")


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
    join_timeout: float = 120.0  # seconds to wait for an initial peer to answer at start (PETALS_JOIN_TIMEOUT)
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
        never_negative = {
            "--cache-tokens": self.cache_tokens,
            "--kept-graphs-mib": self.kept_graphs_mib,  # 0: backward always recomputes the forward
            "--alloc-timeout": self.alloc_timeout,
            "--num-blocks": self.num_blocks,
            "--balance-period": self.balance_period,  # 0: never move
            "--balance-quality": self.balance_quality,
            "--network-rps": self.network_rps,  # 0: unknown
            "placement delay": self.placement_delay,
            "join timeout": self.join_timeout,
        }
        above_zero = {
            "--max-session-length": self.max_session_length,
            "--session-idle-timeout": self.session_idle_timeout,
            "--max-request-mib": self.max_request_mib,
            "--max-sessions-per-peer": self.max_sessions_per_peer,
            "--step-timeout": self.step_timeout,
            "announce period": self.announce_period,
        }
        for option, value in never_negative.items():
            if value < 0:
                raise ConfigError(f"{option} {value:g}: must be 0 or more")
        for option, value in above_zero.items():
            if value <= 0:
                raise ConfigError(f"{option} {value:g}: must be above 0")
        check_initial_peers(self.initial_peers)
        check_blocks(self.blocks)
        check_port(self.port)
        check_host("--host", self.host)
        if self.announce_host:
            check_host("--announce-host", self.announce_host)
        check_device(self.device)
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
        if self.quant not in QUANT_MODES:
            raise ConfigError(f"--quant {self.quant!r}: choose one of {', '.join(QUANT_MODES)}")
        check_readable("--swarm-key", self.swarm_key)
        check_writable_in("--address-file", self.address_file)
        check_writable_in("--identity", self.identity_path)
        for directory in self.adapters:
            if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
                raise ConfigError(
                    f"--adapters {directory}: no adapter_config.json (expected a peft adapter directory)"
                )


_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{30,80}")
_PEERS_HINT = (
    "copy the whole line a server or `petals swarm bootstrap` printed, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW…"
)


def check_initial_peers(peers: tuple[str, ...]) -> None:
    """Refuse, as a bad option, what cannot be a peer's multiaddr: it must start with a network address and end
    with /p2p/PEER_ID. (Addresses that parse but nobody answers are the swarm's problem, found when joining.)"""
    for peer in peers:
        parts = peer.split("/")
        if len(parts) < 4 or parts[0] or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr"):
            raise ConfigError(f"--initial-peers {peer!r}: not a multiaddr", hint=_PEERS_HINT)
        if parts[1] in ("ip4", "ip6"):
            try:
                address = ipaddress.ip_address(parts[2])
            except ValueError:
                address = None
            if address is None or address.version != int(parts[1][-1]):
                raise ConfigError(f"--initial-peers {peer!r}: {parts[2]!r} is not an {parts[1]} address")
        for protocol, value in zip(parts[3::2], parts[4::2], strict=False):
            if protocol in ("tcp", "udp") and not (value.isdigit() and 0 < int(value) < 65536):
                raise ConfigError(f"--initial-peers {peer!r}: {value!r} is not a {protocol} port")
        if "p2p" not in parts[:-1] or not _BASE58.fullmatch(parts[parts.index("p2p") + 1]):
            raise ConfigError(f"--initial-peers {peer!r}: no valid /p2p/PEER_ID at its end", hint=_PEERS_HINT)


def check_peer_ids(option: str, peer_ids: tuple[str, ...]) -> None:
    for peer_id in peer_ids:
        if not _BASE58.fullmatch(peer_id):
            raise ConfigError(
                f"{option} {peer_id!r}: not a peer id", hint="peer ids look like 12D3KooW… (see `petals swarm status`)"
            )


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be from 0 (any free port) to 65535")


def check_host(option: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{option} {host!r}: not an IP address", hint="e.g. 127.0.0.1, 0.0.0.0 (all interfaces) or ::"
        ) from None


def check_blocks(spec: str) -> None:
    """The form of --blocks before the model is read: auto, N, or START:END with START < END."""
    spec = spec.strip()
    if not spec or spec == "auto":
        return
    if re.fullmatch(r"\d+", spec):
        if int(spec) == 0:
            raise ConfigError("--blocks 0: a server hosts at least one block")
        return
    match = re.fullmatch(r"(\d*)\s*:\s*(\d*)", spec)
    if match is None:
        raise ConfigError(f"--blocks {spec!r}: expected auto, N, or START:END, e.g. 0:8")
    start, end = match.groups()
    if start and end and int(end) <= int(start):
        which = "empty" if start == end else "reversed"
        raise ConfigError(f"--blocks {spec!r}: the range is {which} (END is exclusive and must be above START)")


def check_readable(option: str, path: str) -> None:
    """A file the command will read: it must exist and be readable now, not fail once the model has loaded."""
    if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise ConfigError(f"{option} {path}: no such readable file")


def check_writable_in(option: str, path: str) -> None:
    """A file the command will write (or read if present): its directory must exist, and it must not be a folder."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        problem = "is a directory" if os.path.isdir(path) else f"its directory {folder} does not exist"
        raise ConfigError(f"{option} {path}: {problem}")


def check_device(device: str, option: str = "--device") -> None:
    """Refuse, as a bad option, a device that torch does not know or that this machine does not have."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option} {device!r}: not a torch device", hint="e.g. cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda":
        present = torch.cuda.device_count() > (parsed.index or 0)
    else:
        present = parsed.type == "cpu" or (parsed.type == "mps" and torch.backends.mps.is_available())
    if not present:
        raise ConfigError(
            f"{option} {device!r}: this machine has no such device", hint="use cpu, or a device torch sees"
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
    method: str = "ptune"  # ptune | deep_ptune | lora
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
    lora_r: int = 8  # --method lora: rank, alpha and target modules (as peft names them)
    lora_alpha: float = 16.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if self.method not in ("ptune", "deep_ptune", "lora"):
            raise ConfigError(f"--method {self.method!r}: choose ptune, deep_ptune or lora")
        if not 1 <= self.lora_r <= 64:
            raise ConfigError(f"--lora-r {self.lora_r}: choose a rank from 1 to 64")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"--lora-alpha {self.lora_alpha:g}: must be above 0")
        if not self.lora_target_modules or not all(self.lora_target_modules):
            raise ConfigError("--lora-target-modules: name at least one module, e.g. q_proj")
        if not self.dataset:
            raise ConfigError("finetune: --dataset PATH is required")
        if min(self.seq_len, self.batch_size, self.pre_seq_len) < 1 or self.lr <= 0:
            raise ConfigError("--seq-len, --batch-size, --pre-seq-len must be >= 1 and --lr > 0")
        if self.steps < 0 or self.epochs < 0 or self.save_every < 0:
            raise ConfigError("--steps, --epochs and --save-every must be >= 0")
        if self.steps and self.epochs:
            raise ConfigError("pass --steps or --epochs, not both")
        if self.output and os.path.exists(self.output) and not os.path.isdir(self.output):
            raise ConfigError(f"--output {self.output}: is a file (a directory is made there for the checkpoint)")
        if self.resume and not os.path.isdir(self.resume):
            raise ConfigError(f"--resume {self.resume}: no such checkpoint directory")
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
    sessions: int = 1  # above 1: also this many inference sessions at once (aggregate tokens/s, step latency)

    def __post_init__(self):
        if not 1 <= self.sessions <= 64:
            raise ConfigError(f"--sessions {self.sessions}: from 1 to 64 sessions at once")
        if self.mode not in BENCH_MODES:
            raise ConfigError(f"--mode {self.mode!r}: choose one of {', '.join(BENCH_MODES)}")
        if min(self.seq_len, self.batch_size, self.new_tokens, self.repeats) < 1 or self.local_swarm < 0:
            raise ConfigError("--seq-len, --batch-size, --new-tokens and --repeats must be >= 1")
