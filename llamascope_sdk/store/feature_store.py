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
(:mod:`~llamascope_sdk.base.fingerprint`) so a store is never used with another SAE.

Versions: 1 (no decile sample, no non-activating contexts; 16 samples of 21 tokens) and 2
(this layout). A version-1 store still loads for ``show`` and pages; asking it for decile or
non-activating examples raises :class:`StoreVersionError` with the command that re-mines it.
A newer version than this SDK knows is refused.

Safetensors for arrays and JSON for metadata, never pickle. The folder is written whole in one
step (:func:`~llamascope_sdk.base.atomic.write_folder`), so an interrupted run leaves the previous
store (or nothing), never a mix. A folder is replaced only when it is provably an earlier
store: its manifest says so and every file in it is one the manifest lists. Anything else (a
file, a folder of the user's, a store the user added files to) is refused before any work.

To make relative steering (``--relative``) and mean ablation work on the mined SAE::

    sae = SAE.from_pretrained("L15R-8x")
    sae.stats = FeatureStats.load(store_folder)      # feature_stats.safetensors inside it

What is shown about a feature (summary, bands, steer command) is in
:mod:`~llamascope_sdk.store.view`; checking output folders and reading each file checked is
in :mod:`~llamascope_sdk.store.files`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text, write_folder
from llamascope_sdk.base.errors import (
    CorruptCheckpointError,
    FeatureIndexError,
    LlamascopeError,
    StoreMismatchError,
)
from llamascope_sdk.base.fingerprint import differences, fingerprint
from llamascope_sdk.base.paths import cache_root
from llamascope_sdk.core.feature_stats import (
    LABELS_FILE,
    STATS_FILE,
    FeatureStats,
    read_labels,
    write_labels,
)
from llamascope_sdk.core.logit_lens import APPROXIMATION, LogitLens, logit_lens
from llamascope_sdk.core.metrics import DENSE_FREQUENCY
from llamascope_sdk.corpus import RULES
from llamascope_sdk.loading.demo import DEMO_SAE_NAME, is_demo
from llamascope_sdk.loading.registry import claims, resolve
from llamascope_sdk.mining.mine import HIST_EDGES, Contexts, Examples, MiningResult
from llamascope_sdk.mining.state import sample_priority
from llamascope_sdk.store.files import (
    FORMAT,
    KIND,
    MANIFEST,
    REQUIRED,
    VERSION,
    IncompleteStoreError,
    check_output_folder,
    check_stats_target,
    check_store_target,
    read_manifest,
    read_tensors,
    read_vocab,
    remove_leftovers,
    replaceable_store,
)


class StoreVersionError(LlamascopeError, ValueError):
    """A store written by an older SDK lacks what was asked for (it must be mined again)."""


def default_store_dir(sae_name: str) -> Path:
    """Where ``llamascope inspect`` writes a store when no --out is given:
    ``$LLAMASCOPE_CACHE/features/<sae name>``."""
    return cache_root() / "features" / sae_name.replace("/", "_")


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
        """Wrap a :class:`~llamascope_sdk.mining.mine.MiningResult`; with ``model``, add the logit
        lens. ``sae_spec`` is how a user names the SAE on the command line (for steer
        commands; default its name)."""

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
        remove_leftovers(folder)

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

        write_folder(folder, write, replaceable=replaceable_store)
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
        meta = read_manifest(folder)
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
            t = read_tensors(p, {"values": (f, None), "doc": (f, None), "pos": (f, None),
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
        hist = read_tensors(folder / "histogram.safetensors", {"counts": (f, bins)})["counts"]
        lens = None
        if (folder / "logit_lens.safetensors").is_file():
            t = read_tensors(folder / "logit_lens.safetensors",
                         {k: (f, None) for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")})
            lens = LogitLens(t["top_ids"], t["top_values"], t["bottom_ids"], t["bottom_values"])
        vocab = read_vocab(folder / "vocab.json")
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
            t = read_tensors(folder / "nonactivating.safetensors",
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

    # a misspelt Llama Scope name is refused by resolve, which says what is allowed
    name = DEMO_SAE_NAME if is_demo(text) else resolve(text).name if claims(text) else text
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


__all__ = ["FeatureStore", "IncompleteStoreError", "StoreVersionError", "check_output_folder",
           "check_stats_target", "check_store_target", "default_store_dir", "load_store",
           "resolve_store", "MANIFEST"]
