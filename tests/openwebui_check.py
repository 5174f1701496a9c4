"""`make openwebui-test` (not in CI, not collected by pytest): Open WebUI, the PyPI package in its own venv,
pointed at a live pagedserve and used in headless Chromium as a person would.

`python -m tests.openwebui_check --open-webui .venv-openwebui/bin/open-webui`

1. starts `pagedserve serve` (the default SmolLM2 model, an API key, --enable-auto-tool-choice
   --tool-call-parser hermes) behind a recording proxy, so every request Open WebUI sends and every answer
   it gets are kept;
2. starts Open WebUI offline (no hub downloads, no update check, no telemetry, one local user) with that
   proxy as its OpenAI connection;
3. through Open WebUI's own API, as an admin would in its Workspace: registers a Python tool (get_weather)
   and a model preset on SmolLM2 with that tool attached and function calling "native";
4. in Chromium: opens a new chat with the preset, types a question and sends it.

It then checks what the user sees and what went over the wire, and exits 1 if any check fails:
- the chat request carried the tool in `tools`; pagedserve answered with `tool_calls` for get_weather;
  Open WebUI ran the tool and sent its result back as a `tool` message; the tool's result shows in the chat;
- the title, tags and follow-up tasks got JSON Open WebUI could parse: the chat's title is the generated
  one (not "New Chat", not the question), the chat has tags, the answer has follow-up suggestions.
Screenshots of the chat go to --screenshots (a temporary folder by default).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

from tests.recording_proxy import Exchange, RecordingProxy
from tests.server_process import ServerProcess, free_port, wait_until

MODEL = "smollm2-135m-instruct"
API_KEY = "openwebui-check-key"
PRESET_ID = "smollm2-weather"
TOOL_ID = "weather"
TOOL_SOURCE = '''"""
title: Weather
description: The current weather in a city.
"""


class Tools:
    def get_weather(self, city: str) -> str:
        """
        Get the current weather in a city.
        :param city: The name of the city, e.g. Paris.
        """
        return f"The weather in {city}: 21 degrees Celsius, sunny (station report 7731)."
'''
TOOL_RESULT_MARK = "station report 7731"
QUESTION = "What is the weather in Paris? Use the get_weather tool."
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")
OPEN_WEBUI_READY_SECONDS = 600      # its first start migrates a fresh database and imports ~100 packages
ANSWER_SECONDS = 600                 # the tool loop and three background tasks on a busy 2-core machine


def open_webui_env(data_dir: Path, openai_base_url: str) -> dict[str, str]:
    """Open WebUI's documented environment for one local user, offline, talking only to our server."""
    return {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "WEBUI_AUTH": "False",                    # single-user mode: the browser is signed in as the admin
        "WEBUI_SECRET_KEY": secrets.token_hex(32),
        "OPENAI_API_BASE_URL": openai_base_url,
        "OPENAI_API_KEY": API_KEY,
        "ENABLE_OLLAMA_API": "False",             # no Ollama on localhost:11434 to look for
        "OFFLINE_MODE": "True",                   # HF_HUB_OFFLINE=1 and no version update check
        "HF_HUB_OFFLINE": "1",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "RAG_EMBEDDING_MODEL": "",                # no sentence-transformers model to load (no RAG here)
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "True",
        "ANONYMIZED_TELEMETRY": "False",          # chromadb's posthog
        "DO_NOT_TRACK": "True",
        "SCARF_NO_ANALYTICS": "True",
        "ENABLE_OTEL": "False",
        # A tiny model may call the tool again after its result; each loop is one more generation.
        "CHAT_RESPONSE_MAX_TOOL_CALL_ITERATIONS": "3",
    }


@contextmanager
def open_webui(executable: str, openai_base_url: str, log_path: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="open-webui-data-") as data_dir, log_path.open("wb") as log:
        process = subprocess.Popen([executable, "serve", "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
                                   env=open_webui_env(Path(data_dir), openai_base_url))
        try:
            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"open-webui exited with {process.returncode}; see {log_path}")
                try:
                    return httpx.get(url + "/health", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, what=f"Open WebUI at {url} (log: {log_path})", timeout=OPEN_WEBUI_READY_SECONDS,
                       interval=1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class OpenWebUIApi:
    """Open WebUI's REST API as its admin (the one local user of WEBUI_AUTH=False)."""

    def __init__(self, url: str) -> None:
        token = httpx.post(url + "/api/v1/auths/signin", json={"email": "", "password": ""},
                           timeout=60).raise_for_status().json()["token"]
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)

    def get(self, path: str) -> Any:
        return self.http.get(path).raise_for_status().json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.http.post(path, json=body).raise_for_status().json()

    def add_weather_tool_and_preset(self) -> None:
        """What an admin does in Workspace > Tools and Workspace > Models."""
        self.post("/api/v1/tools/create", {"id": TOOL_ID, "name": "Weather", "content": TOOL_SOURCE,
                                           "meta": {"description": "The current weather in a city."}})
        models = [model["id"] for model in self.get("/api/models")["data"]]
        if MODEL not in models:
            raise AssertionError(f"Open WebUI does not list {MODEL} from pagedserve; it lists {models}")
        self.post("/api/v1/models/create", {
            "id": PRESET_ID, "base_model_id": MODEL, "name": "SmolLM2 weather",
            "meta": {"description": "SmolLM2 with the weather tool", "toolIds": [TOOL_ID],
                     # Open WebUI's own built-in tools (memory, notes, chats, ...) would add dozens of tool
                     # definitions to every request: far too many for a 135M model to choose among.
                     "capabilities": {"builtin_tools": False}},
            "params": {"function_calling": "native", "temperature": 0}})


@contextmanager
def chromium(profile_dir: Path) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        raise RuntimeError("Chromium is missing: apt-get install -y chromium chromium-driver (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
