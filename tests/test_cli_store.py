"""Issue 17, the store and CLI cases: `inspect` refuses every output path it may not write before
any work (nothing of the user's is deleted or overwritten), `show`/`search` read stores safely
(bad files are one line naming the file; control characters never reach the terminal raw;
aliases resolve; a store of another SAE is refused; no zero-strength steer is suggested)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk.base.errors import LlamascopeError
from llamascope_sdk.cli import app
from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.mining.mine import HIST_EDGES, Examples, MiningResult
from llamascope_sdk.store.feature_store import MANIFEST, FeatureStore

from .conftest import CharTokenizer
from .test_feature_store import _tree, mined  # noqa: F401  (fixture)

runner = CliRunner()


class _Loaded(LlamascopeError):
    """Raised by the stand-in loader: the command got past its output checks."""


@pytest.fixture
def no_loading(monkeypatch):
    """Replace the SAE/model loader of `inspect`: record whether it was reached, then stop."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        raise _Loaded("loader reached")

    monkeypatch.setattr("llamascope_sdk.cli.inspect.load_sae_and_model", fake)
    return calls


def _corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("Thou art the joy of my heart.\n\nThe stock market rose today.\n")
    return str(p)


def _refused(res, message):
    """One line `error: MESSAGE` (plus a hint), exit 1, no traceback, not called a bug."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "looks like a bug" not in res.output
    lines = res.stderr.splitlines()
    assert lines[0] == f"error: {message}", res.stderr
    assert all(line.startswith("hint: ") for line in lines[1:]), res.stderr


def test_inspect_refuses_a_web_app_folder_before_any_work(tmp_path, no_loading):
    """Case 1: before, the folder (manifest.json + background.js) was wiped and rc was 0."""
    app_dir = tmp_path / "webapp"
    app_dir.mkdir()
    (app_dir / "manifest.json").write_text('{"name": "ext", "manifest_version": 3}')
    (app_dir / "background.js").write_text("chrome.runtime.onInstalled.addListener(() => {});\n")
    before = _tree(app_dir)
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(app_dir)])
    _refused(res, f"{app_dir} is not a feature store (2 entries, e.g. background.js, "
                  "manifest.json): only an empty folder or an earlier feature store is replaced")
    assert no_loading == [] and _tree(app_dir) == before


def test_inspect_refuses_save_stats_to_a_user_file(tmp_path, no_loading):
    """Case 3: before, notes.txt was overwritten with safetensors bytes after mining."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(tmp_path / "s"), "--save-stats-to", str(notes)])
    _refused(res, f"--save-stats-to takes a folder (it writes feature_stats.safetensors into it); "
                  f"{notes} is a file")
    assert notes.read_text() == "my notes\n" and no_loading == []
    # A statistics file the SDK did not write, inside the folder, is not overwritten either.
    sae_dir = tmp_path / "my-sae"
    sae_dir.mkdir()
    (sae_dir / "feature_stats.safetensors").write_bytes(b"not ours")
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(tmp_path / "s"), "--save-stats-to", str(sae_dir)])
    _refused(res, f"{sae_dir / 'feature_stats.safetensors'} exists and was not written by "
                  "llamascope-sdk (not a feature statistics file); it is not overwritten")
    assert (sae_dir / "feature_stats.safetensors").read_bytes() == b"not ours"
    # A file name that does not exist yet is not taken for a folder.
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--save-stats-to", str(tmp_path / "stats.safetensors")])
    _refused(res, "--save-stats-to takes a folder (it writes feature_stats.safetensors into it); "
                  f"{tmp_path / 'stats.safetensors'} looks like a file name")
    assert not (tmp_path / "stats.safetensors").exists() and no_loading == []


def test_inspect_creates_the_stats_folder_before_loading(tmp_path, no_loading):
    """Case 3: before, a folder name that did not exist became a file (after mining)."""
    new = tmp_path / "newdir"
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(tmp_path / "s"), "--save-stats-to", str(new)])
    _refused(res, "loader reached")
    assert new.is_dir() and list(new.iterdir()) == [] and len(no_loading) == 1


