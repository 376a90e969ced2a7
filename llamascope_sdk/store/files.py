"""The files of a feature store on disk: their layout, which folder a store may replace, the
output paths ``inspect`` checks before any work, and each file read back checked (JSON types,
tensor names and shapes), so that a bad file is one line naming it.

Layout, version 4 (F features; n: the examples kept, only where the feature fired; W, C:
window and context widths; R: random contexts; nnz: (context, feature) pairs; every integer
array in the narrowest signed type that holds it, widened to int64 when read)::

    manifest.json               written LAST; "version": 4, "example_spacing" (the rule that
                                keeps examples a window apart, :mod:`~llamascope_sdk.mining.spacing`)
    top.safetensors             indptr [F + 1]: feature i's examples are rows indptr[i]:indptr[i + 1],
                                best first; doc/pos [n]; the windows (W tokens) encoded by
                                :mod:`~llamascope_sdk.store.compact`: a token table of the covered
                                (document, position)s, each window's in-sequence range lo/hi [n]
                                and its few differing entries (fixes), activations sparse
                                (act_count [n], act_col/act_value [nnz], float32); the centre
                                activations are the values
    samples.safetensors         the same for the decile sample (rows of a feature sorted by
                                activation, highest first; context C) (optional)
    nonactivating.safetensors   the pool of random contexts: tokens [R, C] (-1 outside the
                                sequence), doc/pos/order [R]; fires_ptr [R + 1] and fires_feature
                                [nnz]: the features that fire somewhere in context j are
                                fires_feature[fires_ptr[j]:fires_ptr[j + 1]] (optional)
    feature_stats.safetensors   FeatureStats
    histogram.safetensors       counts [F, B] over edges [B - 1] (log-spaced, model units)
    logit_lens.safetensors      top/bottom token ids and logits [F, k] (optional)
    vocab.json                  token id -> text of every token id the arrays use
    feature_labels.json         labels known for the SAE (optional)
    pages/                      the HTML feature pages (optional)

So a store's size grows with the examples kept and the activations in their windows, not with
features x slots. Earlier versions are read, not written: version 3 kept, per example,
``values`` [n] float32, doc/pos int64, ``tokens`` [n, W] int32 and ``acts`` [n, W] float32
(8 bytes for every window entry; 40.8 MB for the demo on 4,000 tokens, 5.2 MB in version 4),
and int64 histogram counts and logit-lens ids; version 2 kept [F, K] and [F, K, W] arrays
with empty slots (``doc == -1``) and the pool's ``fires`` as an [F, R] uint8 table; version
1 had no decile sample or pool.

A folder is replaced only when it is provably an earlier store: its manifest says so (format
and kind) and every file in it is one the manifest lists, or an explanation record the SDK
added (``explanations/``). Anything else (a file, a folder of the user's, a store the user
added files to) is refused before any work; nothing in it is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from llamascope_sdk.base.atomic import check_replaceable
from llamascope_sdk.base.errors import (
    CorruptCheckpointError,
    FolderNotOwnedError,
    LlamascopeError,
    OutputPathError,
    StoreMismatchError,
)
from llamascope_sdk.base.fingerprint import differences, fingerprint, is_fingerprint
from llamascope_sdk.core.feature_stats import STATS_FILE, FeatureStats
from llamascope_sdk.mining.contexts import Contexts
from llamascope_sdk.mining.slots import Examples
from llamascope_sdk.store.compact import (
    EXAMPLE_KEYS,
    decode_examples,
    encode_examples,
    narrow,
    widen,
)
from llamascope_sdk.store.ownership import inside

FORMAT = "llamascope-feature-store"
KIND = "feature-store"
VERSION = 4
MANIFEST = "manifest.json"
#: Files every store has; the others (samples, logit lens, labels, pages/) are optional.
REQUIRED = ("top.safetensors", "histogram.safetensors", STATS_FILE, "vocab.json")
_OPTIONAL_DIRS = ("pages",)



class IncompleteStoreError(LlamascopeError, FileNotFoundError):
    """A folder that is not a complete feature store (no manifest: interrupted or not a store)."""


# ---------------------------------------------------------------------- ownership of the folder
def _own_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest when it is a feature store's (format and kind say so), else None."""
    try:
        meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if meta.get("kind", KIND) != KIND:  # stores written before "kind" existed carry only format
        return None
    return meta


