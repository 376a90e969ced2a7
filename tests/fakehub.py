"""A loopback fake Hugging Face Hub for download tests: the endpoints hf_hub_download uses.

Implements, as huggingface_hub 2.4 expects them (file_download.py, utils/_http.py):

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (git
  blob sha1 for small files, sha256 for LFS files), ``X-Linked-Etag``/``X-Linked-Size`` for
  LFS files, ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=N-`` gives 206 with
  ``Content-Range``.
* ``GET /api/models/{repo_id}/revision/{rev}``: repo info (sha, siblings).
* Errors with the Hub's ``X-Error-Code`` header: 404 RepoNotFound / RevisionNotFound /
  EntryNotFound, 401 GatedRepo.

Every request is logged (:attr:`FakeHub.log`, with the body bytes sent). Switches:
``cut_after[path_suffix] = n`` cuts the next GET of a matching file after n bytes (once;
``cut_always`` keeps cutting), ``corrupt`` serves flipped bytes under the right sha256,
``tamper[path_suffix] = data`` serves other content (its own length) under the original
ETag, ``etag_override[path_suffix] = '"abc"'`` announces an ETag that is no hash (for an LFS
file both ``ETag`` and ``X-Linked-Etag``), ``slow(chunk, delay)`` sends file bodies in
``chunk``-byte pieces with ``delay`` seconds between them, ``gated`` + ``token`` require
``Authorization: Bearer <token>``.

Use the ``fake_hub`` fixture (``from .fakehub import fake_hub_fixture`` in a test module): it
starts a server on 127.0.0.1:0, points HF_ENDPOINT/HF_HUB_CACHE/LLAMASCOPE_CACHE at it and
a temp folder (patching ``huggingface_hub.constants`` too, which reads them at import).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from safetensors.torch import save as save_safetensors

from .helpers import raw_tensors, release_hyperparams

LFS_SUFFIXES = (".safetensors",)


def _lm_config(d_model: int) -> bytes:
    return json.dumps({"model_name": "meta-llama/Llama-3.1-8B", "use_flash_attn": False,
                       "cache_dir": None, "d_model": d_model, "local_files_only": False}).encode()


def release_files(folder: str, hp: dict, tensors: dict, lm_config: bool = True) -> dict[str, bytes]:
    """The three files of one release folder, as {path in repo: bytes}."""
    files = {f"{folder}/hyperparams.json": json.dumps(hp, indent=4).encode(),
             f"{folder}/checkpoints/final.safetensors": save_safetensors(tensors)}
    if lm_config:
        files[f"{folder}/lm_config.json"] = _lm_config(hp["d_model"])
    return files


@dataclass
class Blob:
    """File content, in memory or on disk (for the 0.5 GB checkpoint)."""

    data: bytes | None = None
    path: Path | None = None
    _sha256: str | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size  # type: ignore[union-attr]

    def read(self, start: int = 0) -> io.BufferedIOBase:
        fh: Any = io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")  # type: ignore[arg-type]  # noqa: SIM115
        fh.seek(start)
        return fh

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            h = hashlib.sha256()
            with self.read() as fh:
                while chunk := fh.read(16 << 20):
                    h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % self.size + (self.data or b"")).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha -> {path: blob}
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    order: list[str] = field(default_factory=list)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass
class Request:
    method: str
    path: str
    status: int
    headers: dict[str, str]
    sent: int = 0  # body bytes written (updated while the body is sent)

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class FakeHub:
    """The server state plus its switches. ``url`` is the endpoint (http://127.0.0.1:port)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self.gated: set[str] = set()
        self.token: str | None = None
        self.cut_after: dict[str, int] = {}
        self.cut_always = False
        self.corrupt: set[str] = set()  # path suffixes served with flipped bytes
        self.tamper: dict[str, bytes] = {}  # path suffix -> content served under the original ETag
        self.etag_override: dict[str, str] = {}  # path suffix -> ETag header value as sent
        self.chunk_size = 8 << 20
        self.chunk_delay = 0.0
        self.lock = threading.Lock()
        self._n = 0
        self.server: ThreadingHTTPServer | None = None
        self.url = ""

    # ----------------------------------------------------------- content
    def commit(self, repo_id: str, files: dict[str, bytes | Path], *, delete_prefix: str | None = None,
               branch: str = "main", tag: str | None = None) -> str:
        """Add a commit on top of ``branch`` (like git: files carried over), return its sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        parent = repo.refs.get(branch)
        tree = dict(repo.commits[parent]) if parent else {}
        if delete_prefix:
            tree = {k: v for k, v in tree.items() if not k.startswith(delete_prefix)}
        for path, content in files.items():
            tree[path] = Blob(path=content) if isinstance(content, Path) else Blob(data=content)
        self._n += 1
        sha = hashlib.sha1(f"{repo_id}:{self._n}:{sorted(tree)}".encode()).hexdigest()
        repo.commits[sha] = tree
        repo.refs[branch] = sha
        repo.order.append(sha)
        if tag:
            repo.refs[tag] = sha
        return sha

    def add_release(self, repo_id: str, folder: str, hp: dict, tensors: dict, **kw: Any) -> str:
        return self.commit(repo_id, release_files(folder, hp, tensors), **kw)

    def slow(self, chunk: int = 4096, delay: float = 0.02) -> FakeHub:
        """Serve file bodies in ``chunk``-byte pieces, ``delay`` seconds apart."""
        self.chunk_size, self.chunk_delay = chunk, delay
        return self

    def served_bytes(self, suffix: str) -> int:
        """Body bytes sent for GETs of files ending in ``suffix``."""
        return sum(r.sent for r in self.requests(suffix, "GET"))

    # ----------------------------------------------------------- log helpers
    def requests(self, suffix: str = "", method: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.log if r.path.split("?")[0].endswith(suffix)
                    and (method is None or r.method == method)]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    # ----------------------------------------------------------- server
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # deliberately cut connections raise in the handler thread


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # ----------------------------------------------------------- helpers
    def _log(self, status: int) -> Request:
        req = Request(self.command, unquote(self.path), status,
                      {k.lower(): v for k, v in self.headers.items()})
        with self.fake.lock:
            self.fake.log.append(req)
        return req

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        self._log(status)
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _authorized(self, repo_id: str) -> bool:
        if repo_id not in self.fake.gated:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.fake.token}"

    def _serve(self, body: bool) -> None:
        path = unquote(self.path.split("?")[0])
        if m := _API.match(path):
            return self._api(m.group("repo"), m.group("rev") or "main")
        m = _RESOLVE.match(path)
        if m is None:
            return self._error(404, None, "Not Found")
        repo = self.fake.repos.get(m.group("repo"))
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._authorized(m.group("repo")):
            return self._error(401, "GatedRepo", "Access to model is restricted. You must have access "
                                                 "to it and be authenticated to access it.")
        commit = repo.resolve(m.group("rev"))
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + m.group("rev"))
        blob = repo.commits[commit].get(m.group("path"))
        if blob is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit=commit)
        self._file(blob, m.group("path"), commit, body)

    def _api(self, repo_id: str, rev: str) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
        info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                "gated": "manual" if repo_id in self.fake.gated else False,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])]}
        data = json.dumps(info).encode()
        self._log(200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.close_connection = True

    def _file(self, blob: Blob, path: str, commit: str, body: bool) -> None:
        announced = blob  # the ETag always names the committed content
        for suffix, data in self.fake.tamper.items():
            if path.endswith(suffix):
                blob = Blob(data=data)
        size = blob.size
        lfs = path.endswith(LFS_SUFFIXES)
        start = 0
        rng = self.headers.get("Range")
        if rng and body:
            m = re.match(r"bytes=(\d+)-$", rng.strip())
            if m is None:
                return self._error(416, None, "Range not satisfiable")
            start = int(m.group(1))
            if start >= size:
                return self._error(416, None, "Range not satisfiable")
        status = 206 if start else 200
        req = self._log(status)
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        etag = f'"{announced.sha256 if lfs else announced.git_sha1}"'
        for suffix, value in self.fake.etag_override.items():
            if path.endswith(suffix):
                etag = value
        self.send_header("ETag", etag)
        if lfs:
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if not body:
            return
        cut = None
        with self.fake.lock:
            for suffix, n in list(self.fake.cut_after.items()):
                if path.endswith(suffix):
                    cut = n
                    if not self.fake.cut_always:
                        del self.fake.cut_after[suffix]
        corrupt = any(path.endswith(s) for s in self.fake.corrupt)
        sent = 0
        budget = (size - start) if cut is None else max(0, cut - (start if self.fake.cut_always else 0))
        budget = min(budget, size - start)
        with blob.read(start) as fh:
            while sent < budget:
                chunk = fh.read(min(self.fake.chunk_size, budget - sent))
                if not chunk:
                    break
                if corrupt and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                if sent and self.fake.chunk_delay:
                    time.sleep(self.fake.chunk_delay)
                try:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                req.sent = sent
        if cut is not None:  # hang up mid-body: the client sees an incomplete message
            self.wfile.flush()
            self.connection.shutdown(2)


def _patch_constants(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    from huggingface_hub import constants, file_download
    from huggingface_hub.utils import _http as hf_http

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # http_get sleeps 1 s before each resume; tests need not wait.
    fast_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fast_time.sleep = lambda _s: None
    monkeypatch.setattr(file_download, "time", fast_time)
    monkeypatch.setattr(hf_http, "time", fast_time)  # and the HEAD retry backoff (1+2+4+8+8 s)


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """HF_HUB_OFFLINE as a user sets it, plus the constant huggingface_hub read at import."""
    from huggingface_hub import constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


# Layout of the default fake Hub (small synthetic SAEs, d_model 64, d_sae 256):
#   OpenMOSS-Team/...LXR-8x : commit OLD (tag "v0", folder Llama3_1Base-L12R-8x, seed 1)
#                             commit NEW (main, "Rename folders", Llama3_1-8B-Base-L12R-8x, seed 0)
#   fnlp/...LXM-32x         : only under the old org (org fallback), L12M-32x
#   OpenMOSS-Team/...LXA-8x : main still has the old folder spelling (folder fallback), L3A-8x
#   OpenMOSS-Team/...LXTC-8x: gated, L5TC-8x
D_MODEL, D_SAE = 64, 256


@dataclass
class HubData:
    hub: FakeHub
    hp: dict[str, dict]  # key -> hyperparams dict
    raw: dict[str, dict]  # key -> tensors
    commits: dict[str, str]


def populate(hub: FakeHub) -> HubData:
    hp: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    commits: dict[str, str] = {}
    hp["L12R-8x"] = release_hyperparams(layer=12, position="R", d_model=D_MODEL, d_sae=D_SAE)
    raw["L12R-8x@old"] = raw_tensors(D_MODEL, D_SAE, seed=1)
    raw["L12R-8x"] = raw_tensors(D_MODEL, D_SAE, seed=0)
    repo = "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x"
    commits["R-old"] = hub.add_release(repo, "Llama3_1Base-L12R-8x", hp["L12R-8x"], raw["L12R-8x@old"],
                                       tag="v0")
    commits["R-new"] = hub.add_release(repo, "Llama3_1-8B-Base-L12R-8x", hp["L12R-8x"], raw["L12R-8x"],
                                       delete_prefix="Llama3_1Base-")
    hp["L12M-32x"] = release_hyperparams(layer=12, position="M", d_model=D_MODEL, d_sae=D_SAE,
                                         norm_in=3.96875, expansion=32)
    raw["L12M-32x"] = raw_tensors(D_MODEL, D_SAE, seed=2)
    commits["M32"] = hub.add_release("fnlp/Llama3_1-8B-Base-LXM-32x", "Llama3_1-8B-Base-L12M-32x",
                                     hp["L12M-32x"], raw["L12M-32x"])
    hp["L3A-8x"] = release_hyperparams(layer=3, position="A", d_model=D_MODEL, d_sae=D_SAE, norm_in=1.14844)
    raw["L3A-8x"] = raw_tensors(D_MODEL, D_SAE, seed=3)
    commits["A"] = hub.add_release("OpenMOSS-Team/Llama3_1-8B-Base-LXA-8x", "Llama3_1Base-L3A-8x",
                                   hp["L3A-8x"], raw["L3A-8x"])
    hp["L5TC-8x"] = release_hyperparams(layer=5, position="TC", d_model=D_MODEL, d_sae=D_SAE, norm_in=64.0)
    raw["L5TC-8x"] = raw_tensors(D_MODEL, D_SAE, seed=4)
    commits["TC"] = hub.add_release("OpenMOSS-Team/Llama3_1-8B-Base-LXTC-8x", "Llama3_1-8B-Base-L5TC-8x",
                                    hp["L5TC-8x"], raw["L5TC-8x"])
    hub.gated.add("OpenMOSS-Team/Llama3_1-8B-Base-LXTC-8x")
    hub.token = "hf_fake_token_123"
    return HubData(hub, hp, raw, commits)


def main_checkpoint(hub: FakeHub, repo_id: str = "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x",
                    folder: str = "Llama3_1-8B-Base-L12R-8x") -> tuple[Blob, Path]:
    """(the checkpoint blob served at main, the HF cache's blobs folder of that repo, created)."""
    import os

    repo = hub.repos[repo_id]
    blob = repo.commits[repo.refs["main"]][f"{folder}/checkpoints/final.safetensors"]
    blobs = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    return blob, blobs


@pytest.fixture(name="fake_hub")
def fake_hub_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A running, populated :class:`FakeHub` with HF_* env pointing at it; yields HubData."""
    hub = FakeHub().start()
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("LLAMASCOPE_CACHE", str(tmp_path / "llamascope-cache"))
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(key, raising=False)
    _patch_constants(monkeypatch, hub.url, cache)
    try:
        yield populate(hub)
    finally:
        hub.stop()