def test_inspect_refuses_bad_out_before_loading(tmp_path, no_loading):
    """Case 8: before, a file or a user's folder as --out was found out only after mining (and
    after --save-stats-to had written)."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"data")
    stats_dir = tmp_path / "stats"
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(afile), "--save-stats-to", str(stats_dir)])
    _refused(res, f"{afile} is a file, not a folder; give a folder to write")
    assert afile.read_bytes() == b"data" and not stats_dir.exists()
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "a.txt").write_text("hi")
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(user)])
    _refused(res, f"{user} is not a feature store (1 entries, e.g. a.txt): only an empty folder "
                  "or an earlier feature store is replaced")
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(afile / "store")])
    _refused(res, f"cannot create {afile / 'store'}: {afile} is a file, not a folder")
    # Several SAEs: --out is the folder that holds one store each; a file is refused too.
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--sae", "demo", "--dataset",
                              _corpus(tmp_path), "--out", str(afile)])
    _refused(res, f"{afile} is a file, not a folder")
    assert no_loading == [] and _tree(user) == {"a.txt": b"hi"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_inspect_refuses_an_unwritable_out(tmp_path, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                                  "--out", str(locked / "store")])
        _refused(res, f"cannot write {locked / 'store'}: no write permission in {locked}")
    finally:
        locked.chmod(0o700)
    assert no_loading == []


@pytest.mark.parametrize(("name", "content", "message"), [
    ("top.safetensors", b"garbage garbage garbage", "not a readable safetensors file"),
    ("histogram.safetensors", b"garbage garbage garbage", "not a readable safetensors file"),
    ("manifest.json", b"[1, 2, 3]", "expected a JSON object (the store's manifest), found a list"),
    ("vocab.json", b"[1, 2, 3]", "expected a JSON object of token id -> text, found a list"),
])
def test_show_bad_store_file_is_one_line_naming_it(mined, tmp_path, name, content, message):  # noqa: F811
    """Case 12: before, these printed "this looks like a bug" (SafetensorError, AttributeError)."""
    _, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer()).save(tmp_path / "st")
    (folder / name).write_bytes(content)
    out = runner.invoke(app, ["show", str(folder), "3"])
    assert out.exit_code == 1 and "looks like a bug" not in out.output and "Traceback" not in out.output
    first = out.stderr.splitlines()[0]
    assert first.startswith(f"error: {folder / name}: ") and message in first, out.stderr


def test_show_pages_deleted(mined, tmp_path):  # noqa: F811
    """Case 15: before, `show` refused the store once its pages/ folder was deleted."""
    from llamascope_sdk.store.pages import write_pages

    _, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer()).save(
        tmp_path / "st", extra=lambda st, tmp: write_pages(st, tmp / "pages", [3]))
    shutil.rmtree(folder / "pages")
    out = runner.invoke(app, ["show", str(folder), "3", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["frequency"] == pytest.approx(float(res.stats.frequency[3]))


def test_show_makes_control_characters_visible(mined, tmp_path):  # noqa: F811
    """Case 13: a label (and tokens) with a clear-screen sequence reach the terminal escaped."""
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    i = int(res.stats.frequency.argmax())
    store.labels[i] = "evil\x1b[2J\x1b[31mRED\u202e"
    tok = int(store.top.tokens[i, 0, store.top.center])
    store.vocab[tok] = "\x1b]0;title\x07"
    folder = store.save(tmp_path / "st")
    out = runner.invoke(app, ["show", str(folder), str(i)])
    assert out.exit_code == 0, out.output
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in out.output
    assert out.stdout.splitlines()[0] == f"{store.name} feature {i} 'evil\\x1b[2J\\x1b[31mRED\\u202e'" \
        + ("  [dense]" if float(res.stats.frequency[i]) > 0.1 else "")
    assert "\\x1b]0;title\\x07" in out.stdout  # the token, in the examples table
    # JSON output keeps the text as stored (JSON escapes control characters itself).
    js = runner.invoke(app, ["show", str(folder), str(i), "--json"])
    assert json.loads(js.stdout)["label"] == "evil\x1b[2J\x1b[31mRED\u202e"
    assert "\x1b" not in js.stdout


def test_table_and_say_escape_everything():
    """The one helper every terminal line goes through (the steer caption is a table title)."""
    from llamascope_sdk.base.terminal import visible

    assert visible("a\x1b[2Jb\nc\td\r\x9b\u2028") == "a\\x1b[2Jb\\nc\\td\\r\\x9b\\u2028"
    assert visible("line one\nline\ttwo\r", keep_lines=True) == "line one\nline\ttwo\\r"
    assert visible("Shakespeare / Early Modern English style, ünïcode ok") == \
        "Shakespeare / Early Modern English style, ünïcode ok"


# ------------------------------------------------------------- with the demo SAE and SmolLM2
def _demo_store(sae, folder, frequency, typical):
    """A store for ``sae`` whose statistics are the given tensors (one empty example slot)."""
    f = sae.d_sae
    top = Examples(torch.zeros(f, 1), torch.full((f, 1), -1), torch.full((f, 1), -1),
                   torch.full((f, 1, 3), -1), torch.zeros(f, 1, 3), 1)
    stats = FeatureStats(mean=frequency * typical, typical=typical, frequency=frequency, n_tokens=50)
    result = MiningResult(sae, sae.name, top, None, stats,
                          torch.zeros(f, len(HIST_EDGES) + 1, dtype=torch.long), 50, 2)
    return FeatureStore.from_result(result, CharTokenizer(), sae_spec="demo").save(folder)


@pytest.mark.smollm
def test_search_never_suggests_a_zero_strength_steer(smollm2, tmp_path):
    """Case 16: before, a top hit that never fired in the store gave `steer ... -a 0.0`."""
    from llamascope_sdk import SAE
    from llamascope_sdk.loading.demo import DEMO_SAE_DIR

    # The demo SAE without its own statistics (so the suggestion is in raw units).
    sae_dir = tmp_path / "demo-copy"
    shutil.copytree(DEMO_SAE_DIR, sae_dir)
    (sae_dir / "feature_stats.safetensors").unlink()
    sae = SAE.from_pretrained(str(sae_dir))
    # Statistics in which nothing fired, except feature 7 (so it is the only hit that fired).
    freq, typ = torch.zeros(sae.d_sae), torch.zeros(sae.d_sae)
    freq[7], typ[7] = 0.01, 2.5
    store = _demo_store(sae, tmp_path / "store", freq, typ)
    prompt = "O Romeo, Romeo, wherefore art thou Romeo?"
    res = runner.invoke(app, ["search", "--sae", str(sae_dir), "--prompt", prompt, "--store",
                              str(store), "--top", "4608", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    top = data["hits"][0]
    assert top["frequency"] == 0.0 and data["steer"] is None
    text = runner.invoke(app, ["search", "--sae", str(sae_dir), "--prompt", prompt, "--store",
                               str(store), "--top", "4608"])
    assert text.exit_code == 0, text.output
    assert "-a 0.0" not in text.stdout and "try: " not in text.stdout
    fired = [h for h in data["hits"] if h["typical"] > 0]
    last = text.stdout.strip().splitlines()[-1]
    want = (f"feature {top['feature']} never fired in the mined statistics: it has no typical "
            "activation to steer by (mine more tokens)")
    if fired:
        want += f"; the best hit that fired: llamascope steer --sae {sae_dir} -f 7 -a 10.0"
    assert " ".join(text.stdout.split()).endswith(want), last


@pytest.mark.smollm
def test_search_refuses_a_store_of_another_sae_of_the_same_width(smollm2, tmp_path):
    """Case 2/6: before, `search --store` used any store of the same width silently."""
    from llamascope_sdk import SAE
    from llamascope_sdk.loading.demo import DEMO_SAE_DIR

    other_dir = tmp_path / "demo-permuted"
    shutil.copytree(DEMO_SAE_DIR, other_dir)
    other = SAE.from_pretrained(str(other_dir))
    with torch.no_grad():
        perm = torch.randperm(other.d_sae)
        other.W_dec.copy_(other.W_dec[perm])
        other.W_enc.copy_(other.W_enc[perm])
    n = torch.zeros(other.d_sae)
    store = _demo_store(other, tmp_path / "store", n + 0.01, n + 1.0)
    res = runner.invoke(app, ["search", "--sae", "demo", "--prompt", "thou art", "--store",
                              str(store)])
    _refused(res, f"the feature store {store} was mined with SAE 'demo-permuted', not with "
                  "'smollm2-135m-L15R-8x' (W_dec weights differ; W_enc weights differ)")


@pytest.mark.smollm
def test_steer_caption_and_text_escape_control_characters(smollm2, tmp_path):
    """Case 13: before, a label's clear-screen sequence reached the terminal in the caption."""
    from llamascope_sdk.loading.demo import DEMO_SAE_DIR

    sae_dir = tmp_path / "demo-copy"
    shutil.copytree(DEMO_SAE_DIR, sae_dir)
    labels = json.loads((sae_dir / "feature_labels.json").read_text())
    labels["4154"] = "evil\x1b[2J\x1b[31mRED"
    (sae_dir / "feature_labels.json").write_text(json.dumps(labels))
    res = runner.invoke(app, ["steer", "--sae", str(sae_dir), "-f", "4154", "-a", "80", "-n", "2",
                              "--prompt", "Thou art"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output
    flat = "".join(res.stdout.split())  # the title wraps at the table's width
    assert "4154'evil\\x1b[2J\\x1b[31mRED'" in flat


def test_manifest_records_kind_and_fingerprint(mined, tmp_path):  # noqa: F811
    sae, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer()).save(tmp_path / "st")
    meta = json.loads((folder / MANIFEST).read_text())
    assert meta["format"] == "llamascope-feature-store" and meta["kind"] == "feature-store"
    fp = meta["fingerprint"]
    assert fp["d_sae"] == sae.d_sae and len(fp["W_dec"]) == 32
    rows = [(k * 2654435761 + 12345) % sae.d_sae for k in range(32)]
    cols = [(k * 40503 + 17) % sae.d_model for k in range(32)]
    assert fp["W_dec"] == pytest.approx([float(sae.W_dec[r, c]) for r, c in zip(rows, cols, strict=True)],
                                        rel=1e-5)


@pytest.mark.smollm
def test_inspect_does_not_replace_another_saes_store(smollm2, mined, tmp_path, monkeypatch):  # noqa: F811
    """Case 6: a store of another SAE at the target is refused before mining, left intact."""
    _, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer()).save(tmp_path / "st")
    before = _tree(folder)

    def no_mining(*args, **kwargs):
        raise AssertionError("mining started")

    monkeypatch.setattr("llamascope_sdk.mining.mine.mine", no_mining)
    out = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", str(folder)])
    _refused(out, f"{folder} holds the feature store of SAE {res.name!r} (d_sae 96 vs 4608; d_model 64 vs 576); "
                  "a store of 'smollm2-135m-L15R-8x' does not replace it")
    assert _tree(folder) == before


