"""`llamascope serve` is safe to leave running: API key (401), one-line 400s naming the field,
404 for unknown SAEs, 429 with Retry-After when the queue is full, a disconnecting client frees
its row, SIGTERM drains, local folders (pickles included) are not loaded on request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_helpers import KEY, MODEL_ID, running_server, scheduler_paused, wait_for

pytestmark = pytest.mark.smollm
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    model, tok = smollm2
    with running_server(model, tok, tmp_path_factory.mktemp("safety") / "L5R") as s:
        yield s


def _post(served, body, path: str = "/v1/completions", headers=None, raw: bytes | None = None):
    headers = AUTH if headers is None else headers
    if raw is not None:
        headers = {**headers, "content-type": "application/json"}
    return httpx.post(f"{served.url}{path}", timeout=300, headers=headers,
                      **({"content": raw} if raw is not None else {"json": body}))


def _error(r: httpx.Response, status: int, param: str | None, *fragments: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert "\n" not in err["message"]
    for f in fragments:
        assert f in err["message"], err["message"]
    return err["message"]


def _body(**kw):
    return {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2, **kw}


def test_api_key_is_required_and_compared(served) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = _post(served, _body(), headers=headers)
        _error(r, 401, None, "missing or wrong API key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{served.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200
    assert _post(served, _body()).status_code == 200
    import inspect

    from llamascope_sdk.serve import security

    assert "hmac.compare_digest" in inspect.getsource(security.GuardPolicy._key_ok)  # constant time


@pytest.mark.parametrize(("edit", "param", "fragments"), [
    ({"sae": "demo", "feature": 1, "mode": "boost", "value": 1}, "steering[0].mode",
     ["unknown mode 'boost'", "add, clamp, scale, ablate"]),
    ({"sae": "demo", "feature": 4608, "value": 1}, "steering[0].feature",
     ["feature index 4608 is out of range", "0..4607"]),
    ({"sae": "demo", "feature": 1.5, "value": 1}, "steering[0].feature",
     ["must be an integer"]),
    ({"sae": "demo", "feature": True, "value": 1}, "steering[0].feature", ["must be an integer"]),
    ({"sae": "demo", "feature": 1, "value": "big"}, "steering[0].value", ["must be a number"]),
    ({"sae": "demo", "feature": 1, "strength": 3}, "steering[0].strength",
     ["unknown field 'strength'"]),
    ({"sae": "demo", "feature": 1, "value": 1, "positions": "middle"}, "steering[0].positions",
     ["'middle' is not allowed", "prompt, generated, all"]),
])
def test_bad_edits_get_400_naming_the_field(served, edit, param, fragments) -> None:
    _error(_post(served, _body(steering=[edit])), 400, param, *fragments)


def test_non_finite_value_gets_400(served) -> None:
    for v in ("NaN", "Infinity", "-Infinity"):
        raw = ('{"prompt": "Hi", "max_tokens": 2, "steering": [{"sae": "demo", "feature": 1, '
               f'"value": {v}}}]}}').encode()
        _error(_post(served, None, raw=raw), 400, "steering[0].value", "must be finite")


def test_too_many_edits_window_and_malformed_json(served) -> None:
    nine = [{"sae": "demo", "feature": i, "value": 1.0} for i in range(9)]
    _error(_post(served, _body(steering=nine)), 400, "steering", "9 edits", "limit of 8")
    long = "word " * 8200
    _error(_post(served, _body(prompt=long, max_tokens=100)), 400, "max_tokens",
           "more than the model's window of 8192 positions")
    _error(_post(served, None, raw=b'{"prompt": "Hi",'), 400, None, "not valid JSON")
    _error(_post(served, None, raw=b'[1, 2]'), 400, None, "must be a JSON object")
    _error(_post(served, _body(max_tokens=10**6)), 400, "max_tokens", "between 1 and 256")
    _error(_post(served, _body(n=0)), 400, "n", "n must be between 1 and 128")
    _error(_post(served, None, raw=b'{"prompt": "Hi", "temperature": NaN}'), 400,
           "temperature", "finite number")
    _error(_post(served, {"model": MODEL_ID, "messages": []}, "/v1/chat/completions"), 400,
           "messages", "non-empty list")
    _error(_post(served, _body(model="gpt-4")), 404, "model", "'gpt-4' is not served")


def test_unknown_sae_404_and_local_folders_refused(served, tmp_path: Path) -> None:
    msg = _error(_post(served, _body(steering=[{"sae": "L99R-8x", "feature": 1, "value": 1}])),
                 404, "steering[0].sae", "'L99R-8x' is not served here")
    assert "--allow-sae" in msg
    # a folder holding a pickle, named in a request: never read
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "cfg.json").write_text("{}")
    (folder / "sae_weights.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle
    msg = _error(_post(served, _body(steering=[{"sae": str(folder), "feature": 1, "value": 1}])),
                 404, "steering[0].sae", "is not served here")
    assert "--allow-sae-dir" in msg
    assert all(str(folder) not in k for k in served.pool.loaded())


def test_full_queue_gets_429_with_retry_after(served) -> None:
    sched = served.scheduler
    old = sched.max_queue
    sched.max_queue = 1
    try:
        with scheduler_paused(sched):
            t = threading.Thread(target=lambda: _post(served, _body()))
            t.start()
            wait_for(lambda: sched.load["waiting"] == 1)
            r = _post(served, _body())
            _error(r, 429, None, "queue is full")
            assert r.headers["retry-after"] == "1"
        t.join(timeout=300)
    finally:
        sched.max_queue = old


def test_client_disconnect_frees_its_row(served) -> None:
    sched = served.scheduler
    before = sched.steps
    with httpx.Client(timeout=300) as c, c.stream(
            "POST", f"{served.url}/v1/completions", headers=AUTH,
            json=_body(max_tokens=200, stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: sched.load["rows"] == 1)
    wait_for(lambda: sched.load["rows"] == 0, timeout=30)
    assert sched.steps - before < 150  # it stopped long before its 200 tokens


@pytest.mark.slow
def test_sigterm_finishes_running_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-m", "llamascope_sdk", "serve", "--model",
                             "smollm2-135m", "--port", "0", "--max-tokens", "64"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "listening on" in line:
                url = line.split("listening on ")[1].strip()
        assert url, "the server did not start"
        assert url.startswith("http://127.0.0.1:")
        out: dict = {}

        def slow() -> None:
            out["r"] = httpx.post(f"{url}/v1/completions", timeout=300,
                                  json={"prompt": "Once upon a time", "max_tokens": 40})

        t = threading.Thread(target=slow)
        t.start()
        wait_for(lambda: httpx.get(f"{url}/health", timeout=30).json()["rows"] == 1, timeout=120)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{url}/v1/completions", json={"prompt": "Hi"}, timeout=30)
        t.join(timeout=300)
        r = out["r"]
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
        # uvicorn re-raises the signal once drained, so the exit status is SIGTERM's own
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _holds(served) -> int:
    return sum(served.pool._held.values())


def test_client_timeout_on_non_streamed_request_frees_its_row_and_holds(served) -> None:
    sched = served.scheduler
    # clamp needs the SAE's encoder, so the pool holds the SAE for the request
    body = _body(max_tokens=256, steering=[{"sae": served.layer5, "feature": 3, "mode": "clamp",
                                            "value": 2.0}])
    before = sched.steps
    full = _post(served, body)  # the same request, let finish: how long it runs
    assert full.status_code == 200, full.text
    assert full.json()["usage"]["completion_tokens"] == 256
    full_steps = sched.steps - before
    assert full_steps >= 256 and _holds(served) == 0

    before = sched.steps
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s
        httpx.post(f"{served.url}/v1/completions", headers=AUTH, json=body,
                   timeout=httpx.Timeout(30, read=1.0))
    wait_for(lambda: httpx.get(f"{served.url}/health", timeout=30).json()["running"] == 0,
             timeout=10)
    freed_after = time.monotonic() - t0
    assert sched.load == {"running": 0, "waiting": 0, "rows": 0}
    assert _holds(served) == 0
    used = sched.steps - before
    assert used < full_steps / 2, (used, full_steps, freed_after)


def test_streamed_client_gone_while_queued_releases_holds(served) -> None:
    sched = served.scheduler
    body = _body(max_tokens=64, stream=True,
                 steering=[{"sae": served.layer5, "feature": 3, "mode": "clamp", "value": 2.0}])
    before = sched.steps
    with scheduler_paused(sched):
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{served.url}/v1/completions",
                                                     headers=AUTH, json=body) as r:
            # the first chunk, then hang up (when the block ends: the line iterator is kept, as
            # a discarded one closes the connection at once, racing the checks below)
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert (sched.load["waiting"], _holds(served)) == (1, 1)
        wait_for(lambda: sched.load["waiting"] == 0 and _holds(served) == 0, timeout=10)
    wait_for(lambda: sched.load["rows"] == 0, timeout=30)
    assert sched.steps - before < 64  # never generated its 64 tokens


def test_stream_that_never_starts_still_cleans_up() -> None:
    """The client leaves before the body starts: the body generator never runs (so its
    ``finally`` cannot release), yet the response's cleanup does."""
    import asyncio

    from llamascope_sdk.serve.app import _Stream

    ran, cleaned = [], []

    async def body():
        ran.append(1)
        yield "data: x\n\n"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(_message):
        await asyncio.sleep(30)  # a client that never takes the headers

    async def main() -> None:
        resp = _Stream(body(), lambda: cleaned.append(1))
        await asyncio.wait_for(resp({"type": "http", "asgi": {"spec_version": "2.3"}},
                                    receive, send), timeout=10)

    asyncio.run(main())
    assert cleaned == [1] and ran == []
