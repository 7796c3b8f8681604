"""`benchmarks/wan.py --nat ...`: the swarm with some of its servers behind NATs, next to all-direct.

    sudo .venv/bin/python benchmarks/wan.py --nat none,cone,symmetric,cone+cone,symmetric+symmetric --rtts 20,50
    sudo .venv/bin/python benchmarks/wan.py --nat none,cone --punch-peers 4

Each configuration names the NAT of the first servers (``cone+symmetric``: server 1 behind a cone NAT, server 2
behind a symmetric one, the rest direct; ``none``: all direct) and gets a swarm of its own: a bootstrap peer (the
relay), one `petals serve` per span, the client, and ``--punch-peers`` more bootstrap peers that every server joins
through (libp2p starts hole punching only once four peers a server dialled saw it at one public address). Per
configuration: seconds from `petals serve` to serving (its address file: announced online, RPCs open), from then
to the client's first generated token (its warm-up), how the client is connected to each server when it measures
(direct or relayed), whether its greedy tokens equal local transformers', and at each round trip the median step,
its 95th percentile and the time to first token of one session. Hosts are in 11.77.0.0/24: libp2p builds relayed
addresses only from a relay's public ones.

This module owns the configurations and their table; peers, the client and the network are ``wan.py``'s.
"""

from __future__ import annotations

import contextlib
import time

NAT_SUBNET = "11.77.0"


def parse_configurations(text: str) -> list[tuple[str, ...]]:
    """``none,cone,cone+symmetric`` -> [(), ("cone",), ("cone", "symmetric")]."""
    configurations = []
    for item in text.split(","):
        kinds = () if item.strip() in ("", "none") else tuple(kind.strip() for kind in item.split("+"))
        for kind in kinds:
            if kind not in ("cone", "symmetric"):
                raise ValueError(f"a NAT is cone or symmetric, not {kind!r}")
        configurations.append(kinds)
    return configurations


def name_of(kinds: tuple[str, ...]) -> str:
    return "+".join(kinds) if kinds else "none"


def run_nat(args, model, spans: list[str], settings: dict, workdir, say, tools) -> list[dict]:
    """One swarm per configuration; ``tools`` is wan.py's module (Wan, Peers, Place, Client, measure_on)."""
    rows = []
    for kinds in parse_configurations(args.nat):
        if len(kinds) > len(spans):
            raise ValueError(f"{name_of(kinds)}: more servers behind NATs than the {len(spans)} servers")
        say(f"configuration {name_of(kinds)}")
        rows.append(_one_configuration(args, model, spans, settings, workdir / name_of(kinds), kinds, say, tools))
    return rows


def _one_configuration(args, model, spans, settings, workdir, kinds, say, tools) -> dict:
    extra = args.punch_peers
    hosts = 1 + extra + len(spans) + 1  # bootstrap, extra peers, servers, client
    first_server = 1 + extra
    nat = {first_server + index: kind for index, kind in enumerate(kinds)}
    wan = tools.Wan(hosts=hosts, mtu=args.mtu, subnet=NAT_SUBNET, nat=nat)
    peers = tools.Peers(workdir)
    workdir.mkdir(parents=True)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(wan.close)
        cleanup.callback(peers.stop)
        wan.start()
        wan.configure(args.rtts[-1], args.mbit, args.queue_kib)
        places = [tools.Place(wan.exec_prefix(index), wan.address(index)) for index in range(hosts)]
        bootstraps = [peers.launch(places[i], f"bootstrap{i}", "swarm", "bootstrap") for i in range(1 + extra)]
        initial = [peers.wait_address(file, places[index].host) for index, file in enumerate(bootstraps)]
        started = time.monotonic()
        files = [
            peers.launch(places[first_server + index], f"server{index}", "serve", str(model), "--blocks", span,
                         *[word for peer in initial for word in ("--initial-peers", peer)])
            for index, span in enumerate(spans)
        ]  # fmt: skip
        serving = []
        for file in files:
            peers.wait_address(file, "")  # any address: a relayed server's name its relay's host
            serving.append(round(time.monotonic() - started, 2))
        served = time.monotonic()
        client = tools.Client(places[-1], {**settings, "initial_peers": initial, "nat": True}, workdir / "client.log")
        cleanup.callback(client.close)
        first_token = round(time.monotonic() - served, 2)
        connections = client.request({"connections": True})["connections"]
        measured = {}
        for rtt in args.rtts:
            if rtt == 0:
                continue
            measured[f"{rtt:g}"] = tools.measure_on(wan, client, rtt, args.mbit, 1, args)
        connections_after = client.request({"connections": True})["connections"]
        identical = client.request({"identical": True})["identical"]
        return {
            "nat": name_of(kinds),
            "punch_peers": extra,
            "serving_s": serving,
            "first_token_after_serving_s": first_token,
            "connections": connections,
            "connections_after": connections_after,
            "identical": identical,
            "rtts": measured,
            "nat_drops": wan.totals.get("nat_drops", 0),
        }


def client_connections(model, model_path: str) -> list[str]:
    """In the client process: how it is connected to each server (in span order), as `swarm status` says."""
    from petals_cli.swarm import collect_status

    client = model.petals_client
    status = client.run(collect_status(client, model_path), timeout=60)
    return [server.connection for server in status.models[0].servers]


def render(report: dict) -> str:
    lines = [
        f"{report['preset']} model, servers {' '.join(report['servers'])}, 1 session, {report['new_tokens']} new "
        f"tokens, uplinks {report['mbit']:g} Mbit/s; NAT of the first servers (the rest direct)"
    ]
    header = ["NAT", "punch peers", "serve->serving s", "serving->1st token s", "links (start -> end)", "exact"]
    rtts = sorted({rtt for row in report["rows"] for rtt in row["rtts"]}, key=float)
    for rtt in rtts:
        header += [f"step {rtt} ms", f"p95 {rtt}", f"TTFT {rtt}"]
    table = [header]
    for row in report["rows"]:
        links = f"{'/'.join(row['connections'])} -> {'/'.join(row['connections_after'])}"
        cells = [row["nat"], str(row["punch_peers"]), " ".join(map(str, row["serving_s"]))]
        cells += [str(row["first_token_after_serving_s"]), links, "yes" if row.get("identical") else "NO"]
        for rtt in rtts:
            figures = row["rtts"].get(rtt, {})
            cells += [str(figures.get(key, "")) for key in ("step_ms", "step_p95_ms", "ttft_ms")]
        table.append(cells)
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)