def test_an_allocation_failure_is_out_of_memory_not_a_bug():
    """Case 12's fallback: whatever asks for more memory than there is prints one line with the
    size torch reports and what to lower, never "this looks like a bug"."""
    import typer

    from llamascope_sdk.cli.app import report_error

    err = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 368640000000 bytes. Error code 12")
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr(typer, "echo", lambda text, err=False: lines.append(text))
        assert report_error(err) == 1
    assert lines == [f"error: out of memory: {err}",
                     "hint: lower --batch-size, --top-n or --tokens, or use a machine with more memory"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_inspect_refuses_an_out_on_a_file_system_it_cannot_write(tmp_path, no_loading):
    """Case 8: /proc cannot hold folders, even for root (permission bits alone say yes)."""
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--out", "/proc/llamascope-test/store"])
    assert res.exit_code == 1 and no_loading == []
    first = res.stderr.splitlines()[0]
    assert first.startswith("error: cannot write /proc/llamascope-test/store: /proc: "), res.stderr
    assert "looks like a bug" not in res.output


@pytest.mark.smollm
def test_inspect_refuses_a_top_n_beyond_memory(smollm2, tmp_path):
    """Case 12: before, --top-n 10000000 tried a 368 GB allocation and printed "this looks like a
    bug"; now mining refuses it before allocating, naming the memory it would need."""
    from llamascope_sdk.mining.mine import _memory_available

    have = _memory_available(torch.device("cpu"))
    if have is None:
        pytest.skip("this system does not report its memory")
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", _corpus(tmp_path),
                              "--top-n", "10000000", "--out", str(tmp_path / "s")])
    assert res.exit_code == 1 and "looks like a bug" not in res.output
    first = res.stderr.splitlines()[0]
    assert first.startswith("error: top_n=10000000, ") and " GiB of mining state" in first, first
    assert f"more than the {have / 2**30:.1f} GiB of cpu memory here" in first
    assert not (tmp_path / "s").exists()
