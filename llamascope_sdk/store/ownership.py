"""Whose files these are: a writer of scores, labels or explanations checks that they belong
to the SAE it writes for, and a reader of a store's optional files never follows a link out of
the store.

Scores (``score-features``), explanations (``explain``), LLM-free descriptions and labels
(``explain --save-labels-to``) describe one SAE's features by index; written beside another
SAE's weights or into another SAE's store they would be shown as that SAE's (``steer``
captions, ``show``, pages). Every writer compares the weights' fingerprints
(:mod:`~llamascope_sdk.base.fingerprint`), as ``search --store`` does, and refuses a mismatch
with one line naming both SAEs (:class:`~llamascope_sdk.base.errors.StoreMismatchError`),
before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import SaeNotFoundError, StoreMismatchError
from llamascope_sdk.base.fingerprint import differences, fingerprint, is_fingerprint
from llamascope_sdk.loading.locate import locate
from llamascope_sdk.loading.sae import SAE

MANIFEST = "manifest.json"


def inside(root: str | Path, path: str | Path) -> bool:
    """Whether ``path``, links resolved, lies inside ``root`` (links resolved too): a file or
    folder of a store that is a link leaving the store is not the store's."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def enclosing_store(path: str | Path) -> Path | None:
    """The feature store folder that holds ``path`` (``path`` itself or a parent with a
    feature store's manifest), or None."""
    p = Path(path).expanduser().absolute()
    for folder in (p, *p.parents):
        meta = _manifest(folder)
        if meta is not None:
            return folder
    return None


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("format") == "llamascope-feature-store"
    return meta if ok else None


def _store_fingerprint(folder: Path) -> tuple[str, Any]:
    meta = _manifest(folder) or {}
    return str(meta.get("sae")), meta.get("fingerprint")


def check_same_sae(fp_here: Any, name_here: str, fp_new: Any, name_new: str, where: str,
                   what: str) -> None:
    """Refuse to write ``what`` of SAE ``name_new`` (fingerprint ``fp_new``) at ``where``,
    which belongs to SAE ``name_here`` (``fp_here``), unless the fingerprints match (without
    fingerprints on either side: the names)."""
    if is_fingerprint(fp_here) and is_fingerprint(fp_new):
        diff = differences(fp_here, fp_new)
    else:
        diff = [] if name_here == name_new else [f"names {name_here!r} vs {name_new!r}"]
    if diff:
        raise StoreMismatchError(
            f"{where} belongs to SAE {name_here!r}, not to {name_new!r} ({'; '.join(diff)}): "
            f"{what} of {name_new!r} are not written there",
            hint="write them for the SAE they were made with, or choose another folder")


def check_writes_into_store(target: str | Path, sae_name: str, sae_fingerprint: Any,
                            what: str) -> None:
    """``target`` (a file or folder to write) lies in no feature store, or in the store of
    the SAE ``sae_name`` with fingerprint ``sae_fingerprint``."""
    store = enclosing_store(target)
    if store is not None:
        name, fp = _store_fingerprint(store)
        check_same_sae(fp, name, sae_fingerprint, sae_name, f"the feature store {store}", what)


def check_labels_target(folder: str | Path, store: Any) -> None:
    """``explain --save-labels-to FOLDER``: the labels of ``store``'s SAE go to a folder that
    is no SAE's and no store's, or that SAE's own folder or store (fingerprints compared; the
    SAE in a folder is loaded on the CPU to take its fingerprint).

    Raises:
        StoreMismatchError: ``folder`` holds another SAE, or another SAE's feature store.
    """
    folder = Path(folder).expanduser()
    fp, name = store.meta.get("fingerprint"), store.name
    check_writes_into_store(folder, name, fp, "labels")
    if not folder.is_dir() or enclosing_store(folder) is not None:
        return
    try:
        locate(folder)
    except SaeNotFoundError:
        return  # no SAE there: the labels are the only thing naming one
    here = SAE.from_pretrained(str(folder), device="cpu")
    check_same_sae(fingerprint(here), here.name, fp, name, f"{folder} (an SAE folder)",
                   "labels")


__all__ = ["check_labels_target", "check_same_sae", "check_writes_into_store",
           "enclosing_store", "inside"]
