""":func:`benchmark`: the SAEBench metrics of several SAEs on one model, in one run, what
``llamascope bench`` calls.

Every input is checked before the model loads (metric names, seeds, k values, the ``bench``
extra and dataset names for probing, the endpoint for autointerp, the text, the output
folder). The SAEs are then loaded (the first bad name is one line), then the model (by
default the base model of the first SAE), then each metric runs for all SAEs at once:
activations are captured once per hook point (:mod:`.activations`) and shared. The output
folder holds the SDK's own files only: ``<sae>/<eval type>.json`` (SAEBench format),
``comparison.md``, ``comparison.png``, ``summary.json`` and ``cache/``; a folder with other
files in it is refused, and a folder from an earlier run is reused (its cache resumes).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.base.endpoint import ChatClient
from llamascope_sdk.base.errors import DataUnavailableError, FolderNotOwnedError, InputError
from llamascope_sdk.benchmark import absorption as A
from llamascope_sdk.benchmark import datasets as D
from llamascope_sdk.benchmark.activations import ActivationCache, cache_bytes
from llamascope_sdk.benchmark.autointerp import autointerp, token_strings
from llamascope_sdk.benchmark.core import core_metrics, packed_rows
from llamascope_sdk.benchmark.outputs import (
    absorption_output,
    autointerp_output,
    core_output,
    probing_output,
)
from llamascope_sdk.benchmark.probing import (
    BASE_SEED,
    DEFAULT_KS,
    DEFAULT_REG,
    ProbeMetrics,
    probe_dataset,
    require_sklearn,
)
from llamascope_sdk.benchmark.report import MetricOutput, plot, table, write_jsons
from llamascope_sdk.core.sites import Site, parse_hook_point
from llamascope_sdk.corpus import check_corpus
from llamascope_sdk.loading.capture import capture, keep_mask
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.models import base_model_of, load_model, special_ids
from llamascope_sdk.loading.sae import SAE

METRICS = ("core", "probing", "absorption", "autointerp")
DEFAULT_METRICS = ("core", "probing", "absorption")
#: Offered by SAEBench, refused here, with the reason.
REFUSED = {m: f"{m.upper()} is not offered: the reliability audit of SAEBench's metrics "
              "(Chanin 2026, arXiv 2605.18229) finds that TPP and SCR should not be used"
           for m in ("tpp", "scr")}
MARKER = ".llamascope-bench.json"


@dataclass
class BenchSettings:
    """Everything a run can be told, with SAEBench's / sae-probes' defaults where they exist."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    n_seeds: int = 3
    datasets: list[str] | None = None  # sae-probes dataset names; None: all of them
    ks: tuple[int, ...] = DEFAULT_KS
    reg: str = DEFAULT_REG
    core_tokens: int = 8192  # per seed (sample)
    core_context: int = 128
    text: str | None = None  # core / autointerp text; None: the sae-probes prompts
    absorption_words: int | None = None  # None: every alphabetic single-token word
    autointerp_features: int = 20
    autointerp_tokens: int = 65_536
    endpoint: str | None = None
    endpoint_model: str | None = None
    api_key: str | None = None
    max_cache_gb: float = 50.0
    batch_tokens: int = 8192


@dataclass
class BenchRun:
    """What :func:`benchmark` returns: per SAE its metric outputs, the files, the timings."""

    outputs: dict[str, list[MetricOutput]]
    files: list[Path] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    table: str = ""