#: Files the SDK adds to a store after mining: explanations (``llamascope explain``, see
#: explain/records.py) and the temporary files of their atomic writes. They describe the mined
#: examples, so they go when the store is mined again.
_ADDED = re.compile(r"explanations/[A-Za-z0-9._-]+/(config\.json|features/\d+\.json"
                    r"|(features/)?\.[^/]+\.tmp)")


def _foreign_entries(folder: Path, meta: dict[str, Any]) -> list[str]:
    """Entries under ``folder`` that the store did not write: not listed in its manifest and
    not an SDK-added file (:data:`_ADDED`)."""
    listed = {f for f in meta.get("files", []) if isinstance(f, str)} | {MANIFEST}
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() and not p.is_symlink():
            if rel.split("/")[0] in (*_OPTIONAL_DIRS, "explanations") \
                    or any(f.startswith(rel + "/") for f in listed):
                continue
            out.append(rel + "/")
        elif rel not in listed and not _ADDED.fullmatch(rel):
            out.append(rel)
    return out


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def replaceable_store(folder: Path) -> None:
    """Accept (for :func:`~llamascope_sdk.base.atomic.write_folder`) a folder that is an earlier
    feature store holding only the files its manifest lists; raise otherwise."""
    entries = sorted(p.name for p in folder.iterdir())
    meta = _own_manifest(folder)
    if meta is None:
        raise FolderNotOwnedError(
            f"{folder} is not a feature store ({len(entries)} entries, e.g. "
            f"{', '.join(entries[:3])}): only an empty folder or an earlier feature store is "
            "replaced", hint="choose a new or empty folder for --out")
    foreign = _foreign_entries(folder, meta)
    if foreign:
        raise FolderNotOwnedError(
            f"{folder} is a feature store but also holds files it did not write "
            f"({', '.join(foreign[:3])}); replacing it would delete them",
            hint="move those files out, or choose another --out")


def check_store_target(folder: str | Path, sae: Any = None) -> Path:
    """Check that a store may be written at ``folder``, before any work: it is new (and can be
    created), empty, or an earlier feature store holding only the files it wrote. With ``sae``,
    an earlier store must also be that SAE's (same weights' fingerprint; for stores from before
    fingerprints, the same name): one SAE's store never replaces another's.

    Raises:
        FolderNotOwnedError: a file, a folder the SDK did not write, or a store with files
            added (nothing in it is touched).
        StoreMismatchError: the store of another SAE.
        OutputPathError: a place that cannot be written.
    """
    folder = check_output_folder(check_replaceable(folder, replaceable_store))
    meta = _own_manifest(folder) if sae is not None and folder.is_dir() else None
    if meta is not None:
        old: Any = meta.get("fingerprint")
        diff = (differences(old, fingerprint(sae)) if is_fingerprint(old)
                else [] if meta.get("sae") == sae.name else ["another name"])
        if diff:
            raise StoreMismatchError(
                f"{folder} holds the feature store of SAE {meta.get('sae')!r} ({'; '.join(diff)}); "
                f"a store of {sae.name!r} does not replace it",
                hint="choose another --out, or delete that folder first")
    return folder


