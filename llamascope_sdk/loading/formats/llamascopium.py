"""Llamascopium 2 (``lm_saes`` 2.x, the authors' current library): export and import.

Source of the layout: spec peers section 8 ("Llamascopium 2.0.0b34", checked against the
installed library there) and OpenMOSS/Language-Model-SAEs ``abstract_sae.py``
(``full_state_dict`` adds ``dataset_average_activation_norm.<hook_point>`` scalars;
``save_checkpoint`` writes ``sae_weights.safetensors``). A folder holds ``config.json`` and
``sae_weights.safetensors`` with::

    W_E [D, F], b_E [F], W_D [F, D], b_D [D]
    activation_function.log_jumprelu_threshold [F]      (log of a per-feature threshold t)
    dataset_average_activation_norm.<hook_point_in>      scalar n_in  (dataset-wise mode)
    dataset_average_activation_norm.<hook_point_out>     scalar n_out

Its math in ``norm_activation: "dataset-wise"`` mode (x raw, s = sqrt(D)/n)::

    h = (s_in x) @ W_E + b_E
    g = h * ||W_D[i]||  if sparsity_include_decoder_norm  else  h      (the gated quantity)
    f = h * 1[g > t]                                   (jumprelu;  topk keeps the k largest g)
    y^ = (f @ W_D + b_D) / s_out

Export writes the release's own training-space tensors (``W_E = encoder.weight.T``,
``W_D = decoder.weight.T``, biases, dataset norms; bit-identical to the release file) with
``sparsity_include_decoder_norm: true`` and ``t_i = theta_i * s_out``, because this SDK's gate
``||d_i|| h_i / s_out > theta`` is ``h_i ||d_i|| > theta s_out`` (spec 3.2). Its values f are
training-space (``f = f_ours * s_out / ||d_i||``); masks and reconstructions are the
reference's when Llamascopium loads it in the dataset-wise mode the config declares
(checked against llamascopium 2.0.0b34 by bench/peer_interop_check.py: 0 mask differences).
Do not load it with ``fold_activation_scale=True``: in 2.0.0b34
``SparseAutoEncoder.standardize_parameters_of_dataset_norm`` folds the weights but leaves the
JumpReLU threshold unscaled, so other features fire (a bug of that version; its
cross-layer transcoder rescales it).

Import reads both key spellings (``W_E``/``encoder.weight``; ``activation_function.`` prefix
or not) and maps ``t`` back: ``theta_i = t_i / s_out`` (decoder-norm gating) or
``t_i ||d_i|| / s_out`` (plain gating), kept per feature when they differ.
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
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.loading.formats._build import (
    Exportable,
    Plain,
    UnsupportedFormatError,
    matrix,
    need,
    read_json,
    read_tensors,
    threshold_vector,
    write_sae_folder,
)

CONFIG = layouts.LLAMASCOPIUM_CONFIG
WEIGHTS = layouts.LLAMASCOPIUM_WEIGHTS
_NORM = "dataset_average_activation_norm."


is_config = layouts.is_llamascopium_config


# ---------------------------------------------------------------------------- export
def export(sae: Exportable, out: str | os.PathLike[str]) -> Path:
    """Write ``sae`` as a Llamascopium 2 folder (exact; see the module docstring)."""
    hp = sae.hyperparams
    raw = sae.raw_state_dict()  # training space, the file's dtype
    tensors: dict[str, torch.Tensor] = {
        "W_E": raw["encoder.weight"].t().contiguous(), "b_E": raw["encoder.bias"],
        "W_D": raw["decoder.weight"].t().contiguous(),
        "b_D": raw["decoder.bias"] if "decoder.bias" in raw else torch.zeros(hp.d_model, dtype=raw["encoder.bias"].dtype),
    }
    if hp.act_fn == "jumprelu":
        t = sae.gate_threshold().detach().double().cpu().expand(hp.d_sae) * hp.scale_out
        if bool((t <= 0).any()):
            raise UnsupportedFormatError(
                f"{sae.name}: a threshold <= 0 has no logarithm; Llamascopium stores "
                "log_jumprelu_threshold")
        tensors["activation_function.log_jumprelu_threshold"] = t.log().float().contiguous()
    norms = hp.dataset_average_activation_norm
    dataset_wise = hp.norm_activation == "dataset-wise" and bool(norms)
    if dataset_wise and norms is not None:
        tensors[_NORM + hp.hook_point_in] = torch.tensor(float(norms.in_))
        tensors[_NORM + hp.hook_point_out] = torch.tensor(float(norms.out))
    cfg: dict[str, Any] = {
        "sae_type": "sae", "hook_point_in": hp.hook_point_in, "hook_point_out": hp.hook_point_out,
        "d_model": hp.d_model, "expansion_factor": hp.expansion_factor or max(1, hp.d_sae // hp.d_model),
        "d_sae": hp.d_sae, "use_decoder_bias": True, "act_fn": hp.act_fn,
        "norm_activation": "dataset-wise" if dataset_wise else "inference",
        "sparsity_include_decoder_norm": True if hp.act_fn != "topk" else hp.sparsity_include_decoder_norm,
        "top_k": hp.top_k, "jumprelu_threshold_window": 2.0,
        "apply_decoder_bias_to_pre_encoder": False, "use_glu_encoder": False,
        "force_unit_decoder_norm": False, "dtype": str(raw["encoder.weight"].dtype), "device": "cpu",
        "llamascope_sdk": {"name": sae.name, "converted_from": "llamascope release layout"},
    }

    def write(tmp: Path) -> None:
        atomic_save_safetensors(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG, json.dumps(cfg, indent=2) + "\n")

    return write_sae_folder(out, write)


# ---------------------------------------------------------------------------- import
def read(folder: str | Path) -> Plain:
    """Read a Llamascopium 2 SAE/transcoder folder into a :class:`~._build.Plain` record
    (exact reference math)."""
    folder = Path(folder)
    where = f"Llamascopium folder {folder}"
    cfg = read_json(folder / CONFIG)
    weights = folder / WEIGHTS
    if not weights.is_file():
        found = sorted(folder.glob("*.safetensors"))
        if len(found) != 1:
            raise CorruptCheckpointError(f"{where}: no {WEIGHTS}")
        weights = found[0]
    t = read_tensors(weights)
    sae_type = cfg.get("sae_type", "sae")
    if sae_type not in ("sae", "transcoder"):
        raise UnsupportedFormatError(f"{where}: sae_type {sae_type!r} (crosscoder, CLT, lorsa, ...) "
                                     "is not a single SAE/transcoder; not supported")
    if cfg.get("apply_decoder_bias_to_pre_encoder") or cfg.get("use_glu_encoder"):
        raise UnsupportedFormatError(f"{where}: apply_decoder_bias_to_pre_encoder/use_glu_encoder "
                                     "are not supported")
    W_E = (matrix(t["W_E"], "W_E", where, "[d_model, d_sae]") if "W_E" in t
           else matrix(need(t, ("encoder.weight",), where), "encoder.weight", where, "[d_sae, d_model]").t())
    b_E = need(t, ("b_E", "encoder.bias"), where)
    W_D = (matrix(t["W_D"], "W_D", where, "[d_sae, d_model]") if "W_D" in t
           else matrix(need(t, ("decoder.weight",), where), "decoder.weight", where, "[d_model, d_sae]").t())
    b_D = t.get("b_D", t.get("decoder.bias"))
    d_model, d_sae = W_E.shape
    hook_in, hook_out = str(cfg["hook_point_in"]), str(cfg.get("hook_point_out") or cfg["hook_point_in"])
    act = str(cfg.get("act_fn", "jumprelu")).lower()
    if act not in ("jumprelu", "topk", "relu"):
        raise UnsupportedFormatError(f"{where}: act_fn {act!r} is not supported (jumprelu, topk, relu)")
    norm_mode = cfg.get("norm_activation", "dataset-wise")
    hp: dict[str, Any] = {k: v for k, v in cfg.items() if k not in ("llamascope_sdk",)}
    hp.update({"d_model": d_model, "d_sae": d_sae, "hook_point_in": hook_in,
               "hook_point_out": hook_out, "act_fn": act, "use_decoder_bias": b_D is not None,
               "dtype": str(W_E.dtype), "converted_from": {"format": "llamascopium", "config": cfg},
               # Llamascopium declares expansion_factor a float (its own saves write 4.0).
               "expansion_factor": d_sae // d_model if d_sae % d_model == 0 else None})
    if norm_mode == "dataset-wise":
        try:
            n_in = float(t[_NORM + hook_in])
            n_out = float(t[_NORM + hook_out])
        except KeyError:
            raise CorruptCheckpointError(
                f"{where}: norm_activation is dataset-wise but the weights lack "
                f"'{_NORM}{hook_in}'/'{_NORM}{hook_out}'") from None
        hp["dataset_average_activation_norm"] = {"in": n_in, "out": n_out}
        hp["norm_activation"] = "dataset-wise"
    elif norm_mode in ("inference", "none", None):
        hp["norm_activation"] = "inference"
        hp.pop("dataset_average_activation_norm", None)
    else:
        raise UnsupportedFormatError(f"{where}: norm_activation {norm_mode!r} (per-token) is not supported")
    hp.setdefault("sparsity_include_decoder_norm", True)
    hp["jump_relu_threshold"] = 0.0
    params = Hyperparams.from_dict(hp, source=where)
    raw = {"encoder.weight": W_E.t().contiguous(), "encoder.bias": b_E,
           "decoder.weight": W_D.t().contiguous()}
    if b_D is not None:
        raw["decoder.bias"] = b_D
    thr: torch.Tensor | None = None
    if act == "jumprelu":
        log_t = t.get("activation_function.log_jumprelu_threshold", t.get("log_jumprelu_threshold"))
        if log_t is None:
            raise CorruptCheckpointError(f"{where}: a JumpReLU checkpoint without log_jumprelu_threshold")
        name = ("activation_function.log_jumprelu_threshold"
                if "activation_function.log_jumprelu_threshold" in t else "log_jumprelu_threshold")
        thr = threshold_vector(log_t, name, d_sae, where).exp() / params.scale_out
        if not bool(torch.isfinite(thr).all()):
            bad = int((~torch.isfinite(thr)).nonzero()[0])
            raise CorruptCheckpointError(
                f"{where}: tensor '{name}' is {float(log_t.reshape(-1).expand(d_sae)[bad]):g} for "
                f"feature {bad}, whose threshold exp(.) is not finite; expected finite logarithms")
    # Gated on h alone (not h ||W_D[i]||): theta_i = t_i ||d_i|| / s_out, with the decoder
    # norms the SAE computes when it folds these tensors.
    return Plain(params, raw, W_E.dtype, thr,
                 threshold_times_decoder_norm=thr is not None and not params.sparsity_include_decoder_norm)