def check_settings(s: BenchSettings, out: str | Path) -> Path:
    """Every check that needs no model, in one line each. Returns the output folder."""
    for m in s.metrics:
        if m.lower() in REFUSED:
            raise InputError(REFUSED[m.lower()])
        if m not in METRICS:
            raise InputError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    if not s.metrics:
        raise InputError(f"no metric given; choose from {', '.join(METRICS)}")
    if s.n_seeds < 1 or any(k < 1 for k in s.ks) or not s.ks:
        raise InputError(f"n_seeds and every k must be >= 1; got {s.n_seeds} and {list(s.ks)}")
    if s.reg not in ("l1", "l2"):
        raise InputError(f"reg must be l1 or l2, got {s.reg!r}")
    if "probing" in s.metrics:
        D.check_names(s.datasets or [])  # also: the extra is installed
        require_sklearn()
    elif s.text is None and {"core", "autointerp"} & set(s.metrics):
        try:
            D.check_names(s.datasets or [])
        except DataUnavailableError:
            raise DataUnavailableError(
                "core and autointerp read --text FILE (.txt/.jsonl/.parquet or a Hugging Face "
                f"dataset), or by default the sae-probes prompts: {D.EXTRA_HINT}") from None
    if s.text is not None:
        check_corpus(s.text)
    if "autointerp" in s.metrics and not (s.endpoint and s.endpoint_model):
        raise InputError("autointerp needs --endpoint URL and --endpoint-model NAME (any "
                         "OpenAI-compatible server, e.g. a local `llamascope serve`)")
    return _check_out(Path(out))


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise FolderNotOwnedError(f"{out} is a file; give a folder for the results")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FolderNotOwnedError(f"{out} has files that llamascope bench did not write; give "
                                  "a new or empty folder (or one of an earlier bench run)")
    return out


def _sites(named: Mapping[str, SAE]) -> dict[Site, list[str]]:
    by: dict[Site, list[str]] = {}
    for n, s in named.items():
        by.setdefault(parse_hook_point(s.hyperparams.hook_point_in), []).append(n)
    return by