def check_output_folder(folder: str | Path) -> Path:
    """Check that ``folder`` is a folder (or can be created as one) whose entries can be
    written, renamed and replaced; it is not created.

    Raises:
        OutputPathError: a file, a path through a file, or no write permission.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{folder} is a file, not a folder", hint="choose a folder")
    parent = folder.parent if folder.exists() else _nearest_existing(folder.parent)
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {folder}: {parent} is a file, not a folder")
    for place in (parent, folder) if folder.exists() else (parent,):
        if not os.access(place, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write {folder}: no write permission in {place}",
                                  hint="choose a folder you can write, e.g. under your home")
    # Permission bits do not tell everything (root, read-only or special file systems such as
    # /proc): create and remove an empty probe folder where the output will be created.
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".llamascope-probe-"))
    except OSError as exc:
        raise OutputPathError(f"cannot write {folder}: {parent}: {exc.strerror or exc}",
                              hint="choose a folder you can write, e.g. under your home") from None
    return folder


#: Files that make a folder an SAE's (the release layout, SAELens): statistics written there
#: must be of that SAE.
_SAE_FILES = ("hyperparams.json", "cfg.json")


def check_stats_target(folder: str | Path, sae: Any = None) -> Path:
    """Where ``--save-stats-to FOLDER`` writes: ``FOLDER/feature_stats.safetensors``, checked
    and the folder created before any work. An existing statistics file is replaced only when
    the SDK wrote it (a feature-stats safetensors file); any other file there is refused. With
    ``sae`` (once it is loaded, still before mining): the folder must not be another SAE's
    folder, and a statistics file there must have ``sae``'s width.

    Raises:
        OutputPathError: ``folder`` is a file (or a file name), or not writable, or holds a
            ``feature_stats.safetensors`` the SDK did not write, or belongs to another SAE.
    """
    target = _stats_target(Path(folder).expanduser())
    if sae is not None:
        own = getattr(getattr(sae, "source", None), "path", None)
        here = target.parent.resolve()
        if any((here / f).is_file() for f in _SAE_FILES) and (own is None or Path(own).resolve() != here):
            raise OutputPathError(
                f"{target.parent} is the folder of another SAE than {sae.name!r}: its "
                "statistics would describe the wrong weights",
                hint="give the mined SAE's own folder, or a new one")
        if target.is_file():
            old = FeatureStats.load(target)
            if old.d_sae != sae.d_sae:
                raise OutputPathError(
                    f"{target} holds statistics of {old.d_sae} features, not of {sae.name!r} "
                    f"({sae.d_sae}): they belong to another SAE and are not overwritten",
                    hint="give the mined SAE's own folder, or a new one")
    return target


def _stats_target(folder: Path) -> Path:
    if not folder.exists() and folder.suffix in (".safetensors", ".json", ".txt", ".pt", ".bin"):
        raise OutputPathError(f"--save-stats-to takes a folder (it writes {STATS_FILE} into "
                              f"it); {folder} looks like a file name",
                              hint="give the folder, e.g. the SAE's own local folder")
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"--save-stats-to takes a folder (it writes {STATS_FILE} into "
                              f"it); {folder} is a file", hint="give the folder that should hold it")
    check_output_folder(folder)
    target = folder / STATS_FILE
    if target.is_symlink() or (target.exists() and not _is_stats_file(target)):
        raise OutputPathError(f"{target} exists and was not written by llamascope-sdk (not a "
                              "feature statistics file); it is not overwritten",
                              hint="move it away, or choose another --save-stats-to folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create {folder}: {exc.strerror or exc}") from None
    return target


def _is_stats_file(path: Path) -> bool:
    try:
        FeatureStats.load(path)
    except (LlamascopeError, OSError, ValueError):
        return False
    return True


def remove_leftovers(folder: Path) -> None:
    """Remove temporary siblings of killed runs (older than a minute): the SDK's own names."""
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.*.tmp", f".{folder.name}.*.old"):
        for old in folder.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if old.is_dir() and time.time() - old.stat().st_mtime > 60:
                    shutil.rmtree(old)


