"""Explanations on disk, beside the feature store they explain.

Layout (one folder per explainer, so explanations by several models live side by side)::

    STORE/explanations/<explainer>/config.json         model, prompt version, protocol
    STORE/explanations/<explainer>/features/<i>.json   one record per feature, written whole
    STORE/explanations/llm-free/features/<i>.json      VocabProj and TokenChange (no LLM)

``<explainer>`` is the model name with anything but letters, digits, ``.``, ``_`` and ``-``
replaced by ``_``. Every file is written atomically (:mod:`~llamascope_sdk.base.atomic`) and holds
no time stamps, so a run that was killed and resumed writes the same bytes as one that was
not. Re-mining a store replaces its folder, and the explanations with it (they describe the
old examples).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import atomic_write_text
from llamascope_sdk.base.errors import InputError

EXPLANATIONS = "explanations"
LLM_FREE = "llm-free"
CONFIG = "config.json"


def slug(model: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")
    return s or "model"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def run_folder(store_path: str | Path, model: str) -> Path:
    return Path(store_path) / EXPLANATIONS / slug(model)


def feature_file(folder: Path, i: int) -> Path:
    return folder / "features" / f"{int(i)}.json"


def is_done(folder: Path, i: int) -> bool:
    return feature_file(folder, i).is_file()


def write_feature(folder: Path, i: int, record: dict[str, Any]) -> Path:
    path = feature_file(folder, i)
    atomic_write_text(path, dumps(record))
    return path


def claim_folder(folder: Path, config: dict[str, Any]) -> None:
    """Write ``config.json``, or check that the one there has the same settings (resuming
    with other settings would mix two protocols in one folder). Removes the temporary files
    a killed run left in ``features/``."""
    path = folder / CONFIG
    feats = folder / "features"
    for tmp in feats.glob(".*.json.*.tmp") if feats.is_dir() else []:
        tmp.unlink(missing_ok=True)  # left by a killed run (atomic.py's temporary files)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise InputError(f"{folder} holds explanations made with other settings "
                             f"({', '.join(diff)} differ); rerun with the same settings to "
                             "resume, or pass --out ANOTHER_FOLDER")
        return
    atomic_write_text(path, dumps(config))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def explainer_folders(store_path: str | Path) -> list[Path]:
    root = Path(store_path) / EXPLANATIONS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != LLM_FREE
                  and (p / CONFIG).is_file())


def feature_explanations(store_path: str | Path | None, i: int) -> dict[str, Any]:
    """Everything known about feature ``i``'s meaning: ``{"explanations": [record, ...],
    "llm_free": record | None}`` (records as written, one per explainer that has one)."""
    if store_path is None:
        return {"explanations": [], "llm_free": None}
    recs = [r for f in explainer_folders(store_path)
            if (r := _read(feature_file(f, i))) is not None and r.get("explanation")]
    free = _read(feature_file(Path(store_path) / EXPLANATIONS / LLM_FREE, i))
    return {"explanations": recs, "llm_free": free}


def _rank(record: dict[str, Any]) -> float:
    scores = [s.get("balanced_accuracy") for s in (record.get("scores") or {}).values()]
    vals = [float(s) for s in scores if s is not None]
    return sum(vals) / len(vals) if vals else -1.0


def descriptions(store_path: str | Path | None) -> dict[int, dict[str, Any]]:
    """The best explanation of every explained feature: per feature, the record whose mean
    balanced accuracy is highest (unscored records rank last; ties: explainer folder order)."""
    out: dict[int, dict[str, Any]] = {}
    if store_path is None:
        return out
    for folder in explainer_folders(store_path):
        feats = folder / "features"
        for path in sorted(feats.glob("*.json")) if feats.is_dir() else []:
            rec = _read(path)
            if rec is None or not rec.get("explanation") or not path.stem.isdigit():
                continue
            i = int(path.stem)
            if i not in out or _rank(rec) > _rank(out[i]):
                out[i] = rec
    return out


def label_text(record: dict[str, Any]) -> str:
    """A caption: the explanation, with its scores when it has any."""
    parts = [f"{k} {v['balanced_accuracy']:.2f}" for k, v in sorted((record.get("scores") or {}).items())
             if v.get("balanced_accuracy") is not None]
    text = str(record["explanation"])
    return f"{text} ({', '.join(parts)})" if parts else text
