"""Generation through a swarm on an emulated wide-area network, next to the physical bound of each figure.

    sudo .venv/bin/python benchmarks/wan.py --preset tiny --rtts 0,50
    sudo .venv/bin/python benchmarks/wan.py --preset midsize --rtt 50 --mbit 100 --servers 3
    sudo .venv/bin/python benchmarks/wan.py --preset midsize --rtts 0,20,50,100 --json
    sudo .venv/bin/python benchmarks/wan.py --nat none,cone,symmetric,cone+cone,symmetric+symmetric --rtts 20,50

The network is ``petals_cli.testing.wan``: one namespace per host joined by a forwarder that delays every packet by
half the round trip and limits every host's uplink. Host 0 runs the swarm's bootstrap peer, hosts 1..N one
`petals serve` each, host N+1 the client, which reports per-step latency, time to first token and aggregate
tokens/s for each number of sessions. The bounds: compute per token is what the same swarm takes at no delay; an
ideal push chain (client -> s1 -> ... -> sN -> client) adds N+1 one-way delays per token, while a client that
relays every hidden state (today's) adds N round trips. First the forwarder's own cost: one session at no delay
and no bandwidth limit, next to the same swarm on plain loopback.

This script owns starting the peers in their hosts, the client's measurements and the table; the network itself
belongs to the emulator. Without root or /dev/net/tun it says so and exits 0.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `petals` CLI does for its peers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import wan_nat  # noqa: E402 (this folder: the --nat configurations)
from swarm_vs_local import PRESETS  # noqa: E402 (this folder: the same models)

from petals_cli.testing.wan import Wan, unavailable  # noqa: E402

START_TIMEOUT = 180.0  # seconds for a peer to write its address (midsize servers load while others compete)


@dataclass
class Place:
    """Where a peer runs: a command prefix (``ip netns exec NS`` or nothing) and the address it binds."""

    prefix: list[str]
    host: str


@dataclass
class Peers:
    """The swarm's processes: a bootstrap peer and one server per span; ``stop`` reaps every one."""

    workdir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # each process's address file

    def launch(self, place: Place, name: str, *args: str) -> Path:
        address_file, log = self.workdir / f"{name}.addr", self.workdir / f"{name}.log"
        command = [*place.prefix, sys.executable, "-m", "petals_cli.commands", *args, "--host", place.host]
        with open(log, "wb") as output:
            self.processes.append(
                subprocess.Popen([*command, "--address-file", str(address_file)], stdout=output, stderr=output)
            )
        self.files.append(address_file)
        return address_file

    def wait_address(self, address_file: Path, host: str) -> str:
        process = self.processes[self.files.index(address_file)]
        deadline = time.monotonic() + START_TIMEOUT
        while not (address_file.exists() and address_file.read_text().strip()):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{address_file.stem} did not start; logs in {self.workdir}")
            time.sleep(0.1)
        return next(address for address in address_file.read_text().split() if not host or f"/{host}/" in address)

    def serve(self, model: Path, name: str, span: str, place: Place, initial_peer: str) -> Path:
        return self.launch(place, name, "serve", str(model), "--blocks", span, "--initial-peers", initial_peer)

    def start(self, model: Path, spans: list[str], bootstrap: Place, servers: list[Place]) -> str:
        """Start the swarm; returns the bootstrap peer's address (everyone's --initial-peers)."""
        initial_peer = self.wait_address(self.launch(bootstrap, "bootstrap", "swarm", "bootstrap"), bootstrap.host)
        files = [
            self.serve(model, f"server{index}", span, place, initial_peer)
            for index, (span, place) in enumerate(zip(spans, servers, strict=True))
        ]
        for address_file, place in zip(files, servers, strict=True):
            self.wait_address(address_file, place.host)
        return initial_peer

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        self.files.clear()


