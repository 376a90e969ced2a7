"""Issue 27, items 1, 7 and 8 (the server's side): a request loads only what the operator allowed,
learns nothing about the host, and gets 4xx naming its field for what it got wrong.

A name outside the allow-list is refused before any download or file-system access, with the
same answer whether it exists or not; an allowed SAE that cannot be had is one 404 without cache
paths or endpoint URLs (the server's log keeps them); a request whose SAEs can never fit the SAE
memory gets a 400 naming the limit, not a 429 its client would retry forever.
"""

from __future__ import annotations

import logging
import os

import pytest

from llamascope_sdk.loading.demo import DEMO_ALIASES
from llamascope_sdk.serve import Limits
from llamascope_sdk.steering.pool import sae_bytes
from tests.fakehub import fake_hub_fixture, set_offline  # noqa: F401  (fixture)
from tests.helpers import make_release, raw_tensors, release_hyperparams
from tests.serve_tiny import error, smollm2_tokenizer, tiny_model, tiny_server

NOT_SERVED = ("{p}: SAE {n!r} is not served here (this server serves the SAEs its operator named "
              "with --sae, --allow-sae or --allow-sae-dir)")
NOT_AVAILABLE = "{p}: SAE {n!r} is not available on this server (the server log says why)"


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok), layers=2)


def _edit(sae: str, feature=1, mode: str = "add", **kw) -> dict:
    e = {"sae": sae, "feature": feature, "mode": mode, **kw}
    if mode != "ablate":
        e.setdefault("value", 1.0)
    return {"prompt": "Hello", "max_tokens": 1, "steering": [e]}


def _accesses(monkeypatch) -> list[str]:
    """Paths the process stats or opens from now on (os.stat covers exists/is_dir/is_file)."""
    seen: list[str] = []
    real_stat, real_open = os.stat, os.open

    def stat(path, *a, **k):
        seen.append(str(path))
        return real_stat(path, *a, **k)

    def open_(path, *a, **k):
        seen.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "open", open_)
    return seen


def test_names_not_allowed_get_one_404_before_any_lookup(model, tok, fake_hub, tmp_path,
                                                         monkeypatch) -> None:
    hub = fake_hub.hub
    hub.add_release("someorg/somerepo", "L1R", release_hyperparams(layer=1), raw_tensors(64, 256))
    (tmp_path / "exists").mkdir()
    with tiny_server(model, tok) as s:
        hub.clear_log()
        seen = _accesses(monkeypatch)
        names = ["someorg/somerepo:L1R", "L12R-8x", "demo", "/etc", "/etc/passwd",
                 str(tmp_path / "exists"), str(tmp_path / "missing"), "~/.ssh", "../x"]
        for name in names:
            error(s.post(_edit(name)), 404, "steering[0].sae",
                  NOT_SERVED.format(p="steering[0].sae", n=name))
            error(s.post({"sae": name, "text": "Hi"}, "/v1/encode"), 404, "sae",
                  NOT_SERVED.format(p="sae", n=name))
        monkeypatch.undo()
    assert hub.log == []  # nothing downloaded, nothing even asked
    assert not [p for p in seen if p.startswith(("/etc", str(tmp_path), "~"))], seen
    assert s.pool.loaded() == []


def test_malformed_names_get_400(model, tok) -> None:
    with tiny_server(model, tok) as s:
        error(s.post(_edit("x" * 100_000)), 400, "steering[0].sae",
              "steering[0].sae: the SAE name has 100000 characters; at most 1024 are allowed")
        error(s.post({"sae": "a\x00b", "text": "Hi"}, "/v1/encode"), 400, "sae",
              "sae: the SAE name holds a control character")


def test_allowed_folders_only_inside_and_never_through_a_symlink(model, tok, tmp_path) -> None:
    root = tmp_path / "saes"
    inside = make_release(root / "L1R", layer=1, seed=3)
    outside = make_release(tmp_path / "elsewhere", layer=1, seed=4)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with tiny_server(model, tok, allow_sae_dirs=(str(root),)) as s:
        r = s.post(_edit(str(inside), mode="clamp"))
        assert r.status_code == 200, r.text
        for name in (str(outside), str(root / "link"), f"{root}/../elsewhere", str(root)):
            error(s.post(_edit(name)), 404, "steering[0].sae",
                  NOT_SERVED.format(p="steering[0].sae", n=name))
        # inside the allowed folder, a missing one and a non-SAE folder get the same answer
        (root / "notes").mkdir()
        for name in (str(root / "missing"), str(root / "notes")):
            error(s.post(_edit(name)), 404, "steering[0].sae",
                  NOT_AVAILABLE.format(p="steering[0].sae", n=name))


