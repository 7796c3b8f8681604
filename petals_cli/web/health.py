"""The swarm health page as HTML: a ``MonitorView`` in, markup out (pure; no I/O, no swarm).

One renderer serves both the first load (readable with JavaScript off) and the live refresh (the page's script
fetches ``fragment`` and swaps it in), so the page never has two ways of drawing the same thing. Every string that
reached us from the swarm (names, versions, dtypes, peer ids, model names) or from an error goes through ``_text``
or ``_attr``: markup in a server's announced name is shown as the characters it is.
"""

from __future__ import annotations

import html
import re
import time

from petals_cli.swarm import ModelStatus, ServerStatus, format_ranges
from petals_cli.tui.render import flag_text, milliseconds, step_text
from petals_cli.web.monitor import MonitorView

TABLE_COLUMNS = ("server", "blocks", "state", "throughput", "load", "cache room", "dtype", "version", "link", "rtt")


def _text(value: object) -> str:
    return html.escape(str(value), quote=False)


def _attr(value: object) -> str:
    return html.escape(str(value), quote=True)


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", value)[:80]


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def render_page(view: MonitorView, *, base: str, title: str = "petals swarm health", chat_url: str = "") -> str:
    """The whole page; ``base``: where the health routes are mounted ("" or "/swarm"); ``chat_url``: a link back
    to a chat page, when the page is served beside one."""
    chat = f'<a href="{_attr(chat_url)}">chat</a>' if chat_url else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_text(title)}</title>
<link rel="stylesheet" href="/static/petals/style.css">
<noscript><meta http-equiv="refresh" content="{max(1, round(view.period))}"></noscript>
<script src="/static/petals/health.js" defer></script>
</head>
<body>
<header class="top">
<a class="brand" href="{_attr(base or "/")}">petals</a><span class="what">swarm health</span>
<nav>{chat}<a href="{_attr(base)}/api/v1/state">state (JSON)</a><a href="{_attr(base)}/metrics">metrics</a></nav>
</header>
<main id="health" data-fragment="{_attr(base)}/fragment" data-period="{view.period:g}">
{render_fragment(view)}
</main>
</body>
</html>
"""


def render_fragment(view: MonitorView) -> str:
    """What the live refresh replaces: the reading line, any failure, and one section per model."""
    status = view.status
    parts = [_reading_line(view)]
    if view.error:
        shown_since = f" Showing the reading of {_utc(status.taken_at)}." if status else ""
        parts.append(f'<p class="alert" role="alert">Reading the swarm failed: {_text(view.error)}.{shown_since}</p>')
    if status is None:
        if not view.error:
            parts.append('<p class="empty">Reading the swarm…</p>')
    elif not status.models:
        parts.append('<p class="empty">No models are served in this swarm yet.</p>')
    parts.extend(_model_section(model) for model in (status.models if status else ()))
    return "\n".join(parts)


def _reading_line(view: MonitorView) -> str:
    status = view.status
    if status is None:
        return f'<p class="reading">No reading yet; the swarm is read every {view.period:g} s.</p>'
    servers = {server.peer_id for model in status.models for server in model.servers}
    stale = " stale" if view.stale else ""
    return (
        f'<p class="reading{stale}">Last reading <time datetime="{_attr(_iso(status.taken_at))}" '
        f'data-taken="{status.taken_at:.3f}">{_text(_utc(status.taken_at))}</time><span class="age"></span>'
        f" · read every {view.period:g} s · {_count(len(status.models), 'model')}, "
        f"{_count(len(servers), 'server')}</p>"
    )


def _model_section(model: ModelStatus) -> str:
    online = [server for server in model.servers if server.state == "online"]
    if model.healthy:
        verdict = '<span class="verdict ok">healthy</span>'
    elif model.num_blocks == 0:
        verdict = '<span class="verdict bad">broken: the model has no blocks</span>'
    else:
        missing = format_ranges(model.missing_blocks)
        verdict = f'<span class="verdict bad">broken: no server for blocks {_text(missing)}</span>'
    weakest = ""
    if model.coverage:
        fewest = min(model.coverage)
        blocks = [index for index, count in enumerate(model.coverage) if count == fewest]
        weakest = f" · fewest servers: {fewest} on blocks {_text(format_ranges(blocks))}"
    about = (
        f"{_text(model.family)} · {_count(model.num_blocks, 'block')} · {_text(model.model)} · "
        f"{len(online)} of {_count(len(model.servers), 'server')} online{weakest}"
    )
    health = "ok" if model.healthy else "bad"
    return f"""<section class="model {health}" id="m-{_attr(_slug(model.prefix))}">
