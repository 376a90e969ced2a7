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
from llamascope_sdk.store.ownership import inside

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
    """Whether feature ``i`` has a usable record in the run ``folder`` (a truncated,
    malformed or misnamed one is not: the run writes it again)."""
    return read_record(feature_file(folder, i), i, folder)[0] is not None


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


def _bad_scores(scores: Any) -> str | None:
    if scores is None:
        return None
    if not isinstance(scores, dict):
        return "'scores' should be an object or null"
    for name, sc in scores.items():
        ba = sc.get("balanced_accuracy", "missing") if isinstance(sc, dict) else "missing"
        if ba is not None and (not isinstance(ba, int | float) or isinstance(ba, bool)
                               or not 0 <= ba <= 1):
            return f"scores.{name}.balanced_accuracy should be a number in [0, 1] or null"
    return None


def check_record(rec: Any, i: int, llm_free: bool = False) -> str | None:
    """Why ``rec`` cannot be used as feature ``i``'s record (None: it can): it must be an
    object whose ``feature`` is ``i`` and whose fields have the types the SDK writes."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, found a {type(rec).__name__}"
    f = rec.get("feature")
    if type(f) is not int or f != i:
        return f"its 'feature' field is {f!r}, not {i}"
    need = ("sae",) if llm_free else ("model",)
    for key in ("sae", "model", "prompt_version", "explanation", "note", "reply"):
        v = rec.get(key)
        if (v is not None or key in need) and not isinstance(v, str):
            return f"{key!r} should be a string{'' if key in need else ' or null'}, found {v!r}"[:200]
    if llm_free:
        tc = rec.get("token_change")
        rows = tc.get("tokens") if isinstance(tc, dict) else None
        if tc is not None and not (isinstance(rows, list) and all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                and isinstance(r[1], int | float) for r in rows)):
            return "'token_change' should hold 'tokens': a list of [text, number]"
        return None
    return _bad_scores(rec.get("scores"))


def read_record(path: Path, i: int, root: Path, llm_free: bool = False
                ) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a usable record of feature ``i`` at ``path``; (None, None) when
    there is none; (None, why) for one that is not used: a link leading out of ``root``,
    unreadable JSON (a truncated file), or a record :func:`check_record` refuses."""
    if not path.is_file() and not path.is_symlink():
        return None, None
    if not inside(root, path):
        return None, f"{path}: a link out of the store; not read"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{path}: not readable JSON ({str(exc)[:80]})"
    why = check_record(rec, i, llm_free)
    return (None, f"{path}: {why}") if why else (rec, None)


def explainer_folders(store_path: str | Path, problems: list[str] | None = None) -> list[Path]:
    """The explainer folders of a store; a link that leads out of the store is not read
    (``problems`` gets a line for it)."""
    store = Path(store_path)
    root = store / EXPLANATIONS
    if not root.is_dir():
        return []
    outside = [p for p in (root, *(sorted(root.iterdir()) if inside(store, root) else []))
               if not inside(store, p)]
    if problems is not None:
        problems += [f"{p}: a link out of the store; not read" for p in outside]
    if root in outside:
        return []
    return [p for p in sorted(root.iterdir()) if p not in outside and p.is_dir()
            and p.name != LLM_FREE and (p / CONFIG).is_file()]


def feature_explanations(store_path: str | Path | None, i: int) -> dict[str, Any]:
    """Everything known about feature ``i``'s meaning: ``{"explanations": [record, ...],
    "llm_free": record | None, "explanation_errors": [line, ...]}`` (records as written, one
    per explainer that has one; a record that cannot be used is left out and named, with why,
    in ``explanation_errors``)."""
    if store_path is None:
        return {"explanations": [], "llm_free": None, "explanation_errors": []}
    store = Path(store_path)
    problems: list[str] = []
    recs = []
    for f in explainer_folders(store, problems):
        rec, why = read_record(feature_file(f, i), i, store)
        problems += [why] if why else []
        if rec is not None and rec.get("explanation"):
            recs.append(rec)
    root = store / EXPLANATIONS
    free, why = (read_record(feature_file(root / LLM_FREE, i), i, store, llm_free=True)
                 if inside(store, root) else (None, None))  # outside: reported above
    problems += [why] if why else []
    return {"explanations": recs, "llm_free": free, "explanation_errors": problems}


def _rank(record: dict[str, Any]) -> float:
    scores = [s.get("balanced_accuracy") for s in (record.get("scores") or {}).values()]
    vals = [float(s) for s in scores if s is not None]
    return sum(vals) / len(vals) if vals else -1.0


def descriptions(store_path: str | Path | None,
                 problems: list[str] | None = None) -> dict[int, dict[str, Any]]:
    """The best explanation of every explained feature: per feature, the record whose mean
    balanced accuracy is highest (unscored records rank last; ties: explainer folder order).
    Records that cannot be used are left out (``problems`` gets a line for each)."""
    out: dict[int, dict[str, Any]] = {}
    if store_path is None:
        return out
    store = Path(store_path)
    for folder in explainer_folders(store, problems):
        feats = folder / "features"
        for path in sorted(feats.glob("*.json")) if feats.is_dir() else []:
            if not path.stem.isdigit():
                continue
            i = int(path.stem)
            rec, why = read_record(path, i, store)
            if why and problems is not None:
                problems.append(why)
            if rec is None or not rec.get("explanation"):
                continue
            if i not in out or _rank(rec) > _rank(out[i]):
                out[i] = rec
    return out


def label_text(record: dict[str, Any]) -> str:
    """A caption: the explanation, with its scores when it has any."""
    parts = [f"{k} {v['balanced_accuracy']:.2f}" for k, v in sorted((record.get("scores") or {}).items())
             if v.get("balanced_accuracy") is not None]
    text = str(record["explanation"])
    return f"{text} ({', '.join(parts)})" if parts else text