def test_allowed_hub_names_load_and_failures_name_no_host_detail(model, tok, fake_hub, caplog,
                                                                 monkeypatch) -> None:
    hub = fake_hub.hub
    hub.add_release("someorg/somerepo", "L1R", release_hyperparams(layer=1), raw_tensors(64, 256))
    caplog.set_level(logging.WARNING, logger="llamascope_sdk.serve")
    with tiny_server(model, tok, allow_saes=("someorg/*", "L*R-8x")) as s:
        r = s.post(_edit("someorg/somerepo:L1R"))
        assert r.status_code == 200, r.text
        assert hub.requests("final.safetensors")  # allowed: downloaded on first use
        error(s.post(_edit("someorg/missing")), 404, "steering[0].sae",
              NOT_AVAILABLE.format(p="steering[0].sae", n="someorg/missing"))
        error(s.post(_edit("otherorg/somerepo")), 404, "steering[0].sae",
              NOT_SERVED.format(p="steering[0].sae", n="otherorg/somerepo"))
        set_offline(monkeypatch)
        error(s.post(_edit("L3R-8x")), 404, "steering[0].sae",
              NOT_AVAILABLE.format(p="steering[0].sae", n="L3R-8x"))
    cache = os.environ["HF_HUB_CACHE"]
    assert hub.url in caplog.text and cache in caplog.text  # the log keeps the detail


def test_budget_no_request_can_fit_is_400_and_a_busy_one_429(model, tok, tmp_path) -> None:
    a, b = (str(make_release(tmp_path / k, layer=1, seed=i)) for i, k in enumerate("ab"))
    with tiny_server(model, tok, budget=300_000, served_saes=(a, b)) as s:
        size = sae_bytes(s.pool.get(a))
        body = {"prompt": "Hello", "max_tokens": 1, "steering": [
            {"sae": n, "feature": 1, "mode": "clamp", "value": 1.0} for n in (a, b)]}
        r = s.post(body)
        assert "retry-after" not in r.headers
        assert size == (2 * 256 * 64 + 256 + 64 + 1) * 4 + 4 * 256  # fp32 tensors + stats
        need = (size + size + 3 * 256 * 64 * 2) / 1e6  # b's load also reads its bf16 file
        error(r, 400, "steering[1].sae",
              f"steering[1].sae: this request's SAEs need {need:.1f} MB of SAE memory together, "
              "more than this server's budget of 0.3 MB (--sae-memory); send fewer or smaller "
              "SAEs per request")
        held = s.pool.acquire(a)  # another request holds a: b alone fits, but not now
        try:
            r = s.post(_edit(b, mode="clamp"))
            error(r, 429, None, "steering[0].sae: the SAE memory is in use by other requests; "
                                "try again later")
            assert r.headers["retry-after"] == "1"
        finally:
            s.pool.release(held)
        assert s.post(_edit(b, mode="clamp")).status_code == 200


def test_max_edits_bounds_features_of_one_edit_and_errors_carry_their_field(model, tok,
                                                                            tmp_path) -> None:
    a = str(make_release(tmp_path / "a", layer=1))
    with tiny_server(model, tok, served_saes=(a,),
                     limits=Limits(max_edits=4, max_tokens=8, default_max_tokens=1)) as s:
        error(s.post(_edit(a, list(range(5)))), 400, "steering[0].feature",
              "steering[0].feature: 5 features in one edit, more than this server's limit of "
              "4 (--max-edits)")
        assert s.post(_edit(a, list(range(4)))).status_code == 200
        r = s.post(_edit(a, 256, mode="clamp"))
        assert (r.status_code, r.json()["error"]["param"]) == (400, "steering[0].feature")
        assert "256" in r.json()["error"]["message"]
        r = s.post(_edit(a, [1, 2], value=[1.0, 2.0, 3.0]))  # the steering spec: its value
        assert (r.status_code, r.json()["error"]["param"]) == (400, "steering[0].value")


def test_unexpected_failures_are_500_without_detail(model, tok, caplog, monkeypatch) -> None:
    caplog.set_level(logging.ERROR, logger="llamascope_sdk.serve")
    with tiny_server(model, tok) as s:
        def broken(*_a, **_k):
            raise RuntimeError("cannot read /secret/host/path")

        monkeypatch.setattr(type(tok), "apply_chat_template", broken)
        r = s.post({"messages": [{"role": "user", "content": "Hi"}]}, "/v1/chat/completions")
        error(r, 500, None, "internal error (RuntimeError); the server log has the detail")
    assert "/secret/host/path" in caplog.text


def test_an_existing_path_and_a_missing_one_read_the_same(model, tok, tmp_path) -> None:
    (tmp_path / "here").mkdir()
    with tiny_server(model, tok) as s:
        answers = [s.post(_edit(str(tmp_path / n))).json()["error"] for n in ("here", "gone")]
    for err, n in zip(answers, ("here", "gone"), strict=True):
        err["message"] = err["message"].replace(str(tmp_path / n), "PATH")
    assert answers[0] == answers[1]


def test_names_given_at_start_and_the_demo(model, tok, tmp_path) -> None:
    a = str(make_release(tmp_path / "a", layer=1))
    with tiny_server(model, tok, served_saes=(a, "demo")) as s:
        assert s.post(_edit(a)).status_code == 200
        names = s.server.names
        assert all(names.allows(alias) for alias in DEMO_ALIASES)
        assert not names.allows(a + "/") and not names.allows("L12R-8x")  # exactly as given