class Client:
    """This script in ``--client`` mode on its host: it loads the model once, then measures on request."""

    def __init__(self, place: Place, settings: dict, log: Path):
        command = [*place.prefix, sys.executable, os.path.abspath(__file__), "--client", json.dumps(settings)]
        with open(log, "wb") as errors:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True
            )
        self.log = log
        self.answer()  # loaded and warmed up

    def request(self, request: dict) -> dict:
        self.ask(request)
        return self.answer()

    def ask(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the client exited; its log: {self.log}")

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def client_main(settings: dict) -> None:
    """Load the distributed model, warm up, then answer each {"sessions", "repeats"} line with figures."""
    from petals_cli import AutoDistributedModelForCausalLM
    from petals_cli.bench import generate_at_once
    from petals_cli.config import ClientConfig

    config = ClientConfig.from_sources(initial_peers=tuple(settings["initial_peers"]))  # PETALS_* apply
    model = AutoDistributedModelForCausalLM.from_pretrained(settings["model"], config=config)
    vocab, generator = model.get_input_embeddings().weight.shape[0], torch.Generator().manual_seed(0)
    shape = (1, settings["prompt_tokens"])
    prompts = [torch.randint(4, vocab, shape, generator=generator) for _ in range(max(settings["sessions"]))]
    generate_at_once(model, prompts[:1], 4)
    expected = None
    if settings.get("failover") or settings.get("nat"):  # tokens are compared with local transformers'
        import logging

        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # in the client's log
        logging.getLogger("petals_cli.client.replay").setLevel(logging.DEBUG)  # how long each replacement took
        from transformers import AutoModelForCausalLM

        local = AutoModelForCausalLM.from_pretrained(settings["model"]).eval()
        expected = generate_tokens(local, prompts[0], settings["new_tokens"])
        del local
    print(json.dumps({"ready": True}), flush=True)
    speculated = settings.get("speculative")
    if speculated:
        prompt = speculative_prompt(model, prompts[0], speculated["workload"], settings["new_tokens"])
    for line in sys.stdin:
        request = json.loads(line)
        if "speculate" in request:
            print(json.dumps(compare_speculation(model, prompt, speculated, request["speculate"])), flush=True)
            continue
        if "identical" in request:
            print(json.dumps({"identical": generate_tokens(model, prompts[0], len(expected)) == expected}), flush=True)
            continue
        if "connections" in request:
            print(json.dumps({"connections": wan_nat.client_connections(model, settings["model"])}), flush=True)
            continue
        if "kill_after" in request:
            print(json.dumps(failover_trial(model, prompts[0], expected, request["kill_after"])), flush=True)
            continue
        chosen = prompts[: request["sessions"]]
        generate_at_once(model, chosen, 4)  # this many sessions' connections and allocations, and the new delay
        runs = [generate_at_once(model, chosen, settings["new_tokens"]) for _ in range(request["repeats"])]
        print(json.dumps(summarize(runs, settings["new_tokens"])), flush=True)
    model.close()


def generate_tokens(model, prompt: torch.Tensor, new_tokens: int, **options) -> list[int]:
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **options,
    )
    return output[0, prompt.shape[1] :].tolist()


def speculative_prompt(model, prompt: torch.Tensor, workload: str, new_tokens: int) -> torch.Tensor:
    """The prompt of a --speculative workload: ``random`` is the random prompt itself (drafts rarely hit);
    ``repeat`` is prompt + its continuation + prompt again, whose continuation (on the repeating model) is the
    continuation already in the prompt, as when a text is edited or quoted back."""
    if workload == "random":
        return prompt
    continuation = torch.tensor([generate_tokens(model, prompt, new_tokens)])
    return torch.cat([prompt, continuation, prompt], dim=1)


def compare_speculation(model, prompt: torch.Tensor, speculated: dict, repeats: int) -> dict:
    """Plain and speculative greedy generation of the same prompt, alternately ``repeats`` times each."""
    from petals_cli.speculative import Speculation, SpeculationStats, load_draft_model

    draft = load_draft_model(speculated["draft_model"], model) if speculated.get("draft_model") else None
    new_tokens, stats = speculated["new_tokens"], SpeculationStats()
    rates, tokens = {"plain": [], "speculative": []}, {}
    for _ in range(repeats + 1):  # the first pair warms up
        for kind in ("plain", "speculative"):
            options = {}
            if kind == "speculative":
                mode = "model" if draft is not None else "ngram"
                options["speculation"] = Speculation(
                    mode, speculated["draft_tokens"], draft, speculated.get("adaptive", True), stats=stats
                )
            started = time.perf_counter()
            tokens[kind] = generate_tokens(model, prompt, new_tokens, **options)
            rates[kind].append(new_tokens / (time.perf_counter() - started))
    plain, fast = (statistics.median(rates[kind][1:]) for kind in ("plain", "speculative"))
    return {
        "plain_tokens_per_s": round(plain, 2),
        "speculative_tokens_per_s": round(fast, 2),
        "speedup": round(fast / plain, 3),
        "identical": tokens["plain"] == tokens["speculative"],
        "prompt_tokens": prompt.shape[1],
        **stats.to_json(),
    }


