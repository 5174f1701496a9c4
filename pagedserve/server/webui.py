"""GET /: the built-in web chat for browsers, and Ollama's "Ollama is running" for everything else.

Tools that look for an Ollama server probe `GET /` (or `HEAD /`) and expect 200 text/plain
"Ollama is running". Browsers ask for `text/html` first and get the chat page instead. The page and
its assets (pagedserve/server/static/) are open: they hold no data, and every API call the page
makes carries the API key like any other client's.
"""
from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from pagedserve.server.errors import APIError

OLLAMA_BANNER = "Ollama is running"
STATIC_DIR = Path(__file__).parent / "static"
PAGE = "index.html"
# Served at /webui/<name>; nothing else under static/ is reachable.
ASSETS = {"chat.js": "text/javascript", "markdown.js": "text/javascript", "chat.css": "text/css"}
_HTML_TYPES = ("text/html", "application/xhtml+xml")
# NOTE: the page builds the DOM from model text without ever parsing it as HTML; this policy is
# the second line of defence should that slip: no inline script, no other origin, no framing.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Vary": "Accept",
}


def build_router(is_webui_enabled: bool) -> APIRouter:
    """The routes of `/` and the page's assets; with the web UI off, `/` only ever answers the banner."""
    router = APIRouter()

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root(request: Request) -> Response:
        wants_page = request.method == "GET" and prefers_html(request.headers.get("accept", ""))
        if is_webui_enabled and wants_page:
            return _static_file(PAGE, "text/html; charset=utf-8")
        return PlainTextResponse(OLLAMA_BANNER, headers={"Vary": "Accept"})

    @router.get("/webui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if not is_webui_enabled or name not in ASSETS:
            raise APIError(f"no such file: /webui/{name}", HTTPStatus.NOT_FOUND)
        return _static_file(name, f"{ASSETS[name]}; charset=utf-8")

    return router


def prefers_html(accept: str) -> bool:
    """True when the Accept header ranks an HTML type at least as high as anything else it names.

    Browsers send `text/html,...,*/*;q=0.8`; curl and HTTP libraries send `*/*` or `application/json`.
    """
    best_html, best_other = 0.0, 0.0
    for media_range in accept.split(","):
        media_type, _, parameters = media_range.partition(";")
        media_type = media_type.strip().lower()
        if not media_type:
            continue
        quality = _quality(parameters)
        if media_type in _HTML_TYPES:
            best_html = max(best_html, quality)
        else:
            best_other = max(best_other, quality)
    return best_html > 0 and best_html >= best_other


def _quality(parameters: str) -> float:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0


def _static_file(name: str, media_type: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=_PAGE_HEADERS)
