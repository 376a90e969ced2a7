"""circuit-tracer transcoder sets: export of Llama Scope transcoders (LXTC).

Checked against decoderesearch/circuit-tracer ``circuit_tracer/transcoder/
single_layer_transcoder.py`` (``SingleLayerTranscoder``, ``load_transcoder``,
``load_transcoder_set``), ``utils/hf_utils.py`` (``load_transcoder_from_hub``,
``resolve_transcoder_paths``) and ``replacement_model.py`` (the feature input hook is found by
``getattr`` along ``feature_input_hook.split(".")`` from each block), at the 2025 HEAD
(0.5-era; spec peers section 8). The library is not needed here.

A set is one ``layer_{L}.safetensors`` per layer 0..N-1 plus ``config.yaml``::

    model_kind: transcoder_set
    model_name: meta-llama/Llama-3.1-8B
    feature_input_hook: ln2.hook_normalized     # looked up on each TransformerLens block
    feature_output_hook: hook_mlp_out
    scan: <name>
    transcoders: [<path or hf://repo/layer_0.safetensors>, ...]

Each file holds ``W_enc`` [F, D], ``b_enc`` [F], ``W_dec`` [F, D], ``b_dec`` [D] and
``activation_function.threshold`` [F]; circuit-tracer computes::

    pre  = x @ W_enc.T + b_enc
    acts = pre * (pre > threshold)          (JumpReLU; ReLU when there is no threshold)
    y^   = acts @ W_dec + b_dec

which is this SDK's folded math exactly when ``W_enc``/``b_enc``/``W_dec``/``b_dec`` are the
folded weights and ``threshold = theta`` for every feature (values in model units).

Input side: LXTC reads ``blocks.L.ln2.hook_normalized`` = r / sqrt(mean(r^2) + eps) without
the RMSNorm gain (spec 1.3). That per-token normalisation cannot be folded into a linear
encoder, so the export does NOT use circuit-tracer's default ``hook_resid_mid`` (the raw
residual) or ``mlp.hook_in``: it sets ``feature_input_hook: ln2.hook_normalized``, which
TransformerLens provides on Llama blocks (before the gain; with or without fold_ln), so the
features circuit-tracer computes are exactly this SDK's. During attribution circuit-tracer
freezes the normalisation scales, so gradients through ln2 stay linear in the residual.
This relies on the TransformerLens backend (the nnsight backend maps hook names through its
own table and may not know ``ln2.hook_normalized``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import cast

import torch

import llamascope_sdk.loading.formats.layouts as layouts
from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.core.sites import HOOK_KINDS, POSITIONS
from llamascope_sdk.loading.formats._build import (
    Exportable,
    UnsupportedFormatError,
    write_sae_folder,
)
from llamascope_sdk.loading.registry import BASE_MODEL

CONFIG = layouts.CIRCUIT_TRACER_CONFIG
#: What circuit-tracer looks up on each TransformerLens block: the TC position's two suffixes.
FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK = (HOOK_KINDS[k].suffix for k in POSITIONS["TC"])


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def check_one(sae: Exportable) -> int:
    """The layer of one transcoder, after checking it fits a circuit-tracer set."""
    hp = sae.hyperparams
    parts_in, parts_out = hp.hook_point_in.split("."), hp.hook_point_out.split(".")
    if (len(parts_in) != 4 or parts_in[0] != "blocks" or ".".join(parts_in[2:]) != FEATURE_INPUT_HOOK
            or ".".join(parts_out[2:]) != FEATURE_OUTPUT_HOOK or parts_in[1] != parts_out[1]):
        raise UnsupportedFormatError(
            f"{sae.name}: circuit-tracer sets are MLP transcoders "
            f"blocks.L.{FEATURE_INPUT_HOOK} -> blocks.L.{FEATURE_OUTPUT_HOOK}; this one reads "
            f"{hp.hook_point_in} and writes {hp.hook_point_out}",
            hint="export the LXTC transcoders (e.g. `llamascope convert LXTC-8x --to circuit-tracer OUT`)")
    if hp.act_fn == "topk":
        raise UnsupportedFormatError(f"{sae.name}: export JumpReLU/ReLU transcoders (act_fn {hp.act_fn!r})")
    return int(parts_in[1])


def check_layers(layers: Sequence[int], widths: Sequence[int]) -> None:
    if len(set(layers)) != len(layers):
        raise UnsupportedFormatError(f"two transcoders for one layer: {sorted(layers)}")
    if not layers or sorted(layers) != list(range(max(layers) + 1)):
        raise UnsupportedFormatError(
            f"a circuit-tracer set needs one transcoder for every layer 0..N-1; got layers "
            f"{sorted(layers)}")
    if len(set(widths)) != 1:
        raise UnsupportedFormatError(f"all transcoders of a set need the same d_sae; got {sorted(set(widths))}")


def layer_tensors(sae: Exportable, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The circuit-tracer tensors of one transcoder (folded weights; threshold per feature)."""
    dt = dtype or torch.float32

    def c(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dt).contiguous()

    out = {"W_enc": c(sae.W_enc), "b_enc": c(sae.b_enc), "W_dec": c(sae.W_dec), "b_dec": c(sae.b_dec)}
    if sae.hyperparams.act_fn == "jumprelu":
        out["activation_function.threshold"] = c(sae.gate_threshold().expand(sae.d_sae))
    return out


