"""Feature pages are self-contained and say what they should; 1,000 pages render in seconds."""

from __future__ import annotations

import html
import re
import time

import torch

from llamascope_sdk.store import view
from llamascope_sdk.store.feature_store import FeatureStore
from llamascope_sdk.store.pages import feature_page, write_pages

from .conftest import CharTokenizer
from .test_feature_store import mined  # noqa: F401  (fixture)


def test_page_content_and_no_external_resources(mined, tiny_llama, tmp_path):  # noqa: F811
    sae, res = mined
    store = FeatureStore.from_result(res, CharTokenizer(), model=tiny_llama, sae_spec="my-sae")
    i = int(res.stats.frequency.argmax())
    store.labels[i] = "Label <b>&</b>"
    page = feature_page(store, i)
    text = html.unescape(page)
    assert "Label <b>&</b>" in text and "<b>&</b>" not in page  # escaped
    assert view.store_steer_command(store, i) in text
    assert 'id="histogram"' in page and "<svg" in page
    assert 'class="t max"' in page
    # Nothing is fetched: no http(s) src/href other than a Neuronpedia link, no external CSS/JS.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script src" not in page and "<link" not in page
    index = write_pages(store, tmp_path / "pages", [i, 3])
    idx = index.read_text()
    assert 'href="features/3.html"' in idx and "<script>" in idx
    assert (tmp_path / "pages" / "features" / f"{i}.html").is_file()


def test_neuronpedia_link_only_when_known(mined):  # noqa: F811
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    assert "neuronpedia" not in feature_page(store, 0).lower()
    store.meta["neuronpedia_url"] = "https://www.neuronpedia.org/llama3.1-8b/15-llamascope-res-32k"
    assert "https://www.neuronpedia.org/llama3.1-8b/15-llamascope-res-32k/0" in feature_page(store, 0)


def test_thousand_pages_take_seconds(mined, tmp_path):  # noqa: F811
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    # 1,000 features: tile the 96 mined ones.
    n = 1000
    reps = -(-n // store.d_sae)

    def tile(t):
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:n]

    for e in (store.top, store.samples):
        for key in ("values", "doc", "pos", "tokens", "acts"):
            setattr(e, key, tile(getattr(e, key)))
    store.hist = tile(store.hist)
    store.stats.mean, store.stats.typical, store.stats.frequency = (
        tile(store.stats.mean), tile(store.stats.typical), tile(store.stats.frequency))
    store.meta["d_sae"] = n
    t = time.perf_counter()
    write_pages(store, tmp_path / "p", list(range(n)))
    took = time.perf_counter() - t
    assert len(list((tmp_path / "p" / "features").iterdir())) == n
    assert took < 60, f"1,000 pages took {took:.1f} s"
    assert torch.is_tensor(store.top.values)


def test_a_feature_that_never_fired_gets_no_steer_command(mined):  # noqa: F811
    """Issue 17 case 16 on the pages: no 'Try it' with a zero-strength steer."""
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer(), sae_spec="my-sae")
    dead = [i for i in range(store.d_sae) if float(store.stats.frequency[i]) == 0.0]
    fired = int(store.stats.frequency.argmax())
    assert dead, "the fixture has features that never fired"
    assert view.summary(store, dead[0])["steer"] is None
    assert 'id="steer"' not in feature_page(store, dead[0])
    assert 'id="steer"' in feature_page(store, fired)
    assert view.store_steer_command(store, fired) == (
        f"llamascope steer --sae my-sae -f {fired} -a {4 * float(store.stats.typical[fired]):.1f}")
