"""The swarm as Prometheus metrics (text exposition format 0.0.4): a ``MonitorView`` in, the text out (pure).

Gauges per model (label ``model``: its DHT prefix): servers per state, relayed servers, flagged servers, blocks,
missing blocks, the fewest servers on any block and each block's server count; this reader's round trips to the
servers as a summary (quantiles 0.5, 0.9, 0.99); and, for the reader itself, whether the latest reading worked and
when the shown one was taken. Label values come from the swarm and are escaped as the format requires.
"""

from __future__ import annotations

import statistics

from petals_cli.swarm import ModelStatus
from petals_cli.web.monitor import MonitorView

STATES = ("online", "joining", "offline", "unreachable")
QUANTILES = (0.5, 0.9, 0.99)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float):
        return "NaN" if value != value else repr(value)
    return str(int(value))


class _Exposition:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        rendered = ",".join(f'{key}="{_label(str(text))}"' for key, text in labels.items())
        self.lines.append(f"{name}{{{rendered}}} {_number(value)}" if rendered else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(view: MonitorView) -> str:
    out = _Exposition()
    models = view.status.models if view.status else ()
    out.family("petals_monitor_up", "gauge", "1 when the latest reading of the swarm worked, else 0.")
    out.sample("petals_monitor_up", 0 if view.error or view.status is None else 1)
    out.family("petals_monitor_reading_timestamp_seconds", "gauge", "When the reading shown was taken (Unix time).")
    out.sample("petals_monitor_reading_timestamp_seconds", view.status.taken_at if view.status else 0.0)
    out.family("petals_models", "gauge", "Models announced in the swarm's model index.")
    out.sample("petals_models", len(models))
    _per_model(out, models)
    _rtts(out, models)
    return out.text()


def _per_model(out: _Exposition, models: tuple[ModelStatus, ...]) -> None:
    out.family("petals_model_healthy", "gauge", "1 when every block of the model has an online server.")
    for model in models:
        out.sample("petals_model_healthy", int(model.healthy), model=model.prefix)
    out.family("petals_model_blocks", "gauge", "Blocks of the model.")
    for model in models:
        out.sample("petals_model_blocks", model.num_blocks, model=model.prefix)
    out.family("petals_model_missing_blocks", "gauge", "Blocks of the model with no online server.")
    for model in models:
        out.sample("petals_model_missing_blocks", len(model.missing_blocks), model=model.prefix)
    out.family("petals_model_min_block_servers", "gauge", "Online servers on the model's weakest block.")
    for model in models:
        out.sample("petals_model_min_block_servers", min(model.coverage, default=0), model=model.prefix)
    out.family("petals_block_servers", "gauge", "Online servers holding each block.")
    for model in models:
        for block, count in enumerate(model.coverage):
            out.sample("petals_block_servers", count, model=model.prefix, block=str(block))
    out.family("petals_servers", "gauge", "Servers of the model by state (unreachable: announced, did not answer).")
    for model in models:
        for state in STATES:
            count = sum(server.state == state for server in model.servers)
            out.sample("petals_servers", count, model=model.prefix, state=state)
    out.family("petals_servers_relayed", "gauge", "Servers reached through a relay (behind a NAT).")
    for model in models:
        out.sample("petals_servers_relayed", sum(s.connection == "relayed" for s in model.servers), model=model.prefix)
    out.family("petals_servers_flagged", "gauge", "Servers with signed reports of tampering in this machine's log.")
    for model in models:
        out.sample("petals_servers_flagged", sum(s.flagged > 0 for s in model.servers), model=model.prefix)


def _rtts(out: _Exposition, models: tuple[ModelStatus, ...]) -> None:
    out.family("petals_server_rtt_seconds", "summary", "This reader's round trips to the servers that answered.")
    for model in models:
        rtts = sorted(server.rtt for server in model.servers if server.rtt is not None)
        for quantile in QUANTILES:
            value = _quantile(rtts, quantile)
            out.sample("petals_server_rtt_seconds", value, model=model.prefix, quantile=str(quantile))
        out.sample("petals_server_rtt_seconds_sum", sum(rtts), model=model.prefix)
        out.sample("petals_server_rtt_seconds_count", len(rtts), model=model.prefix)


def _quantile(ordered: list[float], quantile: float) -> float:
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(quantile * 100) - 1]
