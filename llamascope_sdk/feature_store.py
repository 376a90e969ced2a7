"""The on-disk feature store: what mining found for one SAE, reloadable without the model.

A store is a folder::

    manifest.json               written LAST; a folder without it (or not "complete") is refused
    top.safetensors             values/doc/pos [F, N], tokens/acts [F, N, W]: top-N contexts
    samples.safetensors         the same for the quantile sample, sorted by activation
    feature_stats.safetensors   FeatureStats (the file relative steering and mean ablation read)
    histogram.safetensors       counts [F, B] over edges [B - 1] (log-spaced, model units)
    logit_lens.safetensors      top/bottom token ids and logits [F, k]
    vocab.json                  token id -> text of every token id the arrays use
    feature_labels.json         labels known for the SAE (optional)
    pages/                      the HTML feature pages (optional)

Safetensors for arrays and JSON for metadata, never pickle. The folder is written into a
temporary sibling and renamed into place, so an interrupted run leaves either the previous
store or nothing that loads (rerunning mining restarts it; the leftover temporary folder is
removed then).

To make relative steering (``--relative``) and mean ablation work on the mined SAE::

    sae = SAE.from_pretrained("L15R-8x")
    sae.stats = FeatureStats.load(store_folder)      # feature_stats.safetensors inside it
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_save_safetensors, atomic_write_text, publish_mode
from .errors import CorruptCheckpointError, FeatureIndexError, LlamascopeError
from .feature_stats import LABELS_FILE, STATS_FILE, FeatureStats, read_labels, write_labels
from .logit_lens import APPROXIMATION, LogitLens
from .mining import HIST_EDGES, Examples, MiningResult, quantile_bands
from .paths import cache_root

FORMAT = "llamascope-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
DENSE_FREQUENCY = 0.5


class IncompleteStoreError(LlamascopeError, FileNotFoundError):
    """A folder that is not a complete feature store (no manifest: interrupted or not a store)."""


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
            "window_before": result.top.center,
            "window_after": int(result.top.tokens.shape[2]) - result.top.center - 1,
            "histogram_edges": [float(x) for x in HIST_EDGES],
            "logit_lens": APPROXIMATION if lens is not None else None,
            "dense_frequency": DENSE_FREQUENCY,
        }
        ids = [result.top.tokens.reshape(-1)]
        if result.samples is not None:
            ids.append(result.samples.tokens.reshape(-1))
        if lens is not None:
            ids += [lens.top_ids.reshape(-1), lens.bottom_ids.reshape(-1)]
        uniq = torch.unique(torch.cat(ids))
        vocab = {int(i): tokenizer.decode([int(i)]) for i in uniq.tolist() if i >= 0}
        return cls(meta, result.top, result.samples, result.stats, result.hist, lens, vocab,
                   dict(getattr(sae, "labels", {}) or {}))

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | Path, *,
             extra: Callable[[FeatureStore, Path], None] | None = None) -> Path:
        """Write the store to ``folder`` atomically (temporary sibling + rename, manifest last).

        ``extra(store, tmp_folder)`` may add files (the HTML pages) before the manifest.
        An existing store at ``folder`` is replaced; any other non-empty folder is refused.
        """
        folder = Path(folder).expanduser()
        if folder.exists() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            raise FileExistsError(f"{folder} exists and is not a feature store; choose another "
                                  "--out or remove it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        for old in folder.parent.glob(f".{folder.name}.tmp-*"):  # leftovers of killed runs
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime > 60:
                    shutil.rmtree(old)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            self._write(tmp)
            if extra is not None:
                extra(self, tmp)
            manifest = {"format": FORMAT, "version": VERSION, "complete": True,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
                        **self.meta}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            publish_mode(tmp, directory=True)
            if folder.exists():
                trash = folder.parent / f".{folder.name}.old-{time.time_ns()}"
                os.replace(folder, trash)
                os.replace(tmp, folder)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = folder
        return folder

    def _write(self, tmp: Path) -> None:
        def ex(e: Examples) -> dict[str, torch.Tensor]:
            return {"values": e.values.float(), "doc": e.doc.long(), "pos": e.pos.long(),
                    "tokens": e.tokens.int(), "acts": e.acts.float()}

        atomic_save_safetensors(ex(self.top), tmp / "top.safetensors")
        if self.samples is not None:
            atomic_save_safetensors(ex(self.samples), tmp / "samples.safetensors")
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
        """Read a store written by :meth:`save`; no model needed.

        Raises:
            IncompleteStoreError: no complete manifest (an interrupted run, or not a store).
            CorruptCheckpointError: a file is missing or unreadable.
        """
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        mpath = folder / MANIFEST
        if not mpath.is_file():
            raise IncompleteStoreError(
                f"{folder} is not a complete feature store (no {MANIFEST}): it is not a store, "
                "or the mining run that writes it did not finish",
                hint="rerun `llamascope inspect ... --out` to mine it again")
        try:
            meta = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CorruptCheckpointError(f"{mpath}: not JSON ({exc})") from None
        if meta.get("format") != FORMAT or meta.get("complete") is not True:
            raise IncompleteStoreError(f"{mpath} is not the manifest of a complete feature store",
                                       hint="rerun `llamascope inspect` to mine it again")
        if int(meta.get("version", 0)) > VERSION:
            raise CorruptCheckpointError(f"{folder}: store version {meta['version']} is newer than "
                                         f"this SDK reads ({VERSION}); upgrade llamascope-sdk")
        missing = [f for f in meta.get("files", []) if not (folder / f).is_file()]
        if missing:
            raise CorruptCheckpointError(f"{folder}: files of the store are missing: {missing[:3]}")
        center = int(meta["window_before"])

        def ex(name: str) -> Examples | None:
            p = folder / name
            if not p.is_file():
                return None
            t = load_file(str(p))
            return Examples(t["values"], t["doc"], t["pos"], t["tokens"].long(), t["acts"], center)

        top = ex("top.safetensors")
        if top is None:
            raise CorruptCheckpointError(f"{folder}: top.safetensors is missing")
        hist = load_file(str(folder / "histogram.safetensors"))["counts"]
        lens = None
        if (folder / "logit_lens.safetensors").is_file():
            t = load_file(str(folder / "logit_lens.safetensors"))
            lens = LogitLens(t["top_ids"], t["top_values"], t["bottom_ids"], t["bottom_values"])
        vocab = {int(k): v for k, v in
                 json.loads((folder / "vocab.json").read_text(encoding="utf-8")).items()}
        labels = (read_labels(folder / LABELS_FILE, int(meta["d_sae"]))
                  if (folder / LABELS_FILE).is_file() else {})
        return cls(meta, top, ex("samples.safetensors"), FeatureStats.load(folder / STATS_FILE),
                   hist, lens, vocab, labels, folder)

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
        out = []
        for k in range(e.values.shape[1]):
            doc = int(e.doc[i, k])
            if doc < 0:
                continue
            keep = e.tokens[i, k] >= 0
            toks = e.tokens[i, k][keep].tolist()
            acts = e.acts[i, k][keep].tolist()
            first = int(keep.nonzero()[0]) if bool(keep.any()) else 0
            pos = int(e.pos[i, k])
            out.append({"tokens": [self.token_text(t) for t in toks], "token_ids": toks,
                        "acts": [float(a) for a in acts],
                        "max": float(e.values[i, k]), "max_index": e.center - first,
                        "doc": doc, "pos": pos, "window_start": pos - (e.center - first)})
        return out

    def bands(self, i: int) -> list[dict[str, Any]]:
        """Quantile bands of the feature's sample, highest first: ``{"label", "examples"}``."""
        ex = self.examples(i, "samples")
        nb = int(self.meta.get("n_bands", 4))
        out = []
        for q, (a, b) in enumerate(quantile_bands(len(ex), nb)):
            lo, hi = 100 - round(100 * (q + 1) / nb), 100 - round(100 * q / nb)
            out.append({"label": f"{lo}-{hi}th percentile of firings", "examples": ex[a:b]})
        return out

    def histogram(self, i: int) -> list[dict[str, float]]:
        """Non-empty bins of feature ``i``: ``{"lo", "hi", "count"}`` (lo exclusive)."""
        i = self.check_feature(i)
        edges = [0.0, *[float(x) for x in self.meta["histogram_edges"]], float("inf")]
        c = self.hist[i].tolist()
        return [{"lo": edges[b], "hi": edges[b + 1], "count": int(n)} for b, n in enumerate(c) if n]

    def logit_lens(self, i: int) -> dict[str, list[tuple[str, float]]] | None:
        if self.lens is None:
            return None
        i = self.check_feature(i)
        return {"promoted": [(self.token_text(t), float(v)) for t, v in
                             zip(self.lens.top_ids[i].tolist(), self.lens.top_values[i].tolist(), strict=True)],
                "suppressed": [(self.token_text(t), float(v)) for t, v in
                               zip(self.lens.bottom_ids[i].tolist(), self.lens.bottom_values[i].tolist(), strict=True)]}

    def is_dense(self, i: int) -> bool:
        return float(self.stats.frequency[i]) > DENSE_FREQUENCY

    def steer_command(self, i: int, relative: float = 4.0) -> str:
        """The ``llamascope steer`` command that tries feature ``i``: ``--relative -a 4`` when
        the SAE carries statistics, else the same strength in raw units (4 x typical)."""
        spec = shlex.quote(str(self.meta.get("sae_spec") or self.name))
        if self.meta.get("sae_has_stats"):
            return f"llamascope steer --sae {spec} -f {i} --relative -a {relative:g}"
        raw = relative * float(self.stats.typical[i])
        return f"llamascope steer --sae {spec} -f {i} -a {raw:.1f}"

    def summary(self, i: int) -> dict[str, Any]:
        i = self.check_feature(i)
        return {"feature": i, "sae": self.name, "label": self.labels.get(i),
                "frequency": float(self.stats.frequency[i]),
                "typical": float(self.stats.typical[i]), "mean": float(self.stats.mean[i]),
                "max": float(self.top.values[i, 0]), "dense": self.is_dense(i),
                "n_tokens": int(self.stats.n_tokens),
                "neuronpedia_url": (f"{self.meta['neuronpedia_url']}/{i}"
                                    if self.meta.get("neuronpedia_url") else None),
                "steer": self.steer_command(i)}

    def feature(self, i: int) -> dict[str, Any]:
        """Everything about feature ``i``, JSON-ready (``llamascope show --json``)."""
        return {**self.summary(i), "top_examples": self.examples(i),
                "quantiles": self.bands(i), "histogram": self.histogram(i),
                "logit_lens": self.logit_lens(i)}


def load_store(store_or_name: str | Path) -> FeatureStore:
    """A store folder, or an SAE name whose store is in :func:`default_store_dir`."""
    p = Path(store_or_name).expanduser()
    if (p / MANIFEST).is_file() or p.is_dir():
        return FeatureStore.load(p)
    from .demo import DEMO_SAE_NAME, is_demo

    name = DEMO_SAE_NAME if is_demo(str(store_or_name)) else str(store_or_name)
    d = default_store_dir(name)
    if not d.is_dir():
        raise IncompleteStoreError(f"no feature store for {store_or_name!r} (looked in {d})",
                                   hint=f"mine one: llamascope inspect --sae {store_or_name} "
                                        "--dataset FILE")
    return FeatureStore.load(d)


__all__ = ["FeatureStore", "IncompleteStoreError", "default_store_dir", "load_store", "MANIFEST"]