def _encoder(sae: SAE) -> Any:
    def enc(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([sae.encode(c.to(sae.device, sae.dtype)).float().cpu()
                          for c in x.split(4096)])
    return enc


def _dense_cached(cache: ActivationCache, site: Site, data: D.ProbeDataset, x: torch.Tensor,
                  seed: int) -> ProbeMetrics:
    """The dense baseline of (hook point, dataset, seed): it does not depend on the SAE, so a
    later run with other SAEs at this hook point reads it from the cache folder."""
    path = cache.path(site, data.name).with_suffix(f".dense-seed{seed}.json")
    if path.is_file():
        return ProbeMetrics(**json.loads(path.read_text()))
    m = probe_dataset(data.name, x, data.labels, data.n_total, None, seed=seed).dense
    atomic_write_text(path, json.dumps(asdict(m)))
    return m


def run_probing(cache: ActivationCache, named: Mapping[str, SAE], names: Sequence[str],
                s: BenchSettings, timing: dict[str, Any]) -> dict[str, MetricOutput]:
    """The sae-probes protocol on every dataset, for every SAE and seed; the dense baseline
    once per (hook point, dataset, seed), kept in the cache folder."""
    seeds = [BASE_SEED + i for i in range(s.n_seeds)]
    res: dict[str, dict[int, list[Any]]] = {n: {sd: [] for sd in seeds} for n in named}
    by_site = _sites(named)
    per_ds = timing.setdefault("probing_per_dataset", {})
    for ds in names:
        data = D.load(ds)
        before = (cache.timing.forward_s, cache.timing.tokens, cache.timing.reused_rows)
        t0 = time.perf_counter()
        acts = cache.get(ds, data.prompts, list(by_site))
        t1 = time.perf_counter()
        for site, members in by_site.items():
            x = acts[site]
            for sd in seeds:
                dense = _dense_cached(cache, site, data, x, sd)
                for n in members:
                    res[n][sd].append(probe_dataset(ds, x, data.labels, data.n_total,
                                                    _encoder(named[n]), seed=sd, ks=s.ks,
                                                    reg=s.reg, dense=dense))
        per_ds[ds] = {"activations_s": t1 - t0, "probe_fit_s": time.perf_counter() - t1,
                      "rows": len(data.prompts),
                      "forward_s": cache.timing.forward_s - before[0],
                      "model_tokens": cache.timing.tokens - before[1],
                      "reused_rows": cache.timing.reused_rows - before[2]}
    cfg = {"model_name": _model_name(cache.model), "random_seed": BASE_SEED,
           "dataset_names": list(names), "k_values": list(s.ks), "reg_type": s.reg,
           "setting": "normal", "n_seeds": s.n_seeds, "context_length": cache.max_len}
    return {n: probing_output(res[n], s.ks, cfg) for n in named}


def run_absorption(cache: ActivationCache, tokenizer: Any, named: Mapping[str, SAE],
                   s: BenchSettings) -> dict[str, MetricOutput]:
    words = A.alpha_words(tokenizer)
    if s.absorption_words is not None and s.absorption_words < len(words):
        words = sorted(random.Random(BASE_SEED).sample(words, s.absorption_words))
    n_after, keep = A.suffix_tokens(lambda t: cache.ids([t])[0], words)
    words = [words[i] for i in keep]
    prompts = A.prompts_for(words, BASE_SEED)
    by_site = _sites(named)
    set_name = f"absorption-first-letter-{len(words)}"
    acts = cache.get(set_name, prompts, list(by_site), from_end=n_after)
    seeds = [BASE_SEED + i for i in range(s.n_seeds)]
    out = {}
    for site, members in by_site.items():
        probes = _load_probes(cache.path(site, set_name).with_suffix(".gt-probes.safetensors"))
        for n in members:
            r = A.absorption(named[n], acts[site], words, seeds=seeds, probes=probes[0])
            cfg = {"model_name": _model_name(cache.model), "random_seed": BASE_SEED,
                   "f1_jump_threshold": A.F1_JUMP, "max_k_value": A.MAX_K,
                   "prompt_template": A.TEMPLATE, "min_GT_probe_f1": A.MIN_PROBE_F1,
                   "n_words": len(words), "n_seeds": s.n_seeds}
            out[n] = absorption_output(r, cfg)
        _save_probes(*probes)
    return out


def _load_probes(path: Path) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], Path]:
    """The ground-truth letter probes of a hook point by seed, from the cache folder."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if path.is_file():
        t = load_file(str(path))
        for key in t:
            if key.startswith("W_"):
                seed = int(key[2:])
                found[seed] = (t[key], t[f"b_{seed}"])
    return found, path


def _save_probes(probes: dict[int, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    tensors = {f"{p}_{seed}": t for seed, wb in probes.items() for p, t in zip("Wb", wb, strict=True)}
    atomic_save_safetensors(tensors, path)


def _text(s: BenchSettings, names: Sequence[str]) -> Any:
    """The core / autointerp text: the user's, or the sae-probes prompts (offline)."""
    if s.text is not None:
        return s.text
    return [p for ds in (names or D.dataset_names()) for p in D.load(ds).prompts]


