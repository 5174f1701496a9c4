"""The server the web chat and terminal chat tests talk to (one per test session, see conftest.py)."""
from __future__ import annotations

from tests.server_process import ServerProcess

API_KEY = "chat-test-key"
MODEL_NAMES = ("smollm2", "smollm2-copy")


def start_chat_server() -> ServerProcess:
    return ServerProcess(["smollm2-135m-instruct", "--served-model-name", *MODEL_NAMES, "--api-key", API_KEY,
                          "--kv-cache-space", "0.25", "--max-model-len", "4096"]).start()
