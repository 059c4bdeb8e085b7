"""A loopback stand-in for the Hugging Face Hub's download API, enough for huggingface_hub 2.x.

What ``snapshot_download`` / ``hf_hub_download`` call (read from huggingface_hub's source):

* ``GET  /api/models/{repo}[/revision/{rev}]``: repo info with ``siblings`` (the file list); ``sha`` is
  the commit the files are fetched at.
* ``GET  /api/models/{repo}/tree/{rev}?recursive=...``: the file list (``type``, ``path``, ``size``,
  ``oid``, ``lfs``); one page, so no ``Link`` header.
* ``HEAD /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (sha256 for LFS files, as the Hub)
  and ``Content-Length``.
* ``GET  /{repo}/resolve/{rev}/{file}``: the bytes; ``Range: bytes=N-`` answers ``206`` with the rest.

Errors carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), which is how huggingface_hub picks its exception class.
``cut_once`` makes the first full download of a file stop half-way and drop the connection;
``failing`` closes the connection without an answer for a file (the network going away).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/?]+)")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated_token: str | None = None  # when set, files need "Authorization: Bearer <token>"

    @classmethod
    def from_directory(cls, directory: Path, **kwargs) -> Repo:
        return cls({p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}, **kwargs)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)  # file names whose first full GET stops half-way
    failing: set[str] = field(default_factory=set)  # file names whose requests get no answer (connection closed)
    requests: list[Request] = field(default_factory=list)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, name: str) -> list[Request]:
        """The GET requests for file ``name`` (resolve endpoint)."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + name)]

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append(Request(method, path, h.headers.get("Range"), h.headers.get("Authorization")))
        if m := _INFO.match(path):
            repo = self._repo(h, m["repo"], m["rev"] or "main")
            if repo is not None:
                siblings = [{"rfilename": name} for name in repo.files]
                gated = "manual" if repo.gated_token else False
                info = {"id": m["repo"], "sha": repo.commit, "siblings": siblings, "private": False, "gated": gated}
                self._json(h, info)
        elif m := _TREE.match(path):
            repo = self._repo(h, m["repo"], m["rev"])
            if repo is not None:
                self._json(h, [self._entry(name, data) for name, data in repo.files.items()])
        elif m := _RESOLVE.match(path):
            self._file(h, method, m["repo"], m["rev"], m["file"])
        else:
            self._error(h, 404, "EntryNotFound", "unknown endpoint")

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found")
        elif rev not in ("main", repo.commit):
            self._error(h, 404, "RevisionNotFound", "Invalid rev id")
        else:
            return repo
        return None

    @staticmethod
    def _entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if name.endswith((".safetensors", ".bin")):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, h: BaseHTTPRequestHandler, method: str, repo_id: str, rev: str, name: str) -> None:
        repo = self._repo(h, repo_id, rev)
        if repo is None:
            return
        if repo.gated_token and h.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            self._error(h, 401, "GatedRepo", "Access to this model is restricted; you must be authenticated")
            return
        if name not in repo.files:
            self._error(h, 404, "EntryNotFound", "Entry not found", commit=repo.commit)
            return
        if name in self.failing:  # the network goes away: the connection closes without an answer
            h.close_connection = True
            return
        data = repo.files[name]
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
        start = 0
        if method == "GET" and (wanted := h.headers.get("Range")):
            start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        cut = method == "GET" and not start and name in self.cut_once
        if cut:
            h.send_header("Connection", "close")
        h.end_headers()
        if method == "HEAD":
            return
        if cut:
            self.cut_once.discard(name)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, document: object) -> None:
        body = json.dumps(document).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
