"""A tiny fake Hugging Face Hub for tests: a real HTTP server on 127.0.0.1.

It speaks the part of the Hub's HTTP API that huggingface_hub 2.4 uses for
- `list_models`: GET /api/models with query params author, search, filter (repeatable, all must
  match the model's tags), limit, and pagination through a GitHub-style `Link: <...>; rel="next"`
  header (huggingface_hub.utils._pagination follows it);
- `hf_hub_download`: HEAD and GET /{repo_id}/resolve/{revision}/{filename}, answering with the
  X-Repo-Commit and ETag headers the client needs to place the file in its cache, and the
  X-Error-Code header (RepoNotFound / EntryNotFound) it maps 404s with;
- `create_repo` + `upload_folder`: POST /api/repos/create, POST /api/validate-yaml (a README's
  metadata), POST /api/models/{repo_id}/preupload/{revision}
  and POST /api/models/{repo_id}/commit/{revision} (NDJSON: a header line, then one line per file with
  base64 content). Preupload answers "regular" for every file, so the client sends contents inline in
  the commit; the real Hub sends large files to LFS/Xet storage instead, which this server does not
  speak. A committed file must have been announced by a preupload with its size and first 512 bytes
  (what the client sends), or the commit is refused. Committed files become downloadable like the
  others. `reject_writes=True` answers 403 to writes, as the Hub does for a token without write access.

Use: `with FakeHub(models) as hub: ... hub.url ...`; `hub.requests` records (method, path, query);
`hub.authorizations` the Authorization header of every write.
"""
from __future__ import annotations

import base64
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
    def __init__(self, models: list[FakeModel], page_size: int = 1000, reject_writes: bool = False):
        self.models = {m.id: m for m in models}
        self.reject_writes = reject_writes
        self.commits: list[dict] = []   # {"repo", "summary", "files"} per accepted commit
        self.announced: dict[tuple[str, str], dict] = {}   # (repo, path) -> its preupload entry (size, sample)
        self.authorizations: list[str | None] = []         # the Authorization header of every POST
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

    def write(self, path: str, body: bytes) -> tuple[int, dict]:
        """The answer (status, JSON) to an upload request."""
        if self.reject_writes:
            return 403, {"error": "You don't have the rights to create a model under this namespace"}
        if path == "/api/validate-yaml":   # the client checks a README's metadata before committing it
            content = json.loads(body).get("content", "")
            if content.startswith("---") and "\n---" not in content[3:]:
                return 400, {"errors": [{"message": "unterminated YAML metadata block"}]}
            return 200, {"errors": [], "warnings": []}
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else f"me/{req['name']}"
            if repo_id in self.models:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.models[repo_id] = FakeModel(repo_id, tags=[])
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        segs = path.strip("/").split("/")   # api models {owner} {name} preupload|commit {revision}
        if len(segs) != 6 or segs[:2] != ["api", "models"] or segs[4] not in ("preupload", "commit"):
            return 404, {"error": "not found"}
        model = self.models.get(f"{segs[2]}/{segs[3]}")
        if model is None:
            return 404, {"error": "Repository not found"}
        if segs[4] == "preupload":
            files = json.loads(body)["files"]
            for f in files:
                self.announced[(model.id, f["path"])] = f
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        added = {}
        for item in lines:
            if item["key"] == "file":
                value = item["value"]
                if value.get("encoding") != "base64":
                    return 400, {"error": f"{value['path']}: only base64 content is accepted"}
                content = base64.b64decode(value["content"])
                announced = self.announced.get((model.id, value["path"]))
                if announced is None or announced["size"] != len(content) or \
                        base64.b64decode(announced["sample"]) != content[:512]:
                    return 400, {"error": f"{value['path']}: not what its preupload announced"}
                added[value["path"]] = content
            elif item["key"] != "header":
                return 400, {"error": f"this fake Hub only accepts inline files, not {item['key']}"}
        model.files.update(added)
        self.commits.append({"repo": model.id, "summary": header.get("summary"), "files": sorted(added)})
        return 200, {"commitUrl": f"{self.url}/{model.id}/commit/{model.commit}", "commitOid": model.commit}

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

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", path, {}))
                hub.authorizations.append(self.headers.get("Authorization"))
                status, answer = hub.write(path, body)
                self._send(status, json.dumps(answer).encode(), {"Content-Type": "application/json"})

            do_GET = do_HEAD = _route

        return Handler