class _RouteAt:
    """A streamer that notes when each new token arrives (on the clock every process of this machine shares) and,
    at the ``at``-th one, prints the session's route for the orchestrator, which then kills one of its servers."""

    def __init__(self, session, at: int):
        self.session, self.at, self.times, self.prompt_seen = session, at, [], False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.monotonic())
        if len(self.times) == self.at:
            gaps = [b - a for a, b in itertools.pairwise(self.times)]
            route = [span.peer_id for span in self.session.route]
            print(json.dumps({"route": route, "step_s": statistics.median(gaps)}), flush=True)

    def end(self) -> None:
        pass


def failover_trial(model, prompt: torch.Tensor, expected: list[int], kill_after: int) -> dict:
    """One generation during which the orchestrator SIGKILLs a server of its route (after token ``kill_after``)."""
    new_tokens = len(expected)
    with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        streamer = _RouteAt(session, kill_after)
        tokens = generate_tokens(model, prompt, new_tokens, session=session, streamer=streamer)
        return {
            "times": streamer.times,
            "equal": tokens == expected,
            "failovers": session.failovers,
            "relayed_hops": session.relayed_hops,
        }


def summarize(runs: list[tuple[float, list]], new_tokens: int) -> dict:
    firsts = [clock.times[0] - clock.started for _, clocks in runs for clock in clocks]
    gaps = sorted(b - a for _, clocks in runs for clock in clocks for a, b in itertools.pairwise(clock.times))
    rates = [len(clocks) * new_tokens / seconds for seconds, clocks in runs]
    return {
        "step_ms": round(1000 * statistics.median(gaps), 2),
        "step_p95_ms": round(1000 * gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))], 2),
        "ttft_ms": round(1000 * statistics.median(firsts), 1),
        "tokens_per_s": round(statistics.median(rates), 2),
    }


def bounds(row: dict, base: dict, servers: int, new_tokens: int) -> dict:
    """The physical bounds of ``row`` (at its round trip) from ``base`` (the same sessions at no delay): every
    token, the first included, pays the push chain's one-way delays on top of its compute."""
    chain_ms = (servers + 1) * row["rtt_ms"] / 2
    push_step, push_ttft = base["step_ms"] + chain_ms, base["ttft_ms"] + chain_ms
    tokens = row["sessions"] * new_tokens
    tokens_per_s = tokens / (tokens / base["tokens_per_s"] + new_tokens * chain_ms / 1000)
    return {
        "step_push_bound_ms": round(push_step, 2),
        "step_relay_model_ms": round(base["step_ms"] + servers * row["rtt_ms"], 2),
        "ttft_push_bound_ms": round(push_ttft, 1),
        "tokens_per_s_push_bound": round(tokens_per_s, 2),
    }


def run_loopback(model: Path, spans: list[str], settings: dict, workdir: Path, request: dict) -> dict:
    """The client's answer to ``request`` through the same swarm on 127.0.0.1 in this namespace: what the
    forwarder is compared with."""
    place, peers = Place([], "127.0.0.1"), Peers(workdir / "loopback")
    peers.workdir.mkdir()
    atexit.register(peers.stop)
    try:
        initial_peer = peers.start(model, spans, place, [place] * len(spans))
        client = Client(place, {**settings, "initial_peers": [initial_peer]}, peers.workdir / "client.log")
        try:
            return client.request(request)
        finally:
            client.close()
    finally:
        peers.stop()