def _member(item: Exportable | Callable[[], Exportable]) -> Exportable:
    """One member of a set: an SAE as it is (an nn.Module, itself callable, so told apart by
    type), anything else a loader to call."""
    if isinstance(item, torch.nn.Module):
        return cast(Exportable, item)
    return cast(Callable[[], Exportable], item)()


def export(saes: Iterable[Exportable | Callable[[], Exportable]], out: str | os.PathLike[str], *, model_name: str | None = None,
           scan: str | None = None, hub_repo: str | None = None,
           dtype: torch.dtype | None = None) -> Path:
    """Write a circuit-tracer transcoder set (``config.yaml`` + ``layer_L.safetensors``).

    Args:
        saes: one transcoder per layer 0..N-1, in any order: SAEs, or zero-argument callables
            that load one (then only one transcoder is in memory at a time).
        model_name: the base model (default: Llama-3.1-8B).
        scan: the set's name in circuit-tracer (default: derived from the layer-0 name).
        hub_repo: write ``transcoders`` as ``hf://<hub_repo>/layer_L.safetensors`` for a set
            that will be uploaded to that repository; default: absolute local paths.
        dtype: dtype of the written tensors (default float32; circuit-tracer casts on load).
    """
    import yaml  # pyyaml (a dependency of huggingface_hub); only this export writes YAML

    out = Path(out).expanduser().resolve()
    layers: list[int] = []
    widths: list[int] = []
    names: dict[int, str] = {}

    def write(tmp: Path) -> None:
        for item in saes:
            sae = _member(item)
            layer = check_one(sae)
            layers.append(layer)
            widths.append(sae.d_sae)
            names[layer] = sae.name
            atomic_save_safetensors(layer_tensors(sae, dtype), tmp / layer_file(layer),
                                    metadata={"format": "pt", "source": sae.name,
                                                "llamascope_sdk": "circuit-tracer layer"})
            del sae
        check_layers(layers, widths)
        first = names[0]
        name = scan or (first.replace("L0TC", "LXTC") if "L0TC" in first else f"llamascope-{first}")
        paths = [f"hf://{hub_repo}/{layer_file(i)}" if hub_repo else str(out / layer_file(i))
                 for i in range(len(layers))]
        config = {"model_kind": "transcoder_set", "model_name": model_name or BASE_MODEL,
                  "scan": name, "feature_input_hook": FEATURE_INPUT_HOOK,
                  "feature_output_hook": FEATURE_OUTPUT_HOOK, "transcoders": paths}
        atomic_write_text(tmp / CONFIG, yaml.safe_dump(config, sort_keys=False))

    return write_sae_folder(out, write)
