"""What a benchmark run writes: one SAEBench-format JSON per SAE and metric, one comparison
table (Markdown) and one plot (PNG) across the SAEs of the run.

The JSON files follow SAEBench's eval output schemas (``eval_output_schema_<type>.json`` of
the sae-bench package, 0.6.0): ``core``, ``sparse_probing`` (written with the eval type id of
SAEBench's sae-probes wrapper, ``sparse_probing_sae_probes``, and its extra AUC and F1
fields), ``absorption_first_letter`` and ``autointerp``. Headline numbers are means over the
seeds; every spread (mean, std, n_seeds, values) is in ``eval_result_unstructured.spreads``,
with the protocol notes. A metric whose required numbers could not be computed (for example
absorption when no letter passes the probe-F1 gate) gets no SAEBench file: a SAEBench file
never carries a number that was not measured; the table says why instead.

The table marks, for every SAE after the first, whether its difference from the first is
within the noise (:func:`~llamascope_sdk.benchmark.spread.within_noise`).
"""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import atomic_write_bytes, atomic_write_text
from llamascope_sdk.base.jsonsafe import json_safe
from llamascope_sdk.benchmark.spread import Spread, within_noise


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llamascope-sdk")
    except PackageNotFoundError:
        return "unknown"


#: The commit field SAEBench requires: these numbers were not produced by SAEBench's code.
COMMIT = f"not SAEBench: llamascope-sdk {_version()} (llamascope bench)"
EVAL_TYPES = {"core": "core", "probing": "sparse_probing_sae_probes",
              "absorption": "absorption_first_letter", "autointerp": "autointerp"}
#: The schema file each eval type validates against (in sae-bench's ``evals/`` folder).
SCHEMA_FILES = {"core": "core/eval_output_schema_core.json",
                "sparse_probing_sae_probes": "sparse_probing/eval_output_schema_sparse_probing.json",
                "absorption_first_letter":
                    "absorption/eval_output_schema_absorption_first_letter.json",
                "autointerp": "autointerp/eval_output_schema_autointerp.json"}


@dataclass
class MetricOutput:
    """One SAE, one metric: SAEBench's three parts, the spreads and the headline numbers."""

    metric: str
    config: dict[str, Any]
    metrics: dict[str, dict[str, Any]]  # eval_result_metrics (category -> name -> value)
    details: list[dict[str, Any]]
    spreads: dict[str, Spread]
    notes: list[str] = field(default_factory=list)
    headline: tuple[str, ...] = ()

    def complete(self) -> bool:
        """Every headline number is finite (otherwise no SAEBench file is written)."""
        return all(math.isfinite(self.spreads[h].mean) for h in self.headline)


def saebench_json(out: MetricOutput, sae_name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The SAEBench eval output document of ``out``."""
    return json_safe({
        "eval_type_id": EVAL_TYPES[out.metric], "eval_config": out.config,
        "eval_id": str(uuid.uuid4()), "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": out.metrics, "eval_result_details": out.details,
        "sae_bench_commit_hash": COMMIT, "sae_lens_id": sae_name, "sae_lens_release_id": None,
        "sae_lens_version": None, "sae_cfg_dict": dict(cfg),
        "eval_result_unstructured": {"spreads": {k: s.as_dict() for k, s in out.spreads.items()},
                                     "notes": out.notes}})


def write_jsons(folder: Path, sae_name: str, cfg: Mapping[str, Any],
                outputs: Sequence[MetricOutput]) -> list[Path]:
    """``<folder>/<eval type>.json`` for each complete output; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for o in outputs:
        if not o.complete():
            continue
        path = folder / f"{EVAL_TYPES[o.metric]}.json"
        atomic_write_text(path, json.dumps(saebench_json(o, sae_name, cfg), indent=2))
        written.append(path)
    return written


def table(results: Mapping[str, Sequence[MetricOutput]]) -> str:
    """The comparison table: one row per headline metric, one column per SAE, and for each
    SAE after the first whether it differs from the first beyond the noise."""
    names = list(results)
    head = ["metric", *names] + [f"{n} vs {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[str, dict[str, Spread]] = {}
    missing: dict[str, dict[str, str]] = {}
    for n, outs in results.items():
        for o in outs:
            for h in o.headline:
                rows.setdefault(f"{o.metric}: {h}", {})[n] = o.spreads[h]
                if not math.isfinite(o.spreads[h].mean):
                    missing.setdefault(f"{o.metric}: {h}", {})[n] = "; ".join(o.notes[:1])
    for key, by in rows.items():
        cells = [("no number" if not math.isfinite(by[n].mean) else by[n].text())
                 if n in by else "not run" for n in names]
        for n in names[1:]:
            if n not in by or names[0] not in by or not (
                    math.isfinite(by[n].mean) and math.isfinite(by[names[0]].mean)):
                cells.append("")
                continue
            same = within_noise(by[n], by[names[0]])
            d = by[n].mean - by[names[0]].mean
            verdict = {None: "one seed: noise unknown", True: "within noise",
                       False: "differs"}[same]
            cells.append(f"{d:+.3f} ({verdict})")
        lines.append("| " + " | ".join([key, *cells]) + " |")
    notes = {f"{n}: {note}" for why in missing.values() for n, note in why.items()}
    lines += [f"\nno number for {note}" for note in sorted(notes)]
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Sequence[MetricOutput]], path: Path) -> Path | None:
    """One PNG: a panel per headline metric, a bar per SAE with its std as the error bar.
    None when matplotlib is missing (the table and JSON are still written)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    keys: list[str] = []
    for outs in results.values():
        for o in outs:
            keys += [f"{o.metric}: {h}" for h in o.headline if f"{o.metric}: {h}" not in keys]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    FigureCanvasAgg(fig)
    names = list(results)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        metric, h = key.split(": ", 1)
        vals = [next((o.spreads[h] for o in results[n] if o.metric == metric), None)
                for n in names]
        xs = [j for j, v in enumerate(vals) if v is not None and math.isfinite(v.mean)]
        ax.bar(xs, [vals[j].mean for j in xs], yerr=[vals[j].std for j in xs],  # type: ignore[union-attr]
               color="#4c72b0", capsize=3)
        ax.set_xticks(range(len(names)), [n[:14] for n in names], fontsize=7, rotation=20)
        ax.set_title(key, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    n_seeds = {s.n for outs in results.values() for o in outs for s in o.spreads.values()}
    fig.suptitle(f"llamascope bench: mean ± std over seeds (n = {sorted(n_seeds)})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


__all__ = ["COMMIT", "EVAL_TYPES", "SCHEMA_FILES", "MetricOutput", "plot", "saebench_json",
           "table", "write_jsons"]
