"""Static HTML feature pages: one self-contained page per feature plus a sortable index.

Each page opens from disk with no network: styles and the index's sorting script are inline,
the histogram is inline SVG. A page shows the feature's label (when known), frequency and
typical activation, the exact ``llamascope steer`` command to try it, the Neuronpedia link
where Neuronpedia hosts the SAE (R/A/M Llama Scope SAEs; not transcoders or the demo), its top
examples with tokens shaded by activation and the maximum marked, samples from quantile bands
of its firings, the activation histogram and the logit lens.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment
from markupsafe import Markup

from llamascope_sdk.base.atomic import atomic_write_text
from llamascope_sdk.core.logit_lens import APPROXIMATION
from llamascope_sdk.core.metrics import DENSE_FREQUENCY
from llamascope_sdk.mining.spacing import scope_line
from llamascope_sdk.store import view
from llamascope_sdk.store.explanation_view import explanation_html
from llamascope_sdk.store.feature_store import FeatureStore
from llamascope_sdk.store.ownership import inside
from llamascope_sdk.store.scores import DEFINITIONS, FeatureScores, scores_of

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d1d1f;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.label{font-size:18px;color:#8a3b00;margin:2px 0 10px}.muted{color:#666}.dense{color:#b00;font-weight:600}
.facts{display:flex;gap:22px;flex-wrap:wrap;margin:8px 0}.facts div b{display:block;font-size:18px}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre.cmd{background:#f4f4f6;border:1px solid #ddd;padding:8px 10px;border-radius:6px;white-space:pre-wrap}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;word-break:break-word;padding:4px 6px;border-bottom:1px solid #eee}
.ex .where{float:right;color:#888;font-size:11px;margin-left:8px}
.t{border-radius:2px}.t.max{outline:2px solid #c40;font-weight:700}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
th{cursor:pointer;user-select:none;background:#fafafa}.num{text-align:right;font-variant-numeric:tabular-nums}
.lens{display:flex;gap:40px}.band{margin:8px 0 2px;color:#444;font-weight:600}
"""