@contextlib.contextmanager
def wan_swarm(args, model: Path, spans: list[str], settings: dict, workdir: Path, say):
    """The swarm on the emulated WAN (a bootstrap host, a host per span, the client's host): yields the WAN and
    the client; stops and removes everything after."""
    wan, peers = Wan(hosts=len(spans) + 2, mtu=args.mtu), Peers(workdir / "wan")
    peers.workdir.mkdir()
    atexit.register(wan.close)
    atexit.register(peers.stop)
    try:
        wan.start()
        places = [Place(wan.exec_prefix(index), wan.address(index)) for index in range(wan.hosts)]
        say(f"starting the swarm in {wan.hosts} namespaces ({wan.namespace(0)}...)")
        initial_peer = peers.start(model, spans, places[0], places[1:-1])
        client = Client(places[-1], {**settings, "initial_peers": [initial_peer]}, peers.workdir / "client.log")
        try:
            yield wan, client
        finally:
            client.close()
    finally:
        peers.stop()
        wan.close()


def run_wan(args, model: Path, spans: list[str], settings: dict, workdir: Path, say) -> tuple[dict, list[dict]]:
    """The swarm on the emulated WAN: one session at no delay and no bandwidth limit (the forwarder's cost),
    then every round trip with every number of sessions."""
    with wan_swarm(args, model, spans, settings, workdir, say) as (wan, client):
        say("measuring: no delay, no bandwidth limit, 1 session")
        unlimited = measure_on(wan, client, 0, 0, 1, args)
        rows = []
        for rtt in args.rtts:
            for sessions in args.sessions:
                say(f"measuring: RTT {rtt:g} ms, {args.mbit:g} Mbit/s, {sessions} session(s)")
                rows.append(measure_on(wan, client, rtt, args.mbit, sessions, args))
        return unlimited, rows


def measure_on(wan: Wan, client: Client, rtt: float, mbit: float, sessions: int, args) -> dict:
    wan.configure(rtt, mbit, args.queue_kib)
    figures = client.request({"sessions": sessions, "repeats": args.repeats})
    forwarder = wan.configure(rtt, mbit, args.queue_kib)  # the counters of this measurement
    return {"rtt_ms": rtt, "mbit": mbit, "sessions": sessions, **figures, "forwarder": forwarder}


def run_failover(args, model: Path, spans: list[str], settings: dict, workdir: Path, say) -> list[dict]:
    """``args.failover`` trials on the WAN at ``args.rtt``: two servers per span, each on its own host; in each
    trial a server of the client's route (the first, the middle, ... in turn) is SIGKILLed at a random moment
    within a step after token ``args.kill_after``, then started again (a new peer) for the next trial."""
    import random

    servers = len(spans)
    wan, peers = Wan(hosts=2 * servers + 2, mtu=args.mtu), Peers(workdir / "failover")
    peers.workdir.mkdir()
    atexit.register(wan.close)
    atexit.register(peers.stop)
    chooser = random.Random(0)
    try:
        wan.start()
        places = [Place(wan.exec_prefix(index), wan.address(index)) for index in range(wan.hosts)]
        say(f"starting two servers per span in {wan.hosts} namespaces ({wan.namespace(0)}...)")
        initial_peer = peers.start(model, spans * 2, places[0], places[1:-1])
        where = {}  # peer id -> (its process, span, place)
        for process, address_file, place, span in zip(
            peers.processes[1:], peers.files[1:], places[1:-1], spans * 2, strict=True
        ):
            where[peers.wait_address(address_file, place.host).rsplit("/p2p/", 1)[1]] = (process, span, place)
        wan.configure(args.rtt, args.mbit, args.queue_kib)
        client_settings = {**settings, "initial_peers": [initial_peer], "failover": True}
        client = Client(places[-1], client_settings, peers.workdir / "client.log")
        trials = []
        try:
            for trial in range(args.failover):
                client.ask({"kill_after": args.kill_after})
                noted = client.answer()
                hop = trial % len(noted["route"])
                victim = noted["route"][hop]
                process, span, place = where.pop(victim)
                time.sleep(chooser.uniform(0, noted["step_s"]))  # anywhere within the step now in flight
                killed_at = time.monotonic()
                say(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} SIGKILL {victim[-8:]}")
                process.send_signal(signal.SIGKILL)
                process.wait()
                result = client.answer()
                trials.append(failover_figures(trial, hop, span, killed_at, result))
                say(f"trial {trial}: " + ", ".join(f"{key} {value}" for key, value in trials[-1].items()))
                address_file = peers.serve(model, f"server-{span}-{trial}", span, place, initial_peer)
                where[peers.wait_address(address_file, place.host).rsplit("/p2p/", 1)[1]] = (
                    peers.processes[-1],
                    span,
                    place,
                )
        finally:
            client.close()
        return trials
    finally:
        peers.stop()
        wan.close()


