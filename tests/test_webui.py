"""GET /: the web chat page for browsers, "Ollama is running" for everything else, and --no-webui.

No model loads here: the app's lifespan never runs, and these routes need no engine.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pagedserve.cli.main import serve_configs
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.server.app import create_app
from pagedserve.server.webui import prefers_html

CHROME_ACCEPT = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,"
                 "application/signed-exchange;v=b3;q=0.7")
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def client(**server_options) -> TestClient:
    return TestClient(create_app(ServerConfig(**server_options), EngineConfig(model="never-loaded")))


@pytest.mark.parametrize("accept, expected", [
    (CHROME_ACCEPT, True), (FIREFOX_ACCEPT, True), ("text/html", True), ("text/html, */*", True),
    ("*/*", False), ("", False), ("application/json", False), ("text/plain", False),
    ("application/json, text/html;q=0.5", False), ("text/html;q=0", False), ("TEXT/HTML", True),
    ("text/html;q=oops, */*", False),
])
def test_prefers_html(accept, expected):
    assert prefers_html(accept) is expected


def test_browsers_get_the_page_and_its_assets():
    web = client()
    page = web.get("/", headers={"Accept": CHROME_ACCEPT})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>pagedserve chat</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"] and "Accept" in page.headers["vary"]
    for name, media_type in (("chat.js", "text/javascript"), ("markdown.js", "text/javascript"),
                             ("chat.css", "text/css")):
        assert f'"webui/{name}"' in page.text
        asset = web.get(f"/webui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
    assert web.get("/webui/index.html").status_code == 404
    assert web.get("/webui/..%2Fwebui.py").status_code == 404


@pytest.mark.parametrize("headers", [{}, {"Accept": "*/*"}, {"Accept": "application/json"},
                                     {"User-Agent": "curl/8.5.0", "Accept": "*/*"}])
def test_other_clients_get_what_ollama_answers(headers):
    response = client().get("/", headers=headers)
    assert response.status_code == 200 and response.text == "Ollama is running"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


def test_head_answers_like_ollama():
    response = client().head("/", headers={"Accept": CHROME_ACCEPT})
    assert response.status_code == 200 and response.headers["content-type"] == "text/plain; charset=utf-8"


def test_the_page_is_open_while_the_api_needs_the_key():
    web = client(api_key=("secret",))
    assert web.get("/", headers={"Accept": CHROME_ACCEPT}).status_code == 200
    assert web.get("/webui/chat.js").status_code == 200
    assert web.get("/").text == "Ollama is running"
    assert web.get("/v1/models").status_code == 401


def test_no_webui():
    _, server_config = serve_configs(["serve", "--no-webui"], {})
    assert server_config.enable_webui is False
    assert serve_configs(["serve"], {})[1].enable_webui is True
    web = client(enable_webui=False)
    response = web.get("/", headers={"Accept": CHROME_ACCEPT})
    assert response.status_code == 200 and response.text == "Ollama is running"
    assert web.get("/webui/chat.js").status_code == 404
