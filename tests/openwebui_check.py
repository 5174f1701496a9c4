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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

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
        # Open WebUI's "task model params": its title/tags/follow-up requests ask for a JSON object, which
        # pagedserve then guarantees (without it SmolLM2-135M echoes the follow-up prompt instead of JSON).
        "TASK_MODEL_PARAMS": json.dumps({"response_format": {"type": "json_object"}}),
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


def chat_in_browser(driver: Any, url: str, shots: Path) -> str:
    """A new chat with the preset: type the question, send it; returns the chat's id (from the address)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{url}/?models={PRESET_ID}")
    box = wait_until(lambda: driver.find_elements(By.ID, "chat-input"), what="the chat input", timeout=120)[0]
    driver.save_screenshot(str(shots / "1-new-chat.png"))
    # A fresh install greets with "What's New in Open WebUI"; close it as a person would.
    okay = wait_until(lambda: driver.find_elements(By.XPATH, "//button[contains(., \"Okay, Let's Go!\")]") or [None],
                      what="the release notes or none", timeout=10)[0]
    if okay is not None:
        okay.click()
        wait_until(lambda: not driver.find_elements(By.XPATH, "//button[contains(., \"Okay, Let's Go!\")]"),
                   what="the release notes to close")
    box.click()
    box.send_keys(QUESTION)
    box.send_keys(Keys.ENTER)
    chat_id = wait_until(lambda: "/c/" in driver.current_url and driver.current_url.rsplit("/c/", 1)[1],
                         what="the chat to be saved", timeout=120)
    return chat_id


def assistant_message(chat: dict[str, Any]) -> dict[str, Any] | None:
    messages = chat["chat"].get("history", {}).get("messages", {})
    answers = [m for m in messages.values() if m.get("role") == "assistant"]
    return answers[-1] if answers else None


def chat_completions(proxy: RecordingProxy) -> list[Exchange]:
    return proxy.recorded("/v1/chat/completions")


def describe(exchange: Exchange) -> str:
    body = exchange.request_json()
    tools = [t["function"]["name"] for t in body.get("tools") or []]
    if body.get("stream"):
        content, calls, finish = "", [], None
        for event in exchange.response_events():
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                content += delta.get("content") or ""
                calls += [c["function"].get("name") for c in delta.get("tool_calls") or [] if c.get("function", {}).get("name")]
                finish = choice.get("finish_reason") or finish
    else:
        message = exchange.response_json()["choices"][0]["message"]
        content, finish = message.get("content") or "", exchange.response_json()["choices"][0]["finish_reason"]
        calls = [c["function"]["name"] for c in message.get("tool_calls") or []]
    roles = [m["role"] for m in body["messages"]]
    return (f"  {exchange.status} stream={bool(body.get('stream'))} roles={roles} tools={tools} "
            f"tool_choice={body.get('tool_choice')} response_format={body.get('response_format')}\n"
            f"    -> finish_reason={finish} tool_calls={calls} content={content[:300]!r}")


def run_checks(api: OpenWebUIApi, proxy: RecordingProxy, chat_id: str, page_text: str) -> list[tuple[str, bool, str]]:
    chat = api.get(f"/api/v1/chats/{chat_id}")
    tags = [tag["name"] for tag in api.get(f"/api/v1/chats/{chat_id}/tags")]
    answer = assistant_message(chat) or {}
    exchanges = chat_completions(proxy)
    with_tools = [e for e in exchanges if e.request_json().get("tools")]
    called = [e for e in with_tools if "tool_calls" in e.response_body.decode(errors="replace")]
    # the tool's own output (Open WebUI ran the Python tool) went back to the model
    sent_back = [e for e in exchanges if any(m.get("role") == "tool" and TOOL_RESULT_MARK in str(m.get("content"))
                                             for m in e.request_json()["messages"])]
    follow_ups = answer.get("followUps") or []
    return [
        ("the chat request carried the tool in `tools`", bool(with_tools) and all(
            "get_weather" in [t["function"]["name"] for t in e.request_json()["tools"]] for e in with_tools),
         f"{len(with_tools)} request(s) with tools"),
        ("pagedserve answered with tool_calls for get_weather", bool(called), f"{len(called)} answer(s) with tool_calls"),
        ("Open WebUI ran the tool and sent its result back as a `tool` message", bool(sent_back),
         f"{len(sent_back)} request(s)"),
        ("the tool's result shows in the chat", TOOL_RESULT_MARK in page_text, "looked for " + repr(TOOL_RESULT_MARK)),
        ("the title came from the title task's JSON", chat["title"] not in ("New Chat", QUESTION, ""),
         f"title {chat['title']!r}"),
        ("the tags task's JSON gave the chat tags", bool(tags), f"tags {tags}"),
        ("the follow-up task's JSON gave follow-ups", bool(follow_ups), f"follow-ups {follow_ups}"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open-webui", required=True, type=lambda p: str(Path(p).resolve()),
                        help="the open-webui executable of its own venv")
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args()
    shots = args.screenshots or Path(tempfile.mkdtemp(prefix="openwebui-check-"))
    shots.mkdir(parents=True, exist_ok=True)
    server = ServerProcess([MODEL, "--api-key", API_KEY, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                            "--kv-cache-space", "0.3"])
    with ExitStack() as stack:
        stack.enter_context(server.running())
        proxy = stack.enter_context(RecordingProxy(server.base_url))
        url = stack.enter_context(open_webui(args.open_webui, proxy.base_url + "/v1", shots / "open-webui.log"))
        print(f"pagedserve {server.base_url}, recording proxy {proxy.base_url}, Open WebUI {url}", flush=True)
        api = OpenWebUIApi(url)
        api.add_weather_tool_and_preset()
        driver = stack.enter_context(chromium(shots / "profile"))
        chat_id = chat_in_browser(driver, url, shots)
        print(f"chat {chat_id} sent: {QUESTION!r}", flush=True)

        def settled() -> bool:
            chat = api.get(f"/api/v1/chats/{chat_id}")
            answer = assistant_message(chat)
            done = bool(answer and answer.get("done"))
            tasks = [e for e in chat_completions(proxy) if not e.request_json().get("stream")]
            return done and len(tasks) >= 3 and chat["title"] != "New Chat"

        try:
            wait_until(settled, what="the answer and the title, tags and follow-up tasks", timeout=ANSWER_SECONDS,
                       interval=2)
        except AssertionError as error:
            print(f"NOTE: {error}", flush=True)
        driver.save_screenshot(str(shots / "2-answer.png"))
        page_text = driver.execute_script("return document.body.innerText")
        print("requests Open WebUI sent to pagedserve:")
        for exchange in chat_completions(proxy):
            print(describe(exchange))
        checks = run_checks(api, proxy, chat_id, page_text)
        server.check_log()
    for what, passed, detail in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {what}  ({detail})")
    print(f"screenshots and Open WebUI's log in {shots}")
    failed = sum(not passed for _, passed, _ in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
