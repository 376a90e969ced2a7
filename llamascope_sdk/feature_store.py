"""The on-disk feature store: what mining found for one SAE, reloadable without the model.

A store is a folder::

    manifest.json               written LAST; a folder without it (or not "complete") is refused
    top.safetensors             values/doc/pos [F, N], tokens/acts [F, N, W]: top-N contexts
    samples.safetensors         the same for the decile sample [F, S, C], sorted by activation
                                (optional)
    nonactivating.safetensors   the pool of random contexts: tokens [R, C], doc/pos/order [R],
                                fires [F, R] uint8 (1: the feature fires somewhere in it) (optional)
    feature_stats.safetensors   FeatureStats (the file relative steering and mean ablation read)
    histogram.safetensors       counts [F, B] over edges [B - 1] (log-spaced, model units)
    logit_lens.safetensors      top/bottom token ids and logits [F, k] (optional)
    vocab.json                  token id -> text of every token id the arrays use
    feature_labels.json         labels known for the SAE (optional)
    pages/                      the HTML feature pages (optional; deleting them is fine)

The manifest names the format and kind (``"format": "llamascope-feature-store"``, ``"kind":
"feature-store"``), every file of the store, and a fingerprint of the SAE's weights
(:mod:`~llamascope_sdk.fingerprint`) so a store is never used with another SAE.

Versions: 1 (no decile sample, no non-activating contexts; 16 samples of 21 tokens) and 2
(this layout). A version-1 store still loads for ``show`` and pages; asking it for decile or
non-activating examples raises :class:`StoreVersionError` with the command that re-mines it.
A newer version than this SDK knows is refused.

Safetensors for arrays and JSON for metadata, never pickle. The folder is written whole in one
step (:func:`~llamascope_sdk.atomic.write_folder`), so an interrupted run leaves the previous
store (or nothing), never a mix. A folder is replaced only when it is provably an earlier
store: its manifest says so and every file in it is one the manifest lists. Anything else (a
file, a folder of the user's, a store the user added files to) is refused before any work.

To make relative steering (``--relative``) and mean ablation work on the mined SAE::

    sae = SAE.from_pretrained("L15R-8x")
    sae.stats = FeatureStats.load(store_folder)      # feature_stats.safetensors inside it

What is shown about a feature (summary, examples, steer command) is in
:mod:`~llamascope_sdk.feature_view`.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_save_safetensors, atomic_write_text, check_replaceable, write_folder
from .corpus import RULES
from .errors import (
    CorruptCheckpointError,
    FeatureIndexError,
    FolderNotOwnedError,
    LlamascopeError,
    OutputPathError,
    StoreMismatchError,
)
from .feature_stats import LABELS_FILE, STATS_FILE, FeatureStats, read_labels, write_labels
from .fingerprint import differences, fingerprint, is_fingerprint
from .logit_lens import APPROXIMATION, LogitLens
from .metrics import DENSE_FREQUENCY
from .mining import HIST_EDGES, Contexts, Examples, MiningResult
from .mining_state import sample_priority
from .paths import cache_root

FORMAT = "llamascope-feature-store"
KIND = "feature-store"
VERSION = 2
MANIFEST = "manifest.json"
#: Files every store has; the others (samples, logit lens, labels, pages/) are optional.
REQUIRED = ("top.safetensors", "histogram.safetensors", STATS_FILE, "vocab.json")
_OPTIONAL_DIRS = ("pages",)


class StoreVersionError(LlamascopeError, ValueError):
    """A store written by an older SDK lacks what was asked for (it must be mined again)."""


class IncompleteStoreError(LlamascopeError, FileNotFoundError):
    """A folder that is not a complete feature store (no manifest: interrupted or not a store)."""


def default_store_dir(sae_name: str) -> Path:
    """Where ``llamascope inspect`` writes a store when no --out is given:
    ``$LLAMASCOPE_CACHE/features/<sae name>``."""
    return cache_root() / "features" / sae_name.replace("/", "_")


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


def _replaceable_store(folder: Path) -> None:
    """Accept (for :func:`~llamascope_sdk.atomic.write_folder`) a folder that is an earlier
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
    folder = check_output_folder(check_replaceable(folder, _replaceable_store))
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