# ---------------------------------------------------------------------- reading files, checked
def read_manifest(folder: Path) -> dict[str, Any]:
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise IncompleteStoreError(
            f"{folder} is not a complete feature store (no {MANIFEST}): it is not a store, "
            "or the mining run that writes it did not finish",
            hint="rerun `llamascope inspect ... --out` to mine it again")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"{mpath}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{mpath}: expected a JSON object (the store's manifest), "
                                     f"found a {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("kind", KIND) != KIND or meta.get("complete") is not True:
        raise IncompleteStoreError(f"{mpath} is not the manifest of a complete feature store",
                                   hint="rerun `llamascope inspect` to mine it again")
    version = meta.get("version")
    if not isinstance(version, int):
        raise CorruptCheckpointError(f"{mpath}: \"version\" should be an integer, found {version!r}")
    if version > VERSION:
        raise CorruptCheckpointError(f"{folder}: store version {version} is newer than this SDK "
                                     f"reads ({VERSION})", hint="upgrade llamascope-sdk")
    expect: dict[str, tuple[type, ...]] = {"d_sae": (int,), "window_before": (int,),
                                           "histogram_edges": (list,), "files": (list,), "sae": (str,)}
    for key, types in expect.items():
        value = meta.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            want = " or ".join({int: "an integer", list: "a list", str: "a string"}[t] for t in types)
            raise CorruptCheckpointError(f"{mpath}: {key!r} should be {want}, found {value!r}"[:300])
    if meta["d_sae"] < 1 or meta["window_before"] < 0:
        raise CorruptCheckpointError(f"{mpath}: d_sae must be >= 1 and window_before >= 0")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in meta["histogram_edges"]):
        raise CorruptCheckpointError(f"{mpath}: 'histogram_edges' should be a list of numbers")
    if not all(isinstance(x, str) for x in meta["files"]):
        raise CorruptCheckpointError(f"{mpath}: 'files' should be a list of file names")
    if "fingerprint" in meta and not is_fingerprint(meta["fingerprint"]):
        raise CorruptCheckpointError(f"{mpath}: \"fingerprint\" is not a weights fingerprint")
    return meta