def repeating_model(model: Path) -> Path:
    """A copy of ``model`` whose attention adds nothing (its output projections are zero): each token then follows
    from the one before alone, so a text it has seen goes on as it went, which is what the ``repeat`` workload
    needs from a random-weight model (a stand-in for a model trained to copy; the same work per token)."""
    from safetensors.torch import load_file, save_file

    target = model.with_name(model.name + "-repeating")
    if (target / "config.json").exists():
        return target
    partial = model.with_name(model.name + "-repeating.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(model, partial)
    for shard in partial.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if name.endswith("self_attn.o_proj.weight"):
                tensor.zero_()
        save_file(tensors, shard, metadata={"format": "pt"})
    partial.rename(target)
    return target


def run_speculative(args, model: Path, spans: list[str], settings: dict, workdir: Path, say) -> list[dict]:
    """Plain and speculative generation side by side, on plain loopback and on the WAN at every ``--rtts``."""
    speculated = dict(
        workload=args.workload,
        draft_tokens=args.draft_tokens,
        draft_model=args.draft_model,
        new_tokens=settings["new_tokens"],
    )
    settings = {**settings, "speculative": speculated}
    say("measuring on plain loopback")
    rows = [{"network": "loopback", **run_loopback(model, spans, settings, workdir, {"speculate": args.repeats})}]
    with wan_swarm(args, model, spans, settings, workdir, say) as (wan, client):
        for rtt in args.rtts:
            say(f"measuring: RTT {rtt:g} ms, {args.mbit:g} Mbit/s")
            wan.configure(rtt, args.mbit, args.queue_kib)
            rows.append({"network": f"WAN {rtt:g} ms", **client.request({"speculate": args.repeats})})
    return rows


def render_speculative(report: dict) -> str:
    rows = report["rows"]
    lines = [
        f"{report['preset']} model{' (repeating)' if report['workload'] == 'repeat' else ''}, servers "
        f"{' '.join(report['servers'])}; workload {report['workload']}, {report['new_tokens']} new tokens, greedy; "
        f"--speculative {report['mode']} --draft-tokens {report['draft_tokens']} (adaptive); uplinks "
        f"{report['mbit']:g} Mbit/s"
    ]
    keys = ["network", "plain_tokens_per_s", "speculative_tokens_per_s", "speedup", "identical", "acceptance"]
    keys += ["tokens_per_trip"]
    lines += aligned([keys] + [[str(row[key]) for key in keys] for row in rows])
    return "\n".join(lines)


def failover_figures(trial: int, hop: int, span: str, killed_at: float, result: dict) -> dict:
    """The stall a kill caused: the longest wait for a token after the kill (the step in flight may still pass a
    server killed after it was done there: then the next step finds the failure), next to the median step."""
    times = result["times"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    after = [b - max(a, killed_at) for a, b in itertools.pairwise(times) if b > killed_at]
    return {
        "trial": trial,
        "hop": hop,
        "blocks": span,
        "equal": result["equal"],
        "failovers": result["failovers"],
        "relayed_hops": result["relayed_hops"],
        "step_ms": round(1000 * statistics.median(gaps), 1),
        "stall_ms": round(1000 * max(after), 1) if after else None,
    }


def render_failover(report: dict) -> str:
    trials = report["trials"]
    lines = [
        f"{report['preset']} model, spans {' '.join(report['servers'])}, two servers each on its own host; RTT "
        f"{report['rtt_ms']:g} ms, uplinks {report['mbit']:g} Mbit/s; {len(trials)} SIGKILLs, one per generation "
        f"of {report['new_tokens']} tokens, after token {report['kill_after']} at a random moment in the step"
    ]
    header = list(trials[0]) if trials else []
    if trials:
        lines += aligned([header] + [[str(trial[key]) for key in header] for trial in trials])
    stalls = [trial["stall_ms"] for trial in trials if trial["stall_ms"] is not None]
    if stalls:
        lines.append(
            f"identical tokens: {sum(trial['equal'] for trial in trials)}/{len(trials)}; stall (longest wait for a "
            f"token after the kill): median {statistics.median(stalls):g} ms, worst {max(stalls):g} ms"
        )
    return "\n".join(lines)


COLUMNS = (
    ("RTT ms", "rtt_ms"),
    ("sessions", "sessions"),
    ("step ms", "step_ms"),
    ("push bound", "step_push_bound_ms"),
    ("relay model", "step_relay_model_ms"),
    ("TTFT ms", "ttft_ms"),
    ("push bound", "ttft_push_bound_ms"),
    ("tokens/s", "tokens_per_s"),
    ("push bound", "tokens_per_s_push_bound"),
)


def render(report: dict) -> str:
    servers, loopback, unlimited = report["servers"], report["loopback"], report["no_delay_unlimited"]
    mbit = f"{report['mbit']:g} Mbit/s" if report["mbit"] else "unlimited"
    lines = [
        f"{report['preset']} model, {len(servers)} servers ({' '.join(servers)}), client on its own host; prompt "
        f"{report['prompt_tokens']} tokens, {report['new_tokens']} new; uplinks {mbit}, queue "
        f"{report['queue_kib']} KiB, MTU {report['mtu']}; {report['cpus']} CPUs",
        f"no delay, no bandwidth limit, 1 session: step {unlimited['step_ms']} ms, TTFT {unlimited['ttft_ms']} ms; "
        f"forwarder CPU {100 * unlimited['forwarder']['cpu_share']:.1f}%",
    ]
    if loopback:
        lines.append(
            f"plain loopback, same swarm: step {loopback['step_ms']} ms, TTFT {loopback['ttft_ms']} ms: the "
            f"forwarder adds {unlimited['step_ms'] - loopback['step_ms']:+.2f} ms per step"
        )
    lines.append(
        f"push bound: compute at no delay + {len(servers) + 1} one-way delays (client -> s1 -> ... -> client); "
        f"relay model: + {len(servers)} round trips (the client relays each hop)"
    )
    header = [title for title, _ in COLUMNS] + ["late ms", "drops", "fwd CPU"]
    table = [header]
    for row in report["rows"]:
        forwarder = row["forwarder"]
        cells = [f"{row[key]:g}" for _, key in COLUMNS]
        cells += [
            f"{forwarder['late_ms_mean']:.2f}",
            str(forwarder["queue_drops"]),
            f"{100 * forwarder['cpu_share']:.1f}%",
        ]
        table.append(cells)
    lines += aligned(table)
    return "\n".join(lines)


def aligned(table: list[list[str]]) -> list[str]:
    """The rows of ``table`` (its header first) as lines of right-aligned columns."""
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in table]


def parse_args() -> argparse.Namespace:
    numbers = lambda text: [float(part) for part in text.split(",") if part]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--servers", type=int, default=3, help="servers, each on its own host (default 3)")
    parser.add_argument("--rtt", type=float, default=50.0, help="round trip in ms between any two hosts")
    parser.add_argument("--rtts", type=numbers, help="several round trips, e.g. 0,20,50,100 (0 is always added)")
    parser.add_argument("--mbit", type=float, default=100.0, help="every host's uplink in Mbit/s (0: unlimited)")
    parser.add_argument("--sessions", type=lambda text: [int(n) for n in text.split(",")], default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure, after a short warm-up")
    parser.add_argument("--queue-kib", type=int, default=512, help="drop-tail queue of each uplink")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--no-loopback", action="store_true", help="skip the plain-loopback comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "petals-bench-models"))
    parser.add_argument(
        "--failover",
        type=int,
        default=0,
        metavar="TRIALS",
        help="instead of the table: this many generations at --rtt, each losing a server of its route to SIGKILL",
    )
    parser.add_argument("--kill-after", type=int, default=8, help="with --failover: the token after which to kill")
    parser.add_argument(
        "--speculative",
        choices=("ngram", "model"),
        help="instead of the table: plain vs speculative generation, on loopback and at each --rtts",
    )
    parser.add_argument("--draft-tokens", type=int, default=8, help="with --speculative: the most drafts a trip")
    parser.add_argument("--draft-model", help="with --speculative model: a local causal LM with the same tokenizer")
    parser.add_argument(
        "--workload",
        choices=("repeat", "random"),
        default="repeat",
        help="with --speculative: a text whose continuation is in the prompt (on a repeating copy of the model), or "
        "the random prompt",
    )
    parser.add_argument(
        "--nat", help="NAT configurations, each its own swarm: none,cone,symmetric,cone+cone,... (see wan_nat.py)"
    )
    parser.add_argument("--punch-peers", type=int, default=0, help="with --nat: more bootstrap peers to join through")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rtts = sorted({0.0, *(args.rtts if args.rtts is not None else [args.rtt])})
    if (args.speculative == "model") != (args.draft_model is not None):
        parser.error("--speculative model takes --draft-model PATH, and only it does")
    return args


