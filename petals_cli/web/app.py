"""The web pages' routes on a FastAPI app: the health page (`petals swarm web`, and `/swarm` of `petals api`), the
chat page (`/` of `petals api`) and the packaged static files.

Health routes, under ``base``: the page, ``fragment`` (what the page's script swaps in), ``api/v1/state`` (the
document of `petals swarm status --json`) and ``metrics`` (Prometheus). They serve the ``SwarmMonitor``'s last
reading and never dial the swarm. Every HTML response carries a content security policy that allows only this
server's own scripts, so even markup that escaped escaping could not run. Static files come from the package (no
CDN, no build step); the chat page is ``static/chat.html`` with its few values filled in, escaped.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import re
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from petals_cli.web.health import render_fragment, render_page
from petals_cli.web.metrics import CONTENT_TYPE, render_metrics
from petals_cli.web.monitor import SwarmMonitor

GZIP_FROM = 4096  # bytes
STATIC_TYPES = {
    "style.css": "text/css; charset=utf-8",
    "health.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static_text(name: str) -> str:
    return resources.files("petals_cli.web").joinpath("static", name).read_text(encoding="utf-8")


def add_static(app: FastAPI) -> None:
    files = {name: _static_text(name) for name in STATIC_TYPES}

    async def static(name: str):
        if name not in files:
            return Response("not found\n", status_code=404, media_type="text/plain")
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return Response(files[name], media_type=STATIC_TYPES[name], headers=headers)

    app.get("/static/petals/{name}", include_in_schema=False)(static)


def add_health_routes(app: FastAPI, monitor: SwarmMonitor, *, base: str = "", chat_url: str = "") -> None:
    """The health page at ``base`` (e.g. "" or "/swarm") and its data routes beneath it; each visit tells the
    monitor someone is looking (a monitor that reads only while visited starts again)."""

    async def page(request: Request):
        monitor.visit()
        return _html(request, render_page(monitor.view(), base=base, chat_url=chat_url))

    async def fragment(request: Request):
        monitor.visit()
        return _html(request, render_fragment(monitor.view()))

    async def state():
        monitor.visit()
        view = monitor.view()
        return JSONResponse(view.state_json(), status_code=200 if view.status else 503)

    async def metrics():
        monitor.visit()
        return Response(render_metrics(monitor.view()), media_type=CONTENT_TYPE)

    for path in dict.fromkeys([base or "/", f"{base}/"]):
        app.get(path, include_in_schema=False)(page)
    app.get(f"{base}/fragment", include_in_schema=False)(fragment)
    app.get(f"{base}/api/v1/state")(state)
    app.get(f"{base}/metrics")(metrics)


def _html(request: Request, body: str) -> Response:
    """A page, gzipped for clients that accept it when large (a 1,000-server swarm's page is about 0.8 MB of HTML,
    36 kB gzipped). Done here rather than by middleware, which would have to keep its hands off the API's streams."""
    data = body.encode()
    if len(data) < GZIP_FROM or "gzip" not in request.headers.get("accept-encoding", ""):
        return HTMLResponse(data, headers=PAGE_HEADERS)
    headers = {**PAGE_HEADERS, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    return Response(gzip.compress(data, compresslevel=6), media_type="text/html; charset=utf-8", headers=headers)


def add_chat_page(app: FastAPI, *, model_name: str, tokenizer, key_required: bool, swarm_url: str) -> None:
    """The chat page at "/": it talks to this server's own /v1/chat/completions from the browser."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what the API applies
        template = template.get("default") or next(iter(template.values()), None)
    if template:
        template_name, template_text = "the model's own chat template", str(template)
    else:
        template_name = "none in the tokenizer: a plain transcript of User: and Assistant: lines"
        template_text = "User: {message}\nAssistant: {reply}\n… (a reply ends where the model starts a User: line)"
    values = {
        "model": model_name,
        "template_name": template_name,
        "template": template_text,
        "key_required": "true" if key_required else "false",
        "swarm_url": swarm_url,
    }
    # one pass: a value that itself holds "{{...}}" (a chat template may) is not filled in again
    body = re.sub(r"\{\{(\w+)\}\}", lambda match: html.escape(values[match[1]], quote=True), _static_text("chat.html"))

    async def chat():
        return HTMLResponse(body, headers=PAGE_HEADERS)

    app.get("/", include_in_schema=False)(chat)


def make_health_app(monitor: SwarmMonitor, on_exit=None) -> FastAPI:
    """`petals swarm web`: the health page at "/", reading from start to exit; ``on_exit`` runs at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        monitor.start()
        try:
            yield
        finally:
            await monitor.stop()
            if on_exit is not None:
                on_exit()

    app = FastAPI(title="petals swarm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    add_static(app)
    add_health_routes(app, monitor)
    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