def check_stats_target(folder: str | Path) -> Path:
    """Where ``--save-stats-to FOLDER`` writes: ``FOLDER/feature_stats.safetensors``, checked
    and the folder created before any work. An existing statistics file is replaced only when
    the SDK wrote it (a feature-stats safetensors file); any other file there is refused.

    Raises:
        OutputPathError: ``folder`` is a file (or a file name), or not writable, or holds a
            ``feature_stats.safetensors`` the SDK did not write.
    """
    folder = Path(folder).expanduser()
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


def _remove_leftovers(folder: Path) -> None:
    """Remove temporary siblings of killed runs (older than a minute): the SDK's own names."""
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.*.tmp", f".{folder.name}.*.old"):
        for old in folder.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if old.is_dir() and time.time() - old.stat().st_mtime > 60:
                    shutil.rmtree(old)


# ---------------------------------------------------------------------- reading files, checked
def _manifest(folder: Path) -> dict[str, Any]:
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
    if "fingerprint" in meta and not is_fingerprint(meta["fingerprint"]):
        raise CorruptCheckpointError(f"{mpath}: \"fingerprint\" is not a weights fingerprint")
    return meta


def _tensors(path: Path, shapes: dict[str, tuple[int | None, ...]]) -> dict[str, torch.Tensor]:
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


def _vocab(path: Path) -> dict[int, str]:
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