<h2><span class="name">{_text(model.prefix)}</span> {verdict}</h2>
<p class="about">{about}</p>
{_coverage(model)}
{_legend()}
{_table(model)}
</section>"""


def _coverage(model: ModelStatus) -> str:
    """The strip (one cell per block, coloured by its number of online servers) and the servers as bars below it,
    on the same grid of blocks; a bar links to its row of the table and carries its details as a tooltip."""
    cells = "".join(
        f'<span class="cell {_coverage_class(count)}" title="block {index}: {_count(count, "server")}"></span>'
        for index, count in enumerate(model.coverage)
    )
    bars = "".join(_bar(model, server) for server in model.servers)
    label = "blocks with no server: " + (format_ranges(model.missing_blocks) if model.missing_blocks else "none")
    blocks = max(1, model.num_blocks)
    return f"""<div class="track" style="--blocks:{blocks}">
<div class="strip" role="img" aria-label="{_attr(label)}">{cells}</div>
<div class="bars">{bars}</div>
<div class="axis"><span>0</span><span>{model.num_blocks}</span></div>
</div>"""


def _coverage_class(count: int) -> str:
    return "c0" if count == 0 else "c1" if count == 1 else "c2"


def _bar(model: ModelStatus, server: ServerStatus) -> str:
    start = min(max(server.start_block, 0), model.num_blocks)
    end = min(max(server.end_block, start + 1), max(model.num_blocks, 1))
    label = server.public_name or server.short_id
    return (
        f'<a class="bar s-{_attr(server.state)}{" flagged" if server.flagged else ""}" '
        f'style="grid-column:{start + 1} / {end + 1}" href="#{_attr(_row_id(model, server))}" '
        f'title="{_attr(_details(server))}">{_text(label)}</a>'
    )


def _details(server: ServerStatus) -> str:
    lines = [
        f"peer {server.peer_id}",
        f"name {server.public_name or '-'}",
        f"blocks {server.start_block}:{server.end_block}, {server.state}",
        f"version {server.version} (protocol {server.protocol})",
        f"dtype {server.precision}",
        f"throughput {server.throughput:.1f}",
        f"load {_load(server)}",
        f"cache room {server.cache_tokens_left} tokens",
        f"link {_link(server)}, round trip {milliseconds(server.rtt)}",
    ]
    if server.flagged:
        lines.append(flag_text(server.flagged))
    return "\n".join(lines)


def _load(server: ServerStatus) -> str:
    sessions = f"{server.sessions} session{'' if server.sessions == 1 else 's'}"
    capacity = f" ({server.batch_capacity} a step)" if server.batch_capacity else ""
    return f"{sessions}{capacity}, queue {server.queue_length}, step {step_text(server)}"


def _link(server: ServerStatus) -> str:
    return f"{server.connection} via {', '.join(server.relays)}" if server.relays else server.connection


def _legend() -> str:
    return (
        '<p class="legend"><span class="key c0"></span>no server <span class="key c1"></span>one server (thin) '
        '<span class="key c2"></span>two or more</p>'
    )


def _table(model: ModelStatus) -> str:
    head = "".join(f"<th>{name}</th>" for name in TABLE_COLUMNS)
    rows = "\n".join(_row(model, server) for server in model.servers)
    table = f'<table class="servers"><thead><tr>{head}</tr></thead><tbody>\n{rows}\n</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _row(model: ModelStatus, server: ServerStatus) -> str:
    flag = f' <span class="flag">{_text(flag_text(server.flagged))}</span>' if server.flagged else ""
    name = f'<span class="peer-name">{_text(server.public_name)}</span> ' if server.public_name else ""
    cells = [
        f'{name}<code title="{_attr(server.peer_id)}">{_text(server.short_id)}</code>',
        f"{server.start_block}:{server.end_block}",
        f'<span class="state s-{_attr(server.state)}">{_text(server.state)}</span>{flag}',
        f"{server.throughput:.1f}",
        _text(_load(server)),
        str(server.cache_tokens_left),
        _text(server.precision),
        _text(server.version),
        _text(_link(server)),
        _text(milliseconds(server.rtt)),
    ]
    body = "".join(f"<td>{cell}</td>" for cell in cells)
    return f'<tr id="{_attr(_row_id(model, server))}" class="s-{_attr(server.state)}">{body}</tr>'


def _row_id(model: ModelStatus, server: ServerStatus) -> str:
    return f"s-{_slug(model.prefix)}-{_slug(server.peer_id)}"


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