def read_tensors(path: Path, shapes: dict[str, tuple[int | None, ...]]) -> dict[str, torch.Tensor]:
    """Load a safetensors file and check its tensors' names and shapes (None: any size)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    for name, shape in shapes.items():
        if name not in t:
            raise CorruptCheckpointError(f"{path}: no tensor {name!r}; expected {sorted(shapes)}")
        got = tuple(t[name].shape)
        if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape, strict=True)):
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has shape {list(got)}, expected {want}")
    return t


T = TypeVar("T")


def read_optional(folder: Path, meta: dict[str, Any], problems: list[str], name: str,
                  read: Callable[[Path], T]) -> T | None:
    """An optional file of a store, read by ``read``: None when it is absent, or when it is
    bad (a link out of the store, missing though the manifest lists it, or refused by
    ``read``), with a line naming it and why in ``problems``: the store works without it."""
    path = folder / name
    if not path.exists() and not path.is_symlink():
        if name in meta.get("files", []):
            problems.append(f"{path}: listed in the manifest but missing; not used")
        return None
    if not inside(folder, path):
        problems.append(f"{path}: a link out of the store; not used")
        return None
    try:
        return read(path)
    except (CorruptCheckpointError, OSError) as exc:
        problems.append(f"{exc}; not used")
        return None


def check_finite(path: Path, tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """Refuse NaN or infinite values in the float tensors ``names`` of ``path``."""
    for name in names:
        bad = ~torch.isfinite(tensors[name])
        if bool(bad.any()):
            where = [int(i) for i in bad.nonzero()[0].tolist()]
            raise CorruptCheckpointError(f"{path}: tensor {name!r} holds "
                                         f"{float(tensors[name][tuple(where)])} at {where}; "
                                         "values are finite")


def read_vocab(path: Path) -> dict[int, str]:
    want = "a JSON object of token id -> text"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"{path}: not readable JSON ({exc}); expected {want}") from None
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{path}: expected {want}, found a {type(raw).__name__}")
    vocab = {}
    for k, v in raw.items():
        if not isinstance(v, str) or not k.lstrip("-").isdigit():
            raise CorruptCheckpointError(f"{path}: expected {want}, found {k!r}: {v!r}"[:300])
        vocab[int(k)] = v
    return vocab



# ---------------------------------------------------------------------- examples, both versions
def example_tensors(e: Examples) -> dict[str, torch.Tensor]:
    """What ``top.safetensors`` / ``samples.safetensors`` hold (version 4,
    :mod:`~llamascope_sdk.store.compact`)."""
    return encode_examples(e)


_CONTEXT_INTS = ("tokens", "doc", "pos", "order", "fires_ptr", "fires_feature")


def context_tensors(c: Contexts) -> dict[str, torch.Tensor]:
    """What ``nonactivating.safetensors`` holds (version 4: version 3's tensors, each in the
    narrowest integer type that holds it)."""
    return {k: narrow(v) for k, v in zip(_CONTEXT_INTS, (c.tokens, c.doc, c.pos, c.order,
                                                         c.fires_ptr, c.feature), strict=True)}


def _check_ptr(path: Path, ptr: torch.Tensor, n: int, what: str) -> None:
    if int(ptr[0]) != 0 or int(ptr[-1]) != n or bool((ptr[1:] < ptr[:-1]).any()):
        raise CorruptCheckpointError(f"{path}: {what} is not a rising index from 0 to {n}")


def read_examples(path: Path, f: int, center: int, version: int) -> Examples:
    """Examples from ``path``: compact (version 4), ragged (version 3) or [F, K] slots
    (earlier), checked."""
    if version >= 4:
        t = read_tensors(path, {k: (None,) for k in EXAMPLE_KEYS})
        check_finite(path, t, ("act_value", "values") if "values" in t else ("act_value",))
        return decode_examples(path, t, f, center)
    if version < 3:
        t = read_tensors(path, {"values": (f, None), "doc": (f, None), "pos": (f, None),
                                "tokens": (f, None, None), "acts": (f, None, None)})
        n, w = t["values"].shape[1], t["tokens"].shape[2]
        want = {"doc": (f, n), "pos": (f, n), "tokens": (f, n, w), "acts": (f, n, w)}
    else:
        t = read_tensors(path, {"indptr": (f + 1,), "values": (None,), "doc": (None,),
                                "pos": (None,), "tokens": (None, None), "acts": (None, None)})
        n, w = t["values"].shape[0], t["tokens"].shape[1]
        want = {"doc": (n,), "pos": (n,), "tokens": (n, w), "acts": (n, w)}
        _check_ptr(path, t["indptr"], n, "indptr")
    for key, shape in want.items():
        if tuple(t[key].shape) != shape:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} has shape "
                                         f"{list(t[key].shape)}, expected {list(shape)}")
    if not 0 <= center < w:
        raise CorruptCheckpointError(f"{path.parent / MANIFEST}: the window centre {center} does "
                                     f"not fit the {w}-token windows of {path.name}")
    check_finite(path, t, ("values", "acts"))
    if version < 3:
        return Examples.from_dense(t["values"], t["doc"], t["pos"], t["tokens"].long(),
                                   t["acts"], center)
    return Examples(t["indptr"], t["values"], t["doc"], t["pos"], t["tokens"].long(), t["acts"],
                    center)


def read_contexts(path: Path, f: int, center: int, version: int) -> Contexts:
    """The pool of random contexts from ``path`` (version 2 or 3), checked."""
    shapes: dict[str, tuple[int | None, ...]] = {"tokens": (None, None), "doc": (None,),
                                                 "pos": (None,), "order": (None,)}
    shapes |= {"fires": (f, None)} if version < 3 else {"fires_ptr": (None,), "fires_feature": (None,)}
    t = read_tensors(path, shapes)
    widen(path, t, tuple(k for k in _CONTEXT_INTS if k in t))
    r, w = t["tokens"].shape
    ok = all(t[k].shape[0] == r for k in ("doc", "pos", "order")) and 0 <= center < max(w, 1)
    ok = ok and (t["fires"].shape[1] == r if version < 3 else t["fires_ptr"].shape[0] == r + 1)
    if not ok:
        raise CorruptCheckpointError(f"{path}: its tensors do not describe one pool of {r} contexts")
    if version < 3:
        return Contexts.from_dense(t["tokens"].long(), t["doc"], t["pos"], t["order"],
                                   t["fires"].bool(), center)
    _check_ptr(path, t["fires_ptr"], t["fires_feature"].shape[0], "fires_ptr")
    feat = t["fires_feature"].long()
    if feat.numel() and (int(feat.min()) < 0 or int(feat.max()) >= f):
        raise CorruptCheckpointError(f"{path}: fires_feature holds features outside 0..{f - 1}")
    return Contexts(t["tokens"].long(), t["doc"], t["pos"], t["order"], t["fires_ptr"], feat, center)



__all__ = ["FORMAT", "IncompleteStoreError", "KIND", "MANIFEST", "REQUIRED", "VERSION",
           "check_finite", "check_output_folder", "check_stats_target", "check_store_target",
           "context_tensors", "example_tensors", "read_contexts", "read_examples",
           "read_manifest", "read_optional", "read_tensors", "read_vocab", "remove_leftovers",
           "replaceable_store"]