@dataclass
class FeatureStore:
    """Mined features of one SAE, in memory (from :meth:`from_result` or :meth:`load`)."""

    meta: dict[str, Any]
    top: Examples
    samples: Examples | None
    stats: FeatureStats
    hist: torch.Tensor  # [F, B] int64
    lens: LogitLens | None
    vocab: dict[int, str]
    labels: dict[int, str] = field(default_factory=dict)
    path: Path | None = None
    contexts: Contexts | None = None  # the pool of random contexts (non-activating examples)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_result(cls, result: MiningResult, tokenizer: Any, *, model: Any = None,
                    lens_k: int = 10, sae_spec: str | None = None, corpus: str | None = None,
                    model_name: str | None = None, n_bands: int = 4) -> FeatureStore:
        """Wrap a :class:`~llamascope_sdk.mining.MiningResult`; with ``model``, add the logit
        lens. ``sae_spec`` is how a user names the SAE on the command line (for steer
        commands; default its name)."""
        from .logit_lens import logit_lens

        sae = result.sae
        lens = logit_lens(model, sae.W_dec, k=lens_k) if model is not None else None
        ref = getattr(sae, "ref", None)
        meta = {
            "sae": result.name,
            "sae_spec": sae_spec or result.name,
            "d_sae": sae.d_sae,
            "fingerprint": fingerprint(sae),
            "hook_point_in": sae.hyperparams.hook_point_in,
            "hook_point_out": sae.hyperparams.hook_point_out,
            "is_transcoder": sae.is_transcoder,
            "neuronpedia_url": ref.neuronpedia_url if ref is not None else None,
            "sae_has_stats": sae.stats is not None,
            "model": model_name,
            "corpus": corpus,
            "n_tokens": result.n_tokens,
            "n_docs": result.n_docs,
            "top_n": int(result.top.values.shape[1]),
            "n_samples": int(result.samples.values.shape[1]) if result.samples is not None else 0,
            "n_bands": n_bands,
            "deciles": result.config.deciles,
            "example_context": result.config.example_context,
            "example_before": result.config.example_before,
            "n_nonactivating": result.config.n_nonactivating,
            "nonactivating_pool": result.config.pool,
            "sequence_rule": RULES["windows"],
            "read": dict(result.read),
            "window_before": result.top.center,
            "window_after": int(result.top.tokens.shape[2]) - result.top.center - 1,
            "histogram_edges": [float(x) for x in HIST_EDGES],
            "logit_lens": APPROXIMATION if lens is not None else None,
            "dense_frequency": DENSE_FREQUENCY,
        }
        ids = [result.top.tokens.reshape(-1)]
        if result.samples is not None:
            ids.append(result.samples.tokens.reshape(-1))
        if result.contexts is not None:
            ids.append(result.contexts.tokens.reshape(-1))
        if lens is not None:
            ids += [lens.top_ids.reshape(-1), lens.bottom_ids.reshape(-1)]
        uniq = torch.unique(torch.cat([i.long() for i in ids]))
        vocab = {int(i): tokenizer.decode([int(i)]) for i in uniq.tolist() if i >= 0}
        return cls(meta, result.top, result.samples, result.stats, result.hist, lens, vocab,
                   dict(getattr(sae, "labels", {}) or {}), contexts=result.contexts)

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | Path, *,
             extra: Callable[[FeatureStore, Path], None] | None = None) -> Path:
        """Write the store to ``folder`` whole, in one step (manifest last).

        ``extra(store, tmp_folder)`` may add files (the HTML pages) before the manifest.
        ``folder`` may be new, empty or an earlier store (see :func:`check_store_target`).

        Raises:
            FolderNotOwnedError: ``folder`` is a file or a folder the SDK did not write.
            OutputPathError: ``folder`` is not writable.
        """
        folder = check_store_target(folder)
        _remove_leftovers(folder)

        def write(tmp: Path) -> None:
            self._write(tmp)
            if extra is not None:
                extra(self, tmp)
            # The store's own keys last: a loaded store's meta holds an old "files" list.
            manifest = {**self.meta, "format": FORMAT, "kind": KIND, "version": VERSION,
                        "complete": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "files": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                                        if p.is_file())}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")

        write_folder(folder, write, replaceable=_replaceable_store)
        self.path = folder
        return folder

    def _write(self, tmp: Path) -> None:
        def ex(e: Examples) -> dict[str, torch.Tensor]:
            return {"values": e.values.float(), "doc": e.doc.long(), "pos": e.pos.long(),
                    "tokens": e.tokens.int(), "acts": e.acts.float()}

        atomic_save_safetensors(ex(self.top), tmp / "top.safetensors")
        if self.samples is not None:
            atomic_save_safetensors(ex(self.samples), tmp / "samples.safetensors")
        if self.contexts is not None:
            c = self.contexts
            atomic_save_safetensors({"tokens": c.tokens.int(), "doc": c.doc.long(),
                                     "pos": c.pos.long(), "order": c.order.long(),
                                     "fires": c.fires.to(torch.uint8)},
                                    tmp / "nonactivating.safetensors")
        self.stats.save(tmp / STATS_FILE)
        atomic_save_safetensors({"counts": self.hist.long(), "edges": HIST_EDGES.float()},
                                tmp / "histogram.safetensors")
        if self.lens is not None:
            atomic_save_safetensors(self.lens.tensors(), tmp / "logit_lens.safetensors")
        atomic_write_text(tmp / "vocab.json",
                          json.dumps({str(k): v for k, v in sorted(self.vocab.items())},
                                     ensure_ascii=False) + "\n")
        if self.labels:
            write_labels(tmp / LABELS_FILE, self.labels)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | Path) -> FeatureStore:
        """Read a store written by :meth:`save`; no model needed. Every file is checked (JSON
        types, tensor names and shapes); the optional ones (pages, samples, logit lens,
        labels) may be missing.

        Raises:
            IncompleteStoreError: no complete manifest (an interrupted run, or not a store).
            CorruptCheckpointError: a file is missing, unreadable or not what it should be; the
                message names the file and what was expected.
        """
        folder = Path(folder).expanduser()
        meta = _manifest(folder)
        f, center = int(meta["d_sae"]), int(meta["window_before"])
        missing = [name for name in REQUIRED if not (folder / name).is_file()]
        missing += [name for name in meta["files"] if isinstance(name, str)
                    and name.endswith(".safetensors") and not (folder / name).is_file()]
        if missing:
            raise CorruptCheckpointError(f"{folder}: files of the store are missing: "
                                         f"{sorted(set(missing))[:3]}",
                                         hint="mine it again with `llamascope inspect`")

        def ex(name: str, center: int = center) -> Examples | None:
            p = folder / name
            if not p.is_file():
                return None
            t = _tensors(p, {"values": (f, None), "doc": (f, None), "pos": (f, None),
                             "tokens": (f, None, None), "acts": (f, None, None)})
            n, w = t["values"].shape[1], t["tokens"].shape[2]
            for key, shape in (("doc", (f, n)), ("pos", (f, n)), ("tokens", (f, n, w)), ("acts", (f, n, w))):
                if tuple(t[key].shape) != shape:
                    raise CorruptCheckpointError(f"{p}: tensor {key!r} has shape "
                                                 f"{list(t[key].shape)}, expected {list(shape)}")
            if not 0 <= center < w:
                raise CorruptCheckpointError(f"{folder / MANIFEST}: window_before {center} does not "
                                             f"fit the {w}-token windows of {name}")
            return Examples(t["values"], t["doc"], t["pos"], t["tokens"].long(), t["acts"], center)

        top = ex("top.safetensors")
        assert top is not None  # REQUIRED
        bins = len(meta["histogram_edges"]) + 1
        hist = _tensors(folder / "histogram.safetensors", {"counts": (f, bins)})["counts"]
        lens = None
        if (folder / "logit_lens.safetensors").is_file():
            t = _tensors(folder / "logit_lens.safetensors",
                         {k: (f, None) for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")})
            lens = LogitLens(t["top_ids"], t["top_values"], t["bottom_ids"], t["bottom_values"])
        vocab = _vocab(folder / "vocab.json")
        labels = read_labels(folder / LABELS_FILE, f) if (folder / LABELS_FILE).is_file() else {}
        stats = FeatureStats.load(folder / STATS_FILE)
        if stats.d_sae != f:
            raise CorruptCheckpointError(f"{folder / STATS_FILE}: statistics of {stats.d_sae} "
                                         f"features, but the store has {f}")
        version = int(meta["version"])
        before = meta.get("example_before", center) if version >= 2 else center
        if not isinstance(before, int) or isinstance(before, bool) or before < 0:
            raise CorruptCheckpointError(f"{folder / MANIFEST}: 'example_before' should be an "
                                         f"integer >= 0, found {before!r}")
        samples = ex("samples.safetensors", before)
        contexts = None
        if version >= 2 and (folder / "nonactivating.safetensors").is_file():
            t = _tensors(folder / "nonactivating.safetensors",
                         {"tokens": (None, None), "doc": (None,), "pos": (None,),
                          "order": (None,), "fires": (f, None)})
            r, w = t["tokens"].shape
            if any(t[k].shape[0] != r for k in ("doc", "pos", "order")) or t["fires"].shape[1] != r \
                    or not 0 <= before < max(w, 1):
                raise CorruptCheckpointError(f"{folder / 'nonactivating.safetensors'}: its "
                                             f"tensors do not describe one pool of {r} contexts")
            contexts = Contexts(t["tokens"].long(), t["doc"], t["pos"], t["order"],
                                t["fires"].bool(), before)
        return cls(meta, top, samples, stats, hist, lens, vocab, labels, folder, contexts)

    # ------------------------------------------------------------------ reading
    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    @property
    def name(self) -> str:
        return str(self.meta["sae"])

    def check_feature(self, i: int) -> int:
        if not 0 <= int(i) < self.d_sae:
            raise FeatureIndexError(f"{self.name}: feature {i} is out of range 0..{self.d_sae - 1}")
        return int(i)

    def token_text(self, i: int) -> str:
        return self.vocab.get(int(i), f"<{int(i)}>")

    def examples(self, i: int, which: str = "top") -> list[dict[str, Any]]:
        """Examples of feature ``i`` (``which`` = top or samples), empty slots dropped: token
        strings, per-token activations, maximum, and the (document, position) it came from."""
        e = self.top if which == "top" else self.samples
        if e is None:
            return []
        i = self.check_feature(i)
        return [self._example(e.tokens[i, k], e.acts[i, k], float(e.values[i, k]),
                              int(e.doc[i, k]), int(e.pos[i, k]), e.center)
                for k in range(e.values.shape[1]) if int(e.doc[i, k]) >= 0]

    def _example(self, tokens: torch.Tensor, acts: torch.Tensor, value: float, doc: int,
                 pos: int, center: int) -> dict[str, Any]:
        keep = tokens >= 0
        toks = tokens[keep].tolist()
        first = int(keep.nonzero()[0]) if bool(keep.any()) else 0
        return {"tokens": [self.token_text(t) for t in toks], "token_ids": toks,
                "acts": [float(a) for a in acts[keep].tolist()], "max": value,
                "max_index": center - first, "doc": doc, "pos": pos,
                "window_start": pos - (center - first)}

    def _require_v2(self, what: str) -> None:
        if int(self.meta.get("version", 1)) < 2:
            where = f" --out {self.path}" if self.path is not None else ""
            raise StoreVersionError(
                f"{self.path or self.name}: store version {self.meta.get('version')} was mined "
                f"before {what} were kept; re-mine it: llamascope inspect --sae "
                f"{self.meta.get('sae_spec') or self.name} --dataset {self.meta.get('corpus')}{where}")

    def decile_examples(self, i: int) -> list[dict[str, Any]]:
        """The feature's sampled firings cut into ``deciles`` activation bands, highest first:
        ``[{"decile": 10, "lo", "hi", "examples": [...]}, ...]``. The sample is uniform over
        the feature's firings, sorted by activation and cut into equal bands (fewer examples
        per band when the feature fired fewer than ``n_samples`` times; ``lo``/``hi`` None
        for an empty band)."""
        self._require_v2("decile examples")
        ex = self.examples(i, "samples")
        n, d = len(ex), int(self.meta.get("deciles", 10))
        out = []
        for q in range(d):
            part = ex[round(q * n / d):round((q + 1) * n / d)]
            vals = [e["max"] for e in part]
            out.append({"decile": d - q, "lo": min(vals) if vals else None,
                        "hi": max(vals) if vals else None, "examples": part})
        return out

    def non_activating(self, i: int, n: int | None = None) -> list[dict[str, Any]]:
        """Up to ``n`` (default ``n_nonactivating``) random contexts on which feature ``i`` is 0
        on every token; which ones is a fixed pseudo-random choice per feature."""
        self._require_v2("non-activating examples")
        i = self.check_feature(i)
        c = self.contexts
        if c is None:
            return []
        n = int(self.meta.get("n_nonactivating", 0)) if n is None else n
        idx = ((~c.fires[i]) & (c.doc >= 0)).nonzero().squeeze(1)
        pri = sample_priority(c.order[idx], torch.tensor([i]))[0]
        idx = idx[pri.argsort(descending=True, stable=True)][:n]
        zero = torch.zeros(c.tokens.shape[1])
        return [self._example(c.tokens[j], zero, 0.0, int(c.doc[j]), int(c.pos[j]), c.center)
                for j in idx.tolist()]

    def check_sae(self, sae: Any) -> FeatureStore:
        """Refuse to be used with an SAE other than the one mined: the weights' fingerprints
        must match (stores from before fingerprints: the width).

        Raises:
            StoreMismatchError: naming both SAEs and what differs.
        """
        where = f"the feature store {self.path}" if self.path else "this feature store"
        if "fingerprint" in self.meta:
            diff = differences(self.meta["fingerprint"], fingerprint(sae))
        else:
            diff = [] if self.d_sae == sae.d_sae else [f"d_sae {self.d_sae} vs {sae.d_sae}"]
        if diff:
            raise StoreMismatchError(
                f"{where} was mined with SAE {self.name!r}, not with {sae.name!r} "
                f"({'; '.join(diff)})",
                hint=f"mine this SAE: llamascope inspect --sae {sae.name} --dataset FILE")
        return self


def resolve_store(store_or_name: str | Path) -> Path:
    """The folder of a store given as a folder, or as an SAE name in any spelling the SAE is
    loaded by (``L12R-8x``, ``l12r_8x``, ``demo``): its store in :func:`default_store_dir`."""
    text = str(store_or_name)
    p = Path(text).expanduser()
    if p.is_dir():
        return p
    from .demo import DEMO_SAE_NAME, is_demo
    from .errors import UnknownSaeError
    from .registry import resolve

    if is_demo(text):
        name = DEMO_SAE_NAME
    else:
        try:
            name = resolve(text).name
        except UnknownSaeError:
            name = text
    d = default_store_dir(name)
    if not d.is_dir():
        raise IncompleteStoreError(
            f"no feature store for {text!r}: {text!r} is not a folder, and there is none at {d}",
            hint=f"mine one: llamascope inspect --sae {text} --dataset FILE")
    return d


def load_store(store_or_name: str | Path) -> FeatureStore:
    """A store folder, or an SAE name whose store is in :func:`default_store_dir` (see
    :func:`resolve_store`); a store found by name must have been mined for that SAE."""
    folder = resolve_store(store_or_name)
    store = FeatureStore.load(folder)
    if Path(str(store_or_name)).expanduser() != folder and store.name.replace("/", "_") != folder.name:
        raise StoreMismatchError(f"{folder} holds the store of {store.name!r}, not of "
                                 f"{str(store_or_name)!r}",
                                 hint=f"mine it again: llamascope inspect --sae {store_or_name} "
                                      "--dataset FILE")
    return store


__all__ = ["FeatureStore", "IncompleteStoreError", "StoreVersionError", "check_output_folder", "check_stats_target",
           "check_store_target", "default_store_dir",
           "load_store", "resolve_store", "MANIFEST"]