def run_autointerp(model: nn.Module, tokenizer: Any, named: Mapping[str, SAE], text: Any,
                   s: BenchSettings) -> dict[str, MetricOutput]:
    client = ChatClient(s.endpoint or "", s.endpoint_model or "", api_key=s.api_key,
                        seed=BASE_SEED)
    rows = packed_rows(tokenizer, text, rows=max(1, s.autointerp_tokens // 128), context=128)
    toks = token_strings(tokenizer, rows)
    specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)
    by_site = _sites(named)
    xs: dict[Site, list[torch.Tensor]] = {site: [] for site in by_site}
    for i in range(0, rows.shape[0], 16):
        ids = rows[i:i + 16]
        acts, _ = capture(model, list(by_site), ids, torch.ones_like(ids, dtype=torch.bool))
        for site in by_site:
            xs[site].append(acts[site].float().cpu())
    keep = keep_mask(rows, torch.ones_like(rows, dtype=torch.bool), specials)
    out = {}
    for site, members in by_site.items():
        x = torch.cat(xs[site])
        for n in members:
            sae = named[n]

            def feats(ids: list[int], sae: SAE = sae, x: torch.Tensor = x) -> torch.Tensor:
                f = torch.cat([sae.encode(c.to(sae.device, sae.dtype)).float().cpu()[..., ids]
                               for c in x.split(16)])
                return f * keep[..., None]

            fired = torch.zeros(sae.d_sae, dtype=torch.bool)
            for c in x.split(16):
                fired |= (sae.encode(c.to(sae.device, sae.dtype)) > 0).flatten(0, 1).any(0).cpu()
            r = autointerp(client, toks, feats, fired.nonzero().flatten().tolist(),
                           n_features=s.autointerp_features,
                           seeds=[BASE_SEED + i for i in range(s.n_seeds)])
            cfg = {"model_name": _model_name(model), "random_seed": BASE_SEED,
                   "n_latents": s.autointerp_features, "llm_context_size": 128,
                   "buffer": 10, "total_tokens": int(rows.numel()), "n_seeds": s.n_seeds,
                   "scoring_model": s.endpoint_model}
            out[n] = autointerp_output(r, cfg)
    return out


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or type(model).__name__)


def _named(saes: Any, device: str) -> dict[str, SAE]:
    """``{name: SAE}``: names as given on the command line, loaded in order (the first bad
    name fails in one line before the model loads)."""
    if isinstance(saes, Mapping):
        return dict(saes)
    out: dict[str, SAE] = {}
    for x in [saes] if isinstance(saes, str | SAE) else list(saes):
        sae = SAE.from_pretrained(x, device=device) if isinstance(x, str) else x
        key = x if isinstance(x, str) else sae.name
        if key in out:
            raise InputError(f"SAE {key} is given twice")
        out[key] = sae
    if not out:
        raise InputError("no SAE given; pass --sae NAME (repeat for several)")
    return out


def _load(saes: Any, model: Any, tokenizer: Any, device: str, dtype: str | None,
          metrics: Sequence[str]) -> tuple[dict[str, SAE], nn.Module, Any]:
    named = _named(saes, device)
    if "absorption" in metrics:
        tc = [n for n, sae in named.items() if sae.is_transcoder]
        if tc:
            raise InputError(f"absorption is not defined for transcoders ({', '.join(tc)}): its "
                             "decoder writes another site than the probe reads; drop absorption")
    first = next(iter(named.values()))
    if model is None or isinstance(model, str):
        model, tokenizer = load_model(model or base_model_of(first), device=device, dtype=dtype,
                                      hidden_size=first.d_model)
    elif tokenizer is None:
        raise InputError("a model object needs its tokenizer (tokenizer=...)")
    for n, sae in named.items():
        check_compatible(model, sae, n)
    return named, model, tokenizer


def _check_cache(s: BenchSettings, names: Sequence[str], d_model: int, n_sites: int) -> None:
    rows = sum(min(D.load(ds).n_total, D.MAX_ROWS) for ds in names) if "probing" in s.metrics else 0
    need = cache_bytes(rows, d_model, n_sites)
    if need > s.max_cache_gb * 1e9:
        raise InputError(f"the probing activation cache needs {need / 1e9:.1f} GB (4 bytes x "
                         f"{d_model} x {n_sites} hook point(s) x {rows} prompts), more than "
                         f"--max-cache-gb {s.max_cache_gb:g}; raise it or pass fewer --dataset")


