"""A loopback server that answers the Hugging Face hub's HTTP API as the real `huggingface_hub` client calls it:
model info with file metadata (/api/models/REPO/revision/REV?blobs=true), and file HEAD/GET at
/REPO/resolve/REV/PATH with the hub's headers (X-Repo-Commit, ETag or X-Linked-Etag/X-Linked-Size for LFS
files) and Range requests. Faults on demand: a transfer cut short once (the client must resume), bytes
corrupted in transit (the checksum must catch it), a token required. Every request is recorded.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)    # repo id -> path -> content
    token: str | None = None                 # when set, requests must carry "Authorization: Bearer TOKEN"
    cut_once: set[str] = field(default_factory=set)     # paths whose first GET stops halfway
    corrupt: set[str] = field(default_factory=set)      # paths served with one byte changed
    requests: list[Request] = field(default_factory=list)

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def downloads(self) -> list[str]:
        """The file paths GET was asked for, in order."""
        return [unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1]) for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path]

    def start(self) -> FakeHub:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:   # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = urlparse(self.path).path
            hub.requests.append(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._json(401, {"error": "Invalid credentials in Authorization header"}, send_body)
            if match := _INFO.match(path):
                return self._info(match["repo"], send_body)
            if match := _RESOLVE.match(path):
                return self._file(match["repo"], unquote(match["path"]), send_body)
            self._json(404, {"error": "not found"}, send_body)

        def _info(self, repo_id: str, send_body: bool) -> None:
            files = hub.repos.get(repo_id)
            if files is None:
                return self._json(404, {"error": "Repository not found"}, send_body, {"X-Error-Code": "RepoNotFound"})
            siblings = []
            for name, content in sorted(files.items()):
                sibling = {"rfilename": name, "size": len(content), "blobId": git_blob_id(content)}
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content),
                                      "pointerSize": 134}
                siblings.append(sibling)
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": hub.commit(repo_id), "private": False,
                             "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}, send_body)

        def _file(self, repo_id: str, name: str, send_body: bool) -> None:
            content = hub.repos.get(repo_id, {}).get(name)
            if content is None:
                return self._json(404, {"error": "Entry not found"}, send_body, {"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": hub.commit(repo_id), "Accept-Ranges": "bytes"}
            if name.endswith(LFS_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{hashlib.sha256(content).hexdigest()}"',
                                "X-Linked-Size": str(len(content)), "ETag": f'"{git_blob_id(content)}"'})
            else:
                headers["ETag"] = f'"{git_blob_id(content)}"'
            if send_body and name in hub.corrupt:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            start = 0
            if send_body and (ranged := re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))):
                start = int(ranged[1])
            body = content[start:]
            self.send_response(206 if start else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.end_headers()
            if not send_body:
                return
            if name in hub.cut_once:
                hub.cut_once.discard(name)
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def _json(self, status: int, payload: dict, send_body: bool, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    return Handler