def main() -> None:
    args = parse_args()
    if args.client:
        client_main(json.loads(args.client))
        return
    reason = unavailable()
    if reason:
        print(f"benchmarks/wan.py: skipped: an emulated WAN {reason}", file=sys.stderr)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that every finally and atexit cleanup runs

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    from petals_cli.testing import ensure_tiny_model
    from petals_cli.testing.swarm import even_spans

    preset = PRESETS[args.preset]
    model = ensure_tiny_model(Path(args.models_dir) / f"bench-{args.preset}", "llama", **preset["model"])
    spans = even_spans(preset["model"]["num_layers"], args.servers)
    settings = dict(model=str(model), prompt_tokens=preset["prompt_tokens"], new_tokens=args.new_tokens)
    settings["sessions"] = [1, *args.sessions]
    workdir = Path(tempfile.mkdtemp(prefix="petals-wan-"))
    say(f"logs in {workdir}")
    if args.speculative:
        if args.workload == "repeat":
            model = repeating_model(model)
            settings["model"] = str(model)
        settings["new_tokens"] = max(settings["new_tokens"], 64)
        rows = run_speculative(args, model, spans, settings, workdir, say)
        report = dict(preset=args.preset, servers=spans, workload=args.workload, mode=args.speculative)
        report.update(draft_tokens=args.draft_tokens, new_tokens=settings["new_tokens"], mbit=args.mbit, rows=rows)
        print(json.dumps(report, indent=1) if args.json else render_speculative(report))
        return
    if args.nat:
        rows = wan_nat.run_nat(args, model, spans, settings, workdir, say, sys.modules[__name__])
        report = dict(preset=args.preset, servers=spans, mbit=args.mbit, new_tokens=args.new_tokens, rows=rows)
        print(json.dumps(report, indent=1) if args.json else wan_nat.render(report))
        return
    if args.failover:
        trials = run_failover(args, model, spans, settings, workdir, say)
        report = dict(preset=args.preset, servers=spans, rtt_ms=args.rtt, mbit=args.mbit, new_tokens=args.new_tokens)
        report.update(kill_after=args.kill_after, trials=trials)
        print(json.dumps(report, indent=1) if args.json else render_failover(report))
        return
    loopback = None
    if not args.no_loopback:
        say("measuring the same swarm on plain loopback")
        loopback = run_loopback(model, spans, settings, workdir, {"sessions": 1, "repeats": args.repeats})
    unlimited, rows = run_wan(args, model, spans, settings, workdir, say)
    for row in rows:
        base = next(other for other in rows if other["rtt_ms"] == 0 and other["sessions"] == row["sessions"])
        row.update(bounds(row, base, len(spans), args.new_tokens))
    report = dict(preset=args.preset, servers=spans, prompt_tokens=preset["prompt_tokens"], new_tokens=args.new_tokens)
    report.update(mbit=args.mbit, queue_kib=args.queue_kib, mtu=args.mtu, cpus=os.cpu_count())
    report.update(loopback=loopback, no_delay_unlimited=unlimited, rows=rows)
    print(json.dumps(report, indent=1) if args.json else render(report))


if __name__ == "__main__":
    main()
