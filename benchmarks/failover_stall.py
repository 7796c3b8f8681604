"""How long generation stalls when the server in use is SIGKILLed (or frozen), and whether the tokens stay identical.

    python benchmarks/failover_stall.py --preset tiny --trials 10
    python benchmarks/failover_stall.py --preset midsize --trials 10
    python benchmarks/failover_stall.py --preset tiny --trials 10 --signal stop

Each trial generates NEW_TOKENS greedily through a swarm whose last span has two replicas, SIGKILLs the
replica in use at token KILL_AT (with ``--signal stop``: SIGSTOPs it, a frozen server whose connections stay
open; it is killed after the trial), and starts a fresh replica for the next trial. The stall is the step that
meets the dead server minus the median step. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `petals` CLI does for its peers
import torch  # noqa: E402

from petals_cli.testing.swarm import Swarm  # noqa: E402

PRESETS = {
    "tiny": dict(model=dict(num_layers=4), first="0:2", last="2:4", new_tokens=400, kill_at=100),
    "midsize": dict(
        model=dict(
            num_layers=12, hidden_size=1024, num_heads=16, num_kv_heads=16, intermediate_size=2816, vocab_size=32000
        ),
        first="0:6",
        last="6:12",
        new_tokens=200,
        kill_at=50,
    ),
}


class StepClock:
    """A streamer that times every token and signals the last span's server at token ``kill_at``."""

    def __init__(self, swarm, session, kill_at, signum):
        self.swarm, self.session, self.kill_at, self.signum = swarm, session, kill_at, signum
        self.times, self.last, self.count, self.kill_step, self.victim = [], None, 0, None, None

    def put(self, value):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last, self.count = now, self.count + 1
        if self.count == self.kill_at:
            peer = self.session.route[-1].peer_id
            self.victim = next(server for server in self.swarm.servers if server.addresses()[0].endswith(peer))
            self.victim.process.send_signal(self.signum)
            self.kill_step = len(self.times)  # the next interval is the step that meets the dead server

    def end(self):
        pass


def known(model, peer: str, timeout: float = 60.0) -> None:
    """Wait until ``model``'s client reads ``peer`` as online: the stall is then the failover's own, not that of a
    fresh read of the swarm (DHT lookups that meet the killed servers wait hivemind's 3 s for each)."""
    from petals_cli.wire import ServerState

    client, deadline = model.petals_client, time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = client.run(client.snapshot(model.petals_prefix, model.petals_num_blocks, max_age=0), timeout=30)
        if peer in snapshot.servers and snapshot.servers[peer].state == ServerState.ONLINE:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the client never saw server {peer[-8:]} online")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--models-dir", default=".models")
    parser.add_argument("--signal", choices=("kill", "stop"), default="kill", help="SIGKILL or SIGSTOP the server")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from petals_cli import AutoDistributedModelForCausalLM
    from petals_cli.testing import ensure_tiny_model

    path = ensure_tiny_model(Path(args.models_dir) / f"bench-{args.preset}", "llama", **preset["model"])
    prompt = torch.randint(4, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    new_tokens = preset["new_tokens"]
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    reference = AutoModelForCausalLM.from_pretrained(path).eval().generate(prompt, **generate)

    swarm = Swarm(model=path, workdir=Path(tempfile.mkdtemp(prefix="petals-stall-")))
    stalls, identical = [], 0
    signum = signal.SIGKILL if args.signal == "kill" else signal.SIGSTOP
    try:
        swarm.start_many(preset["first"], preset["last"], preset["last"])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        for trial in range(args.trials):
            with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
                clock = StepClock(swarm, session, preset["kill_at"], signum)
                output = model.generate(prompt, session=session, streamer=clock, **generate)
            stalls.append(clock.times[clock.kill_step] - statistics.median(clock.times))
            identical += output.tolist() == reference.tolist()
            clock.victim.process.send_signal(signal.SIGKILL)  # a frozen one too: one replica besides the fresh one
            print(f"trial {trial}: stall {stalls[-1]:.3f}s, failovers {session.failovers}", file=sys.stderr)
            fresh = swarm.start(preset["last"])  # a fresh replica for the next trial, once the client knows it
            known(model, fresh.addresses()[0].rsplit("/p2p/", 1)[1])
        model.close()
    finally:
        swarm.stop()
    result = {
        "preset": args.preset,
        "signal": args.signal,
        "trials": args.trials,
        "kill_at_token": preset["kill_at"],
        "new_tokens": new_tokens,
        "stall_median_s": round(statistics.median(stalls), 3),
        "stall_max_s": round(max(stalls), 3),
        "identical_outputs": identical,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