_FEATURE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ sae }} feature {{ f.feature }}{% if f.label %} - {{ f.label }}{% endif %}</title>
<style>{{ css }}</style></head><body>
<p class="muted"><a href="../index.html">all features</a> &middot; {{ sae }} &middot; {{ hook }}</p>
<h1 id="title">{{ sae }} &middot; feature {{ f.feature }}</h1>
{% if f.label %}<div class="label" id="label">{{ f.label }} <span class="muted" id="label-source">(label: {{ f.label_source }})</span></div>{% endif %}
{{ explained }}
<div class="facts">
<div>frequency<b id="frequency">{{ pct(f.frequency) }}</b></div>
<div>typical activation<b id="typical">{{ num(f.typical) }}</b></div>
<div>mean activation<b>{{ num(f.mean) }}</b></div>
<div>max activation<b id="max">{{ num(f.max) }}</b></div>
<div>tokens read<b>{{ "{:,}".format(f.n_tokens) }}</b></div>
{% if sc %}<div title="{{ sc_def.output_score }}">output score<b id="output-score">{{ "%.3g"|format(sc.output_score) }} (#{{ sc.output_score_rank }})</b></div>
<div title="{{ sc_def.delta_token_confidence }}">&Delta; token confidence<b id="delta-token-confidence">{{ "%+.3g"|format(sc.delta_token_confidence) }}</b></div>{% endif %}
</div>
{% if f.dense %}<p class="dense">Dense feature: fires on more than {{ dense_pct }} of all tokens.</p>{% endif %}
{% if f.steer %}<p>Try it: <pre class="cmd" id="steer">{{ f.steer }}</pre></p>{% endif %}
{% if f.neuronpedia_url %}<p>Neuronpedia: <a href="{{ f.neuronpedia_url }}">{{ f.neuronpedia_url }}</a></p>{% endif %}
<h2>Top examples</h2>
<p class="muted" id="spacing">{{ spacing }}</p>
<div id="top">{% for e in top %}{{ e }}{% else %}<p class="muted">This feature never fired on the corpus.</p>{% endfor %}</div>
{% if bands %}<h2>Samples across activation quantiles</h2>
{% for b in bands %}{% if b.examples %}<div class="band">{{ b.label }}</div>{% for e in b.examples %}{{ e }}{% endfor %}{% endif %}{% endfor %}{% endif %}
<h2>Activation histogram</h2>
{{ svg }}
{% if lens %}<h2>Logit lens</h2>
<p class="muted">{{ approx }}</p>
<div class="lens"><table id="promoted"><tr><th>promoted token</th><th class="num">logit</th></tr>
{% for t, v in lens.promoted %}<tr><td><code>{{ tok(t) }}</code></td><td class="num">{{ "%.2f"|format(v) }}</td></tr>{% endfor %}</table>
<table id="suppressed"><tr><th>suppressed token</th><th class="num">logit</th></tr>
{% for t, v in lens.suppressed %}<tr><td><code>{{ tok(t) }}</code></td><td class="num">{{ "%.2f"|format(v) }}</td></tr>{% endfor %}</table></div>{% endif %}
</body></html>
"""

_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ sae }} features</title>
<style>{{ css }}</style></head><body>
<h1>{{ sae }}: mined features</h1>
<p class="muted">{{ hook }} &middot; {{ "{:,}".format(n_tokens) }} tokens of {{ corpus }} &middot;
{{ rows|length }} feature pages; {{ spacing }}. Click a column header to sort.</p>
<table id="features"><thead><tr><th data-k="n">feature</th><th data-k="s">label</th>
<th data-k="n" class="num">frequency</th><th data-k="n" class="num">typical</th>
<th data-k="n" class="num">max activation</th>{% if scored %}<th data-k="n" class="num" title="{{ sc_def.output_score }}">output score</th>{% endif %}<th data-k="s">top tokens</th></tr></thead><tbody>
{% for r in rows %}<tr><td data-v="{{ r.i }}"><a href="features/{{ r.i }}.html">{{ r.i }}</a></td>
<td>{{ r.label }}{% if r.dense %} <span class="dense">dense</span>{% endif %}</td>
<td class="num" data-v="{{ r.freq }}">{{ pct(r.freq) }}</td><td class="num" data-v="{{ r.typ }}">{{ num(r.typ) }}</td>
<td class="num" data-v="{{ r.max }}">{{ num(r.max) }}</td>{% if scored %}<td class="num" data-v="{{ r.out }}">{{ "%.3g"|format(r.out) if r.out >= 0 else "-" }}</td>{% endif %}<td><code>{{ r.toks }}</code></td></tr>
{% endfor %}</tbody></table>
<script>
document.querySelectorAll('#features th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = document.querySelector('#features tbody');
    var rows = Array.prototype.slice.call(body.rows);
    var num = th.dataset.k === 'n', dir = th.dataset.dir === 'desc' ? 1 : -1;
    th.dataset.dir = dir < 0 ? 'desc' : 'asc';
    rows.sort(function(a, b){
      var x = a.cells[col], y = b.cells[col];
      if (num) return dir * (parseFloat(x.dataset.v) - parseFloat(y.dataset.v));
      return dir * x.textContent.localeCompare(y.textContent);
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
</script></body></html>
"""

_ENV = Environment(autoescape=True, trim_blocks=False)
_FEATURE_T = _ENV.from_string(_FEATURE)
_INDEX_T = _ENV.from_string(_INDEX)


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%" if x >= 1e-4 or x == 0 else f"{100 * x:.1e}%"


def _tok(text: str) -> str:
    """A token as shown: newlines and tabs made visible; a replacement character (a store
    written before byte tokens were kept as ``<0x..>``) shown as ``<bytes?>``."""
    return (text.replace("\n", "\u21b5").replace("\t", "\u21e5")
            .replace("\ufffd", "<bytes?>"))


def example_html(e: dict[str, Any], scale: float) -> str:
    """One example: tokens shaded by activation (relative to ``scale``), the maximum marked."""
    parts = []
    for k, (t, a) in enumerate(zip(e["tokens"], e["acts"], strict=True)):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale))
        cls = "t max" if k == e["max_index"] else "t"
        style = f' style="background:rgba(255,110,0,{alpha:.2f})"' if alpha > 0 else ""
        parts.append(f'<span class="{cls}"{style} title="{a:.3g}">{html.escape(_tok(t))}</span>')
        if "\n" in t:
            parts.append("\n")
    where = f'doc {e["doc"]}, token {e["pos"]} &middot; max {e["max"]:.3g}'
    return f'<div class="ex"><span class="where">{where}</span>{"".join(parts)}</div>'


