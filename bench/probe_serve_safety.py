"""Issue 27's server cases, tried against a running `llamascope serve` app: one row per case.

Runs on this checkout's code (before and after the fix alike: it imports whichever module
layout is there) with a tiny random Llama (hidden 64, 13 layers) and SmolLM2's tokenizer, a
loopback fake Hub (tests/fakehub.py) holding a release-layout SAE at ``someorg/somerepo``, and
synthetic SAE folders. Prints, per case, the status code, the error message (cut to 110
characters) and what else the case is about (Hub requests made, /health latency, memory).

    PYTHONPATH=. python bench/probe_serve_safety.py          # about a minute
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llamascope_sdk  # noqa: E402
from tests.fakehub import FakeHub, _patch_constants, set_offline  # noqa: E402
from tests.helpers import make_release, raw_tensors, release_hyperparams  # noqa: E402

# the sub-package layout, or main before the floor plan (decided by this checkout's files: an
# editable install elsewhere must not lend it modules)
NEW = (Path(llamascope_sdk.__file__).parent / "steering" / "pool.py").is_file()
if NEW:
    from llamascope_sdk.loading.models import resolve_model_path
    from llamascope_sdk.steering.pool import SaePool
else:
    from llamascope_sdk.models import resolve_model_path  # type: ignore[no-redef]
    from llamascope_sdk.pool import SaePool  # type: ignore[no-redef]
from llamascope_sdk.serve import Limits, ServeConfig, create_app  # noqa: E402
from llamascope_sdk.serve.runner import bind  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def row(case: str, r: httpx.Response | str, extra: str = "") -> None:
    if isinstance(r, str):
        ROWS.append((case, r, extra))
        return
    try:
        msg = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = "(ok)" if r.status_code == 200 else r.text[:110]
    ROWS.append((case, f"{r.status_code} {msg[:110]}", extra))


def tiny_model() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=13, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


class Served:
    """The app on 127.0.0.1 in a thread; config keys this checkout does not know are left out."""

    def __init__(self, model: Any, tok: Any, budget: int | str = "1GB", **cfg: Any) -> None:
        import uvicorn

        known = {f.name for f in dataclasses.fields(ServeConfig)}
        self.pool = SaePool(budget)
        cfg.setdefault("limits", Limits(max_edits=16, max_tokens=64, default_max_tokens=2))
        self.error: str | None = None
        try:
            self.app = create_app(model, tok, self.pool, ServeConfig(
                model_id="tiny", **{k: v for k, v in cfg.items() if k in known}))
        except Exception as exc:  # noqa: BLE001  (a refusal at start is a result)
            self.error = f"refused at start: {type(exc).__name__}: {exc}"
            return
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="critical"))
        threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                         daemon=True).start()
        while not self.server.started:
            time.sleep(0.02)

    def post(self, body: Any, path: str = "/v1/completions", **kw: Any) -> httpx.Response:
        if "content" not in kw and "data" not in kw and "files" not in kw:
            kw["json"] = body
        return httpx.post(self.url + path, timeout=600, **kw)

    def stop(self) -> None:
        if self.error is None:
            self.server.should_exit = True
            time.sleep(0.3)
            self.sock.close()


def edit(sae: str, feature: Any = 1, **kw: Any) -> dict[str, Any]:
    return {"prompt": "Hello", "max_tokens": 2,
            "steering": [{"sae": sae, "feature": feature, "value": 1.0, **kw}]}


def health_during(s: Served, send: Any, n: int = 1) -> tuple[list[httpx.Response], float]:
    """Responses of ``n`` concurrent ``send()`` and the slowest /health answer meanwhile."""
    out: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: out.append(send())) for _ in range(n)]
    for t in threads:
        t.start()
    worst = 0.0
    with httpx.Client(timeout=600) as client:  # one connection, as a monitor keeps
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            client.get(s.url + "/health")
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.02)
    return out, worst


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 1e6


def case_hub(model: Any, tok: Any, hub: FakeHub) -> None:
    s = Served(model, tok)
    hub.clear_log()
    row("1 Hub repo named in a steering edit, no key", s.post(edit("someorg/somerepo:L12R")),
        f"Hub requests: {len(hub.log)}")
    hub.clear_log()
    r = s.post({"sae": "someorg/somerepo:L12R", "text": "Hello"}, "/v1/encode")
    row("1 Hub repo named on /v1/encode", r, f"Hub requests: {len(hub.log)}")
    s.stop()


def case_sizes(model: Any, tok: Any) -> None:
    s = Served(model, tok)
    big = "word " * 2_000_000  # 10 MB
    before = rss_mb()
    (r,), worst = health_during(s, lambda: s.post({"prompt": big, "max_tokens": 1}))
    row("2 10 MB prompt", r, f"slowest /health {worst * 1000:.0f} ms; RSS +{rss_mb() - before:.0f} MB")
    top = "word " * 20_000  # 100,000 characters: the default limit after the fix
    rs, worst = health_during(s, lambda: s.post({"prompt": top, "max_tokens": 1}), n=3)
    row("2 three 100,000-character prompts at once", rs[0],
        f"slowest /health {worst * 1000:.0f} ms")
    first = rss_mb()
    for _ in range(10):
        s.post({"prompt": top, "max_tokens": 1})
    row("2 ten more 100,000-character prompts, one by one", "-",
        f"RSS {first:.0f} MB before, {rss_mb():.0f} MB after")
    s.stop()


def case_browser(model: Any, tok: Any) -> None:
    s = Served(model, tok)
    raw = json.dumps({"prompt": "Hello", "max_tokens": 1})
    row("3 text/plain body", s.post(None, content=raw, headers={"content-type": "text/plain"}))
    row("3 form body", s.post(None, data={"prompt": "Hello"}))
    row("3 multipart body", s.post(None, files={"prompt": ("p", b"Hello")}))
    row("3 Host: evil.example", s.post({"prompt": "Hello", "max_tokens": 1},
                                       headers={"host": "evil.example"}))
    row("3 Origin: http://evil.example", s.post({"prompt": "Hello", "max_tokens": 1},
                                                headers={"origin": "http://evil.example"}))
    pre = httpx.options(s.url + "/v1/completions", timeout=60, headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    row("3 CORS preflight from evil.example", pre,
        f"Access-Control-Allow-Origin: {pre.headers.get('access-control-allow-origin')}")
    s.stop()


def case_names(model: Any, tok: Any, folders: dict[str, str], mp: pytest.MonkeyPatch) -> None:
    for allow in ((), ("L*", "someorg/*")):
        s = Served(model, tok, allow_saes=allow)
        how = ", allowed with --allow-sae" if allow else ""
        if not allow:
            row("8 SAE '/etc' (exists)", s.post(edit("/etc")))
            row("8 SAE '/no/such/folder'", s.post(edit("/no/such/folder")))
            row("9 SAE name of 100,000 characters", s.post(edit("x" * 100_000)))
        row(f"9 missing Hub repo{how}", s.post(edit("someorg/missing")))
        set_offline(mp, True)
        row(f"9 uncached Llama Scope name, offline{how}", s.post(edit("L3R-8x")))
        set_offline(mp, False)
        s.stop()
    s = Served(model, tok, max_queue=0)
    row("10 ServeConfig(max_queue=0)", s.error or s.post({"prompt": "Hello", "max_tokens": 1}))
    s.stop()
    s = Served(model, tok, budget=300_000, served_saes=(folders["a"], folders["b"]))
    body = {"prompt": "Hello", "max_tokens": 2, "steering": [
        {"sae": folders[k], "feature": 1, "mode": "clamp", "value": 1.0} for k in "ab"]}
    r = s.post(body)
    row("11 two SAEs that never fit --sae-memory together", r,
        f"Retry-After: {r.headers.get('retry-after')}")
    s.stop()
    s = Served(model, tok, served_saes=(folders["a"],))
    row("also 20 features in one edit, max_edits 16", s.post(edit(folders["a"], list(range(20)))))
    row("also 200,000 features in one edit", s.post(edit(folders["a"], list(range(200_000)))))
    s.stop()


def case_cli() -> None:
    """``llamascope serve`` with the app and the listening replaced: what it would serve."""
    from typer.testing import CliRunner

    import llamascope_sdk.serve as serve
    from llamascope_sdk.cli import app

    seen: dict[str, Any] = {}
    real = serve.create_app, serve.run
    serve.create_app = lambda _m, _t, _p, config: seen.update(config=config)  # type: ignore[assignment]
    serve.run = lambda *_a, **_k: None  # type: ignore[assignment]
    try:
        for case, args in (("10 --max-queue 0", ["--max-queue", "0"]),
                           ("also --api-key ''", ["--api-key", ""])):
            seen.clear()
            r = CliRunner().invoke(app, ["serve", "--model", "smollm2-135m", *args])
            cfg = seen.get("config")
            got = (f"started: max_queue={cfg.max_queue}, api_key={cfg.api_key!r}" if cfg else
                   f"exit {r.exit_code}: {r.output.strip().splitlines()[-1][:100]}")
            row(case, got)
    finally:
        serve.create_app, serve.run = real


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="probe-serve-"))
    hub = FakeHub().start()
    hub.add_release("someorg/somerepo", "L12R", release_hyperparams(layer=12),
                    raw_tensors(64, 256, seed=1))
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("HF_HUB_CACHE", str(tmp / "hf-cache"))
    mp.setenv("LLAMASCOPE_CACHE", str(tmp / "llamascope-cache"))
    _patch_constants(mp, hub.url, tmp / "hf-cache")
    folders = {k: str(make_release(tmp / f"sae-{k}", layer=5, seed=i))
               for i, k in enumerate("ab")}
    model, tok = tiny_model()
    case_hub(model, tok, hub)
    case_browser(model, tok)
    case_names(model, tok, folders, mp)
    case_sizes(model, tok)
    case_cli()
    hub.stop()
    width = max(len(c) for c, _, _ in ROWS)
    for case, answer, extra in ROWS:
        print(f"{case:<{width}} | {answer} | {extra}".replace(str(tmp), "$TMP"))
    mp.undo()


if __name__ == "__main__":
    main()
