"""A tiny fake Hugging Face Hub for tests: a real HTTP server on 127.0.0.1.

It speaks the part of the Hub's HTTP API that huggingface_hub 2.4 uses for
- `list_models`: GET /api/models with query params author, search, filter (repeatable, all must
  match the model's tags), limit, and pagination through a GitHub-style `Link: <...>; rel="next"`
  header (huggingface_hub.utils._pagination follows it);
- `hf_hub_download`: HEAD and GET /{repo_id}/resolve/{revision}/{filename}, answering with the
  X-Repo-Commit and ETag headers the client needs to place the file in its cache, and the
  X-Error-Code header (RepoNotFound / EntryNotFound) it maps 404s with.

Use: `with FakeHub(models) as hub: ... hub.url ...`; `hub.requests` records (method, path, query).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit


@dataclass
class FakeModel:
    id: str  # "owner/name"
    tags: list[str] = field(default_factory=lambda: ["timm", "image-classification"])
    files: dict[str, bytes] = field(default_factory=dict)  # filename -> content

    @property
    def commit(self) -> str:
        # any 40-hex string will do; derived from the id so it is stable
        return hashlib.sha1(self.id.encode()).hexdigest()

    def api_item(self) -> dict:
        """What /api/models returns per model (the Hub's default fields)."""
        owner = self.id.split("/")[0]
        return {
            "_id": self.commit[:24], "id": self.id, "author": owner, "tags": self.tags,
            "library_name": "timm", "pipeline_tag": "image-classification", "private": False,
            "downloads": 0, "likes": 0, "createdAt": "2024-01-01T00:00:00.000Z",
        }


class FakeHub:
    def __init__(self, models: list[FakeModel], page_size: int = 1000):
        self.models = {m.id: m for m in models}
        self.page_size = page_size  # the real Hub pages by 1000; tests use less to exercise paging
        self.requests: list[tuple[str, str, dict]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- answers --------------------------------------------------------------------------------
    def list_models(self, query: dict[str, list[str]]) -> tuple[list[dict], str | None]:
        hits = list(self.models.values())
        if "author" in query:
            hits = [m for m in hits if m.id.split("/")[0] == query["author"][0]]
        if "search" in query:
            needle = query["search"][0].lower()
            hits = [m for m in hits if needle in m.id.lower()]
        for tag in query.get("filter", []):
            hits = [m for m in hits if tag in m.tags]
        hits.sort(key=lambda m: m.id)
        start = int(query.get("cursor", ["0"])[0])
        size = min(int(query.get("limit", [self.page_size])[0]), self.page_size)
        page = hits[start:start + size]
        next_link = None
        if start + size < len(hits):
            next_query = {k: v for k, v in query.items() if k != "cursor"}
            next_query["cursor"] = [str(start + size)]
            next_link = f"{self.url}/api/models?{urlencode(next_query, doseq=True)}"
        return [m.api_item() for m in page], next_link

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                hub.requests.append((self.command, parts.path, query))
                if parts.path == "/api/models" and self.command == "GET":
                    items, next_link = hub.list_models(query)
                    headers = {"Content-Type": "application/json"}
                    if next_link:
                        headers["Link"] = f'<{next_link}>; rel="next"'
                    return self._send(200, json.dumps(items).encode(), headers)
                # /{owner}/{name}/resolve/{revision}/{filename}
                segs = parts.path.strip("/").split("/")
                if len(segs) >= 5 and segs[2] == "resolve":
                    model = hub.models.get(f"{segs[0]}/{segs[1]}")
                    if model is None:
                        return self._send(404, b"Repository not found", {"X-Error-Code": "RepoNotFound"})
                    filename = "/".join(segs[4:])
                    if filename not in model.files:
                        return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                                    "X-Repo-Commit": model.commit})
                    body = model.files[filename]
                    return self._send(200, body, {
                        "X-Repo-Commit": model.commit,
                        "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    })
                return self._send(404, b"Not found")

            do_GET = do_HEAD = _route

        return Handler