def histogram_svg(bins: list[dict[str, float]], width: int = 640, height: int = 190) -> str:
    """Inline SVG bar chart of the non-empty log-spaced bins: counts on a log axis with their
    values (1, 10, 100, ...), activation values under the bars at every decade edge and both
    ends, both axes named."""
    if not bins:
        return '<p class="muted">No activations.</p>'
    n, left, bottom = len(bins), 56, 44
    top = max(math.log10(b["count"] + 1) for b in bins)
    plot_h = height - bottom - 12
    bw = (width - left - 10) / n

    def y(count: float) -> float:
        return height - bottom - plot_h * math.log10(count + 1) / top

    out = []
    for k, b in enumerate(bins):
        h = height - bottom - y(b["count"])
        out.append(f'<rect x="{left + k * bw:.1f}" y="{y(b["count"]):.1f}" '
                   f'width="{max(bw - 1, 1):.1f}" height="{h:.1f}" fill="#e07020"><title>'
                   f'{_num(b["lo"])}-{_num(b["hi"])}: {int(b["count"])}</title></rect>')
    ax = height - bottom
    out.append(f'<line x1="{left}" y1="{ax}" x2="{width - 10}" y2="{ax}" stroke="#555"/>'
               f'<line x1="{left}" y1="{ax}" x2="{left}" y2="12" stroke="#555"/>')
    c = 1
    while math.log10(c + 1) <= top + 1e-9:  # count ticks: 1, 10, 100, ...
        out.append(f'<text class="ytick" x="{left - 4}" y="{y(c) + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{c:,}</text><line x1="{left - 3}" y1="{y(c):.1f}" '
                   f'x2="{left}" y2="{y(c):.1f}" stroke="#555"/>')
        c *= 10
    step = max(1, n // 6)
    for k, b in enumerate(bins):  # activation ticks: the lower edge of every step-th bar
        if k % step == 0 and (k == 0 or n - k > step // 2):
            x = left + k * bw
            out.append(f'<text class="xtick" x="{x:.1f}" y="{ax + 14}" font-size="10" '
                       f'text-anchor="middle">{_num(b["lo"])}</text>')
    out.append(f'<text class="xtick" x="{width - 10}" y="{ax + 14}" font-size="10" '
               f'text-anchor="end">{_num(bins[-1]["hi"])}</text>')
    out.append(f'<text x="{(left + width) / 2}" y="{height - 6}" font-size="11" '
               'text-anchor="middle">activation (model units; log-spaced bins)</text>'
               f'<text x="12" y="{(height - bottom) / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {(height - bottom) / 2})">firings (log scale)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'id="histogram">{"".join(out)}</svg>')


def feature_page(store: FeatureStore, i: int, scores: FeatureScores | None = None) -> str:
    """The HTML of feature ``i``'s page (with its selection scores when given)."""
    f = view.summary(store, i)
    scale = f["max"]
    bands = [{"label": b["label"], "examples": [Markup(example_html(e, scale)) for e in b["examples"]]}
             for b in view.bands(store, i) if b["examples"]]
    return _FEATURE_T.render(
        f=f, sae=store.name, hook=store.meta.get("hook_point_out"), css=Markup(_CSS),
        top=[Markup(example_html(e, scale)) for e in store.examples(i)], bands=bands,
        spacing=scope_line(store.meta),
        svg=Markup(histogram_svg(view.histogram(store, i))), lens=view.logit_lens(store, i),
        approx=APPROXIMATION, num=_num, pct=_pct, tok=_tok, dense_pct=_pct(DENSE_FREQUENCY),
        explained=Markup(explanation_html(store, i)),
        sc=scores.get(i) if scores is not None else None, sc_def=DEFINITIONS)


def _score(scores: FeatureScores | None, i: int) -> float:
    """Feature ``i``'s output score for the index, -1 when it has none (sorts last)."""
    v = float(scores.output_score[i]) if scores is not None else -1.0
    return v if math.isfinite(v) else -1.0


def index_page(store: FeatureStore, features: list[int],
               scores: FeatureScores | None = None) -> str:
    rows = []
    top, best = store.top, store.top.best()
    for i in features:
        toks = [store.token_text(int(top.tokens[k, top.center])) for k in top.rows(i)[:5]]
        rows.append({"i": i, "label": store.labels.get(i, ""), "dense": view.is_dense(store, i),
                     "freq": float(store.stats.frequency[i]), "typ": float(store.stats.typical[i]),
                     "max": float(best[i]),
                     "out": _score(scores, i),
                     "toks": " ".join(repr(_tok(t)) for t in dict.fromkeys(toks))})
    return _INDEX_T.render(rows=rows, sae=store.name, hook=store.meta.get("hook_point_out"),
                           n_tokens=int(store.stats.n_tokens), corpus=store.meta.get("corpus") or "a corpus",
                           css=Markup(_CSS), num=_num, pct=_pct, scored=scores is not None,
                           spacing=scope_line(store.meta),
                           sc_def=DEFINITIONS)


def default_page_features(store: FeatureStore, features: list[int] | None = None,
                          max_pages: int = 1000) -> list[int]:
    """Which features get pages: ``features`` if given; else labelled features, then the rest
    of the features that fired, most frequent first (dense ones last), up to ``max_pages``."""
    if features:
        return sorted({store.check_feature(i) for i in features})
    freq = store.stats.frequency
    fired = (freq > 0).nonzero().squeeze(1).tolist()
    key = {i: (i not in store.labels, float(freq[i]) > DENSE_FREQUENCY, -float(freq[i])) for i in fired}
    return sorted(sorted(fired, key=key.__getitem__)[:max_pages])


def write_pages(store: FeatureStore, folder: str | Path, features: list[int] | None = None,
                max_pages: int = 1000, scores: FeatureScores | None = None) -> Path:
    """Write ``index.html`` and ``features/<i>.html`` under ``folder``; return the index path.
    Selection scores (``scores``, else the store's ``feature_scores.safetensors``) add a
    sortable output-score column and two facts per page."""
    folder = Path(folder)
    scores = scores if scores is not None else scores_of(store)
    feats = default_page_features(store, features, max_pages)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    for i in feats:
        (folder / "features" / f"{i}.html").write_text(feature_page(store, i, scores),
                                                       encoding="utf-8")
    atomic_write_text(folder / "index.html", index_page(store, feats, scores))
    return folder / "index.html"


def refresh_pages(store: Any, features: list[int]) -> int:
    """Rewrite the existing HTML pages of ``features`` (under STORE/pages) so they show the
    new explanations; returns how many were rewritten. Pages that do not exist stay absent,
    and nothing is written through a pages folder that links out of the store."""
    if getattr(store, "path", None) is None:
        return 0
    folder = Path(store.path) / "pages" / "features"
    if not inside(store.path, folder):
        return 0
    n = 0
    for i in features:
        page = folder / f"{int(i)}.html"
        if page.is_file():
            atomic_write_text(page, feature_page(store, int(i)))
            n += 1
    return n


def rewrite_pages(folder: Path, scores: FeatureScores | None = None) -> int:
    """Rewrite a store's pages (``FOLDER/pages``: its index and the feature pages it already
    has) after something the pages show changed (new scores); returns the pages written, 0
    when the store has no pages."""
    pages = Path(folder) / "pages"
    if not (pages / "index.html").is_file() or not inside(folder, pages):
        return 0  # nothing is written through a pages folder that links out of the store
    store = FeatureStore.load(folder)
    done = sorted(int(p.stem) for p in (pages / "features").glob("*.html") if p.stem.isdigit())
    write_pages(store, pages, done or None, max_pages=len(done) or 1000, scores=scores)
    return len(done)