def benchmark(saes: str | SAE | Sequence[str | SAE] | Mapping[str, SAE], *,
              out: str | Path, model: str | nn.Module | None = None, tokenizer: Any = None,
              device: str = "cpu", dtype: str | None = None,
              settings: BenchSettings | None = None) -> BenchRun:
    """Benchmark SAEs (any the SDK loads: names, folders, ``"demo"``, SAE objects) on one model.

    Args:
        saes: one or several SAEs; their names key the results.
        out: the results folder (see the module docstring).
        model, tokenizer: a model name or folder (default: the first SAE's base model), or a
            loaded ``transformers`` model with its tokenizer.
        settings: metrics, seeds, k values, datasets, text, endpoint (:class:`BenchSettings`).

    Returns:
        :class:`BenchRun`: per SAE its metric outputs (spreads included), the files written,
        the timings (activation capture vs probe fitting per dataset, per metric).

    Raises:
        InputError, FolderNotOwnedError, DataUnavailableError: bad input, before any model
            loads. UnknownSaeError, IncompatibleModelError: from loading.
    """
    s = settings or BenchSettings()
    out = check_settings(s, out)
    names = s.datasets or (D.dataset_names() if "probing" in s.metrics else [])
    t_start = time.perf_counter()
    named, lm, tok = _load(saes, model, tokenizer, device, dtype, s.metrics)
    _check_cache(s, names, next(iter(named.values())).d_model, len(_sites(named)))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"written_by": "llamascope bench"}))
    cache = ActivationCache(out / "cache", lm, tok, batch_tokens=s.batch_tokens)
    timing: dict[str, Any] = {"load_s": time.perf_counter() - t_start}
    results: dict[str, list[MetricOutput]] = {n: [] for n in named}
    steps = {"core": lambda: {n: core_output(r, _core_cfg(lm, s)) for n, r in core_metrics(
                 lm, tok, named, _text(s, names), n_seeds=s.n_seeds,
                 tokens=s.core_tokens, context=s.core_context).items()},
             "probing": lambda: run_probing(cache, named, names, s, timing),
             "absorption": lambda: run_absorption(cache, tok, named, s),
             "autointerp": lambda: run_autointerp(lm, tok, named,
                                                  _text(s, names), s)}
    for m in METRICS:
        if m in s.metrics:
            t0 = time.perf_counter()
            for n, o in steps[m]().items():
                results[n].append(o)
            timing[f"{m}_s"] = time.perf_counter() - t0
    timing["activation_forward_s"] = cache.timing.forward_s
    timing["activation_tokens"] = cache.timing.tokens
    timing["activation_padded_tokens"] = cache.timing.padded_tokens
    timing["activation_reused_rows"] = cache.timing.reused_rows
    timing["activation_reused_tokens"] = cache.timing.reused_tokens
    timing["tokenize_s"] = cache.timing.tokenize_s
    timing["total_s"] = time.perf_counter() - t_start
    return _write(out, named, results, timing)


def _core_cfg(model: nn.Module, s: BenchSettings) -> dict[str, Any]:
    return {"model_name": _model_name(model), "context_size": s.core_context,
            "dataset": s.text or "sae-probes prompts", "compute_kl": True,
            "compute_ce_loss": True, "exclude_special_tokens_from_reconstruction": True,
            "n_seeds": s.n_seeds, "tokens_per_seed": s.core_tokens}


def _write(out: Path, named: Mapping[str, SAE], results: dict[str, list[MetricOutput]],
           timing: dict[str, Any]) -> BenchRun:
    files: list[Path] = []
    for n, outs in results.items():
        cfg = {**named[n].hyperparams.model_dump(mode="json"), "d_in": named[n].d_model}
        files += write_jsons(out / _slug(n), n, cfg, outs)
    text = table(results)
    atomic_write_text(out / "comparison.md", text)
    files.append(out / "comparison.md")
    png = plot(results, out / "comparison.png")
    if png is not None:
        files.append(png)
    atomic_write_text(out / "summary.json", json.dumps(
        {"timing": timing, "files": [str(f) for f in files]}, indent=2, default=str))
    return BenchRun(results, files, timing, text)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


__all__ = ["DEFAULT_METRICS", "METRICS", "REFUSED", "BenchRun", "BenchSettings", "benchmark",
           "check_settings", "run_absorption", "run_autointerp", "run_probing"]
