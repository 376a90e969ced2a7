"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``): export and import.

Checked against SAELens 6.x source (``sae_lens/saes/sae.py``, ``jumprelu_sae.py``,
``topk_sae.py``, ``standard_sae.py``, ``transcoder.py``; spec peers section 8 for 6.54) — the
library itself is not needed here. SAELens's math, on the raw hook activation x::

    sae_in = x - b_dec * apply_b_dec_to_input        (never for transcoders)
    pre    = sae_in @ W_enc + b_enc                  W_enc [d_in, d_sae]
    jumprelu: f = relu(pre) * (pre > threshold)      threshold [d_sae]
    topk    : f = scatter(relu(topk(pre', k)))       pre' = pre * ||W_dec_i|| if
                                                     rescale_acts_by_decoder_norm, else pre
    standard: f = relu(pre)
    x^     = f' @ W_dec + b_dec                      W_dec [d_sae, d_out]; f' = f/||W_dec_i||
                                                     for topk with rescale_acts_by_decoder_norm

Export (unit convention): the folded weights as they are — ``W_enc = sae.W_enc.T``,
``b_enc``, ``W_dec = sae.W_dec`` (unit rows), ``b_dec``, ``threshold = theta`` for every
feature — with ``normalize_activations: "none"`` and ``apply_b_dec_to_input: false``. Feature
values are then in **model units**, exactly this SDK's values (the length of each feature's
contribution to the raw output), not the training-space values of SAELens's own Llama Scope
loader (those are ``f_ours * s / ||d_i||``, spec 3.4); which features fire and the
reconstruction are the reference's (spec 3.2). A transcoder is written as SAELens's
``jumprelu_transcoder`` (``d_out``; ``metadata.hook_name`` is the input hook and
``metadata.hook_name_out`` the output hook). A Top-K SAE is written as ``topk`` (k); one that
ranks by ReLU(h) without decoder norms is written with its W_enc row i divided by and its W_dec
row i multiplied by ||d_i||, which keeps SAELens's ranking and the reconstruction exact (its
values are then f_ours/||d_i||). A ReLU SAE is written as ``standard``.

Import: JumpReLU, Top-K and standard (ReLU) SAEs, and JumpReLU transcoders, from a local folder
or a Hub ``org/repo/subfolder``; see :mod:`._build` for the exact mapping (our value =
SAELens value x ||W_dec_i|| except for rescaled Top-K, where they are equal). Refused with a
clear error: ``layer_norm``/``constant_norm_rescale`` input normalisation (per token, not
linear), ``hook_z`` reshaping, skip transcoders, gated and other architectures, and
``expected_average_only_in`` unless its ``norm_scaling_factor`` is given (SAELens folds it
from its pretrained registry; a folder does not hold it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

import llamascope_sdk.loading.formats.layouts as layouts
from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.base.errors import CorruptCheckpointError
from llamascope_sdk.loading.formats._build import (
    Exportable,
    Plain,
    UnsupportedFormatError,
    matrix,
    need,
    plain_record,
    read_json,
    read_tensors,
    threshold_vector,
    write_sae_folder,
)
from llamascope_sdk.loading.models import base_model_of
from llamascope_sdk.loading.registry import BASE_MODEL

CFG = layouts.SAELENS_CFG
WEIGHTS = layouts.SAELENS_WEIGHTS
JUMPRELU, TOPK, STANDARD = "jumprelu", "topk", "standard"
JUMPRELU_TC = "jumprelu_transcoder"


# ---------------------------------------------------------------------------- export
def export(sae: Exportable, out: str | os.PathLike[str], *, model_name: str | None = None) -> Path:
    """Write ``sae`` as a SAELens folder (exact; values in model units, see module docstring)."""
    hp = sae.hyperparams
    if sae.d_model != hp.d_model:
        raise UnsupportedFormatError("d_model mismatch")
    model = model_name or _base_model(sae)
    W_enc = sae.W_enc.detach().float().cpu()
    b_enc = sae.b_enc.detach().float().cpu()
    W_dec = sae.W_dec.detach().float().cpu()
    b_dec = sae.b_dec.detach().float().cpu()
    tensors: dict[str, torch.Tensor]
    cfg: dict[str, Any] = {"d_in": hp.d_model, "d_sae": hp.d_sae, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": False, "normalize_activations": "none",
                           "reshape_activations": "none"}
    if hp.act_fn == "jumprelu":
        thr = sae.gate_threshold().detach().float().cpu().expand(hp.d_sae).clone()
        tensors = {"W_enc": W_enc.t().contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                   "threshold": thr}
        arch = JUMPRELU_TC if sae.is_transcoder else JUMPRELU
    elif sae.is_transcoder:
        raise UnsupportedFormatError(
            f"{sae.name}: SAELens has JumpReLU (and ReLU) transcoders only; this transcoder's "
            f"activation is {hp.act_fn!r}", hint="export a JumpReLU transcoder, or use --to llamascopium")
    elif hp.act_fn == "topk":
        arch = TOPK
        if hp.sparsity_include_decoder_norm:
            tensors = {"W_enc": W_enc.t().contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        else:  # rank by relu(a)/n_i: scale the encoder down and the decoder up by n_i
            n = sae.decoder_norm.detach().float().cpu()
            safe = torch.where(n > 0, n, torch.ones_like(n))
            tensors = {"W_enc": (W_enc / safe[:, None]).t().contiguous(), "b_enc": b_enc / safe,
                       "W_dec": W_dec * n[:, None], "b_dec": b_dec}
        cfg.update({"k": hp.top_k, "rescale_acts_by_decoder_norm": False})
    else:
        arch = STANDARD
        tensors = {"W_enc": W_enc.t().contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    layer = _layer(hp.hook_point_in)
    meta: dict[str, Any] = {
        "model_name": model, "hook_name": hp.hook_point_in, "hook_head_index": None,
        "prepend_bos": True, "context_size": 1024, "dataset_path": "cerebras/SlimPajama-627B",
        "model_from_pretrained_kwargs": {}, "neuronpedia_id": None,
        "llamascope_sdk": {"name": sae.name, "units": "model units (folded weights, unit decoder rows)",
                           "hook_point_out": hp.hook_point_out},
    }
    if sae.is_transcoder:
        cfg["d_out"] = hp.d_model
        meta.update({"hook_name_out": hp.hook_point_out, "hook_layer_out": _layer(hp.hook_point_out)})
    cfg["metadata"] = meta
    cfg["architecture"] = arch
    # Without a version SAELens 6.54 reads the file as a pre-6.0 config and rebuilds metadata
    # from the top-level keys only (dropping hook_name_out); with it, metadata is kept
    # (checked against sae-lens 6.54.12 by bench/peer_interop_check.py).
    cfg["sae_lens_version"] = "6.0.0"
    # SAELens 5.x read these at the top level.
    cfg.update({"model_name": model, "hook_name": hp.hook_point_in, "hook_layer": layer,
                "hook_head_index": None, "prepend_bos": True, "context_size": 1024,
                "dataset_path": "cerebras/SlimPajama-627B"})

    def write(tmp: Path) -> None:
        atomic_save_safetensors(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        atomic_write_text(tmp / CFG, json.dumps(cfg, indent=2) + "\n")

    return write_sae_folder(out, write)


def _base_model(sae: Exportable) -> str:
    try:
        return str(base_model_of(sae))
    except Exception:  # no lm_config: the Llama Scope base model
        return BASE_MODEL


def _layer(hook: str) -> int | None:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None


# ---------------------------------------------------------------------------- import
def read(folder: str | Path, *, norm_scaling_factor: float | None = None) -> Plain:
    """Read a SAELens folder into a :class:`~._build.Plain` record (exact; see the module
    docstring for what is refused)."""
    folder = Path(folder)
    cfg = read_json(folder / CFG)
    t = read_tensors(folder / WEIGHTS)
    where = f"SAELens folder {folder}"
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(
            f"{where}: cfg.json 'metadata' is a {type(meta).__name__} ({str(meta)[:40]!r}); "
            "expected a JSON object (hook_name, model_name, ...)")
    arch = str(cfg.get("architecture") or _legacy_arch(cfg))
    hook_in = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not hook_in:
        raise CorruptCheckpointError(f"{where}: cfg.json names no hook_name")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise UnsupportedFormatError(
            f"{where}: normalize_activations={norm!r} normalises each token at run time, which a "
            "linear encoder cannot express exactly; this SDK cannot import it")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise UnsupportedFormatError(f"{where}: reshape_activations={cfg['reshape_activations']!r} "
                                     "(per-head hook_z SAEs) is not supported")
    if "skip" in arch or "W_skip" in t:
        raise UnsupportedFormatError(
            f"{where}: architecture {arch!r} has a skip connection (W_skip), which this SDK's "
            "SAE cannot express; it is not imported")
    transcoder = "transcoder" in arch
    act = {JUMPRELU: "jumprelu", JUMPRELU_TC: "jumprelu", TOPK: "topk", STANDARD: "relu",
           "transcoder": "relu"}.get(arch)
    if act is None:
        raise UnsupportedFormatError(
            f"{where}: SAELens architecture {arch!r} is not supported (jumprelu, topk, standard, "
            "jumprelu_transcoder, transcoder)")
    W_enc = matrix(need(t, ("W_enc",), where), "W_enc", where, "[d_in, d_sae]")
    b_enc = need(t, ("b_enc",), where)
    W_dec = matrix(need(t, ("W_dec",), where), "W_dec", where, "[d_sae, d_out]")
    b_dec = need(t, ("b_dec",), where)
    file_dtype = W_enc.dtype
    W_e = W_enc.double().t()
    W_d = W_dec.double()
    b_e, b_d = b_enc.double(), b_dec.double()
    if W_d.shape[1] != W_e.shape[1]:
        raise UnsupportedFormatError(f"{where}: d_in {W_e.shape[1]} != d_out {W_d.shape[1]}; this "
                                     "SDK's SAEs read and write the same width")
    if norm == "expected_average_only_in":
        if norm_scaling_factor is None:
            raise UnsupportedFormatError(
                f"{where}: normalize_activations='expected_average_only_in' needs its "
                "norm_scaling_factor (SAELens takes it from its pretrained registry)",
                hint="pass norm_scaling_factor=... (convert --norm-scaling-factor)")
        s = float(norm_scaling_factor)  # SAELens fold_activation_norm_scaling_factor
        W_e, W_d, b_d = W_e * s, W_d / s, b_d / s
    if cfg.get("apply_b_dec_to_input", False) and not transcoder:
        b_e = b_e - W_e @ b_d  # (x - b_dec) @ W_enc + b_enc
    threshold: torch.Tensor | None = None
    if act == "jumprelu":
        if "threshold" in t:
            threshold = threshold_vector(t["threshold"], "threshold", W_e.shape[0], where)
        elif "log_threshold" in t:
            threshold = threshold_vector(t["log_threshold"], "log_threshold", W_e.shape[0], where).exp()
        else:
            raise CorruptCheckpointError(f"{where}: a JumpReLU checkpoint without 'threshold'")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out") or hook_in
    return plain_record(W_e=W_e, b_e=b_e, W_d=W_d, b_d=b_d, act_fn=act, hook_point_in=str(hook_in),
                        hook_point_out=str(hook_out), threshold=threshold, top_k=k,
                        rank_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                        source_format="saelens", source_config=cfg, file_dtype=file_dtype,
                        model_name=_model_name(meta, cfg, where))


def _model_name(meta: dict[str, Any], cfg: dict[str, Any], where: str) -> str | None:
    """The base model the folder names (``metadata.model_name``, or SAELens 5's top level)."""
    name = meta.get("model_name", cfg.get("model_name"))
    if name is not None and not isinstance(name, str):
        raise CorruptCheckpointError(f"{where}: cfg.json model_name is {name!r}; expected a model id")
    return name or None


def _legacy_arch(cfg: dict[str, Any]) -> str:
    """SAELens < 5 had no ``architecture``: the activation said it."""
    act = str(cfg.get("activation_fn_str", "relu"))
    return {"relu": STANDARD, "topk": TOPK, "jumprelu": JUMPRELU}.get(act, act)
