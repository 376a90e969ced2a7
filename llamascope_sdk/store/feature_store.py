"""The on-disk feature store: what mining found for one SAE, reloadable without the model.

A store is a folder of safetensors arrays and JSON; the layout of each file (version 4: the
examples only where a feature fired, their windows encoded losslessly by
:mod:`~llamascope_sdk.store.compact`) is at the top of :mod:`~llamascope_sdk.store.files`.

The manifest names the format and kind (``"format": "llamascope-feature-store"``, ``"kind":
"feature-store"``), every file of the store, and a fingerprint of the SAE's weights
(:mod:`~llamascope_sdk.base.fingerprint`) so a store is never used with another SAE.

Versions: 1 (no decile sample, no non-activating contexts; 16 samples of 21 tokens), 2 ([F,
K] slots: a store as large as features x slots, examples could overlap), 3 (ragged, spaced
examples; windows as dense int32 tokens and float32 activations) and 4. Version-2 and
version-3 stores load as they are. A version-1 store still loads for ``show`` and pages; asking it for decile or
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
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
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
from llamascope_sdk.mining.spacing import spacing_rule
from llamascope_sdk.mining.state import sample_priority
from llamascope_sdk.store.compact import narrow, widen
from llamascope_sdk.store.files import (
    FORMAT,
    KIND,
    MANIFEST,
    REQUIRED,
    VERSION,
    IncompleteStoreError,
    check_finite,
    check_output_folder,
    check_stats_target,
    check_store_target,
    context_tensors,
    example_tensors,
    read_contexts,
    read_examples,
    read_manifest,
    read_optional,
    read_tensors,
    read_vocab,
    remove_leftovers,
    replaceable_store,
)
from llamascope_sdk.store.ownership import inside


class StoreVersionError(LlamascopeError, ValueError):
    """A store written by an older SDK lacks what was asked for (it must be mined again)."""


_BYTE = re.compile(r"\\x([0-9a-f]{2})")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2): printable bytes stand for themselves, the others
    for the code points from 256 up, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(extra)}


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def readable_token(tokenizer: Any, token_id: int) -> str:
    """A token's text for people: its decoded text, or, for a token that is part of a UTF-8
    character (decoding gives the replacement character), its bytes as ``<0x..>`` escapes
    (a SentencePiece byte token is already named so; a byte-level BPE token is mapped back
    to its bytes)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = str(tokenizer.convert_ids_to_tokens(token_id))
    if re.fullmatch(r"(<0x[0-9A-Fa-f]{2}>)+", piece):
        return piece.upper().replace("<0X", "<0x")
    if piece and all(c in _BYTE_OF for c in piece):
        raw = bytes(_BYTE_OF[c] for c in piece).decode("utf-8", errors="backslashreplace")
        text = _BYTE.sub(lambda m: f"<0x{m.group(1).upper()}>", raw)
    return text.replace("\ufffd", "<U+FFFD>")  # the character itself, or bytes not found


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
    #: optional files that were present but not used, one line each (see :meth:`load`)
    problems: list[str] = field(default_factory=list)

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
            "top_n": result.config.top_n,
            "n_samples": result.config.n_samples if result.samples is not None else 0,
            "n_bands": n_bands,
            "deciles": result.config.deciles,
            "example_context": result.config.example_context,
            "example_before": result.config.example_before,
            "n_nonactivating": result.config.n_nonactivating,
            "nonactivating_pool": result.config.pool,
            "sequence_rule": RULES["windows"],
            "read": dict(result.read),
            "window_before": result.top.center,
            "window_after": result.top.width - result.top.center - 1,
            "example_spacing": spacing_rule(result.config.window, result.config.example_context),
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
        vocab = {int(i): readable_token(tokenizer, int(i)) for i in uniq.tolist() if i >= 0}
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
        atomic_save_safetensors(example_tensors(self.top), tmp / "top.safetensors")
        if self.samples is not None:
            atomic_save_safetensors(example_tensors(self.samples), tmp / "samples.safetensors")
        if self.contexts is not None:
            atomic_save_safetensors(context_tensors(self.contexts), tmp / "nonactivating.safetensors")
        self.stats.save(tmp / STATS_FILE)
        atomic_save_safetensors({"counts": narrow(self.hist.long()), "edges": HIST_EDGES.float()},
                                tmp / "histogram.safetensors")
        if self.lens is not None:
            lens = self.lens.tensors()
            lens |= {k: narrow(lens[k].long()) for k in ("top_ids", "bottom_ids")}
            atomic_save_safetensors(lens, tmp / "logit_lens.safetensors")
        atomic_write_text(tmp / "vocab.json",
                          json.dumps({str(k): v for k, v in sorted(self.vocab.items())},
                                     ensure_ascii=False) + "\n")
        if self.labels:
            write_labels(tmp / LABELS_FILE, self.labels)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | Path) -> FeatureStore:
        """Read a store written by :meth:`save`; no model needed. Every file is checked (JSON
        types, tensor names, shapes and finite values; no file may be a link leading out of
        the store); the optional ones (pages, samples, logit lens, labels, the
        non-activating pool) may be missing, and one that is bad is left out and named in
        :attr:`problems` (one line each) while the rest of the store is used.

        Raises:
            IncompleteStoreError: no complete manifest (an interrupted run, or not a store).
            CorruptCheckpointError: a file is missing, unreadable or not what it should be; the
                message names the file and what was expected.
        """
        folder = Path(folder).expanduser()
        meta = read_manifest(folder)
        f, center = int(meta["d_sae"]), int(meta["window_before"])
        linked = [name for name in REQUIRED if not inside(folder, folder / name)]
        if linked:
            raise CorruptCheckpointError(f"{folder}: files of the store are links out of it: "
                                         f"{linked[:3]}; not read")
        missing = [name for name in REQUIRED if not (folder / name).is_file()]
        if missing:
            raise CorruptCheckpointError(f"{folder}: files of the store are missing: "
                                         f"{sorted(set(missing))[:3]}",
                                         hint="mine it again with `llamascope inspect`")

        version = int(meta["version"])
        top = read_examples(folder / "top.safetensors", f, center, version)
        bins = len(meta["histogram_edges"]) + 1
        hist_path = folder / "histogram.safetensors"
        hist_t = read_tensors(hist_path, {"counts": (f, bins)})
        widen(hist_path, hist_t, ("counts",))
        hist = hist_t["counts"]
        problems: list[str] = []
        optional = partial(read_optional, folder, meta, problems)
        lens = optional("logit_lens.safetensors", lambda p: _read_lens(p, f))
        vocab = read_vocab(folder / "vocab.json")
        labels = optional(LABELS_FILE, lambda p: read_labels(p, f)) or {}
        stats = FeatureStats.load(folder / STATS_FILE)
        if stats.d_sae != f:
            raise CorruptCheckpointError(f"{folder / STATS_FILE}: statistics of {stats.d_sae} "
                                         f"features, but the store has {f}")
        before = meta.get("example_before", center) if version >= 2 else center
        if not isinstance(before, int) or isinstance(before, bool) or before < 0:
            raise CorruptCheckpointError(f"{folder / MANIFEST}: 'example_before' should be an "
                                         f"integer >= 0, found {before!r}")
        samples = optional("samples.safetensors",
                           lambda p: read_examples(p, f, before, version))
        contexts = (optional("nonactivating.safetensors",
                             lambda p: read_contexts(p, f, before, version))
                    if version >= 2 else None)
        return cls(meta, top, samples, stats, hist, lens, vocab, labels, folder, contexts,
                   problems)

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
        return [self._example(e.tokens[k], e.acts[k], float(e.values[k]), int(e.doc[k]),
                              int(e.pos[k]), e.center) for k in e.rows(i)]

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
        idx = ((~c.fires(i)) & (c.doc >= 0)).nonzero().squeeze(1)
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


def _read_lens(path: Path, f: int) -> LogitLens:
    t = read_tensors(path, {k: (f, None) for k in ("top_ids", "top_values", "bottom_ids",
                                                  "bottom_values")})
    check_finite(path, t, ("top_values", "bottom_values"))
    widen(path, t, ("top_ids", "bottom_ids"))
    return LogitLens(t["top_ids"], t["top_values"], t["bottom_ids"], t["bottom_values"])


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
