"""Render the demo's feature 4154 page in a real headless browser and check what it shows.

Mines a small slice of the corpus (``--corpus DIR``, see bench/corpus_files.py) with the
demo SAE on SmolLM2-135M, writes the store and pages, then runs Debian's ``chromium``:
``--dump-dom`` must contain the label, the top example tokens and the steer command, and
``--screenshot`` writes bench/out/feature_4154.png (for the README).

    .venv/bin/python bench/feature_page_screenshot.py --corpus DIR
"""

from __future__ import annotations

import argparse
import html
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench.corpus_files

from bench.corpus_files import add_corpus_argument, corpus_files  # noqa: E402
from bench.headless import browse  # noqa: E402

OUT = REPO / "bench" / "out"
FEATURE = 4154


def main() -> None:
    from llamascope_sdk import SAE, load_model
    from llamascope_sdk.mining.mine import mine
    from llamascope_sdk.store import view
    from llamascope_sdk.store.feature_store import FeatureStore
    from llamascope_sdk.store.pages import write_pages

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_corpus_argument(ap)
    files = corpus_files(ap.parse_args().corpus, "tinyshakespeare.txt", "wikitext2-valid.txt")
    model, tok = load_model("smollm2-135m")
    sae = SAE.from_pretrained("demo")
    from llamascope_sdk.corpus import iter_documents

    docs = (list(iter_documents(files[0]))[:300] + list(iter_documents(files[1]))[:40])
    res = mine(model, tok, sae, docs, tokens=6000, context=96, batch_size=8)[sae.name]
    store = FeatureStore.from_result(res, tok, model=model, sae_spec="demo",
                                     corpus="tinyshakespeare + wikitext2 (slices)",
                                     model_name="smollm2-135m")
    tmp = Path(tempfile.mkdtemp(prefix="llamascope-pages-"))
    store.save(tmp / "store", extra=lambda st, d: write_pages(st, d / "pages", [FEATURE, 1297, 1062]))
    page = tmp / "store" / "pages" / "features" / f"{FEATURE}.html"
    dom = browse(["--dump-dom", page.as_uri()])
    text = html.unescape(dom)
    summary = view.summary(store, FEATURE)
    top = store.examples(FEATURE)[0]
    checks = {
        "label": summary["label"] in text,
        "steer command": summary["steer"] in text,
        "top example max token": html.escape(top["tokens"][top["max_index"]]).strip() in dom,
        "top example context": all(html.escape(t).strip() in dom for t in top["tokens"] if t.strip()),
        "histogram svg": 'id="histogram"' in dom,
        "histogram count axis numbered": 'class="ytick"' in dom and ">10<" in dom,
        "histogram activation axis numbered": dom.count('class="xtick"') >= 2,
        "label source shown": 'id="label-source"' in dom and "hand-written" in dom,
        "no replacement character": "\ufffd" not in text,
        "logit lens": 'id="promoted"' in dom,
    }
    for k, ok in checks.items():
        print(f"{'ok ' if ok else 'FAIL'} {k}")
    OUT.mkdir(parents=True, exist_ok=True)
    png = OUT / f"feature_{FEATURE}.png"
    browse([f"--screenshot={png}", "--window-size=1200,1600", page.as_uri()])
    index_png = OUT / "feature_index.png"
    browse([f"--screenshot={index_png}", "--window-size=1200,500",
         (tmp / "store" / "pages" / "index.html").as_uri()])
    print(f"screenshot: {png.relative_to(REPO)} ({png.stat().st_size:,} bytes); index: "
          f"{index_png.relative_to(REPO)}")
    shutil.rmtree(tmp, ignore_errors=True)
    if not all(checks.values()):
        sys.exit("the page does not show everything it should")


if __name__ == "__main__":
    main()
