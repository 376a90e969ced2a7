"""Exporting a chosen edit: as an lm-evaluation-harness ``steered`` file, and as a
``llamascope serve`` request body.

lm-eval's ``steered`` model (``--model steered --model_args pretrained=...,steer_path=F.pt``,
lm_eval/models/hf_steered.py) reads a ``.pt`` dict ``{hookpoint: {"action", "steering_coefficient",
"steering_vector", "bias"}}``. The hookpoint is a module name under the model's
``base_model`` (for a Llama causal LM: ``layers.15`` is that decoder layer's output, the
residual stream R; ``layers.15.mlp`` M and TC; ``layers.15.self_attn`` A). Its ``add`` adds
``coefficient x vector`` to that module's output at every position. The export of a
:class:`~llamascope_sdk.steering.interventions.Steer` writes the summed vector ``Σ_i α_i d_i`` (model
units) with coefficient 1, so lm-eval adds exactly what the SDK adds. Differences, stated:

* lm-eval adds at every position, BOS and other special tokens included; the SDK leaves special
  tokens alone by default. On text without special tokens the logits are identical (lm-eval
  0.4.13, SmolLM2-135M, fp32: max difference 0, bench/lm_eval_steered_check.py); with a BOS
  first they differ (0.45 in the logits there).
* lm-eval's ``clamp`` sets the projection of ``(activation - bias)`` on the unit direction to
  the coefficient: a clamp of a direction. An SAE feature clamp sets the feature's *encoder*
  activation f_i (JumpReLU of the encoder row, not a projection on d_i) and adds
  ``(value - f_i) d_i``. They are different edits, so clamp, scale and ablate are refused here
  rather than exported as something else; so are positions other than "all" and edits at
  several hookpoints (the original hf_steered.py of PR #2749 built each ``add`` hook as a lambda
  over the loop's variables, so every hookpoint got the last vector; 0.4.13 binds each with
  ``partial``. One hookpoint per file is right with both). Relative strengths are resolved to
  model units before writing.

Writing the ``.pt`` uses ``torch.save`` (an export for lm-eval, which reads it with
``torch.load``); the SDK itself never loads such files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.atomic import atomic_write_bytes, atomic_write_text
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.sites import parse_hook_point
from llamascope_sdk.steering.interventions import Ablate, Clamp, Intervention, Scale, Steer


def lm_eval_hookpoint(hook_point_out: str) -> str:
    """``blocks.15.hook_resid_post`` -> ``layers.15``: the module (under ``base_model``) whose
    output the SAE writes."""
    site = parse_hook_point(hook_point_out)
    if site.reads_input:
        raise InputError(f"{hook_point_out}: lm-eval hooks module outputs, not this input site")
    return site.module_path.removeprefix("model.")


def lm_eval_steer_config(edits: Sequence[Intervention]) -> dict[str, dict[str, Any]]:
    """The dict lm-eval's ``steered`` model reads, for Steer edits at one hookpoint.

    Raises:
        InputError: an edit that is not a Steer (clamp/scale/ablate differ from lm-eval's
            actions), positions other than "all", or edits at more than one hookpoint.
    """
    if not edits:
        raise InputError("nothing to export: give at least one Steer")
    vector: torch.Tensor | None = None
    hookpoint = None
    for iv in edits:
        if not isinstance(iv, Steer):
            raise InputError(f"lm-eval export: {type(iv).__name__} cannot be exported; lm-eval's "
                             "'clamp' sets a direction's projection, not an SAE feature's "
                             "activation, and it has no scale or ablate",
                             hint="export Steer (add) edits only")
        if iv.positions != "all":
            raise InputError(f"lm-eval export: positions={iv.positions!r}; lm-eval adds at every "
                             "position, so only positions='all' exports faithfully")
        hp = lm_eval_hookpoint(iv.sae.hyperparams.hook_point_out)
        if hookpoint is not None and hp != hookpoint:
            raise InputError(f"lm-eval export: edits at {hookpoint} and {hp}; lm-eval applies one "
                             "vector per file faithfully (its add hooks share the loop's last "
                             "vector), so export one hookpoint per file")
        hookpoint = hp
        v = (iv.coefficients().float() @ iv.sae.W_dec[iv.idx].float()).cpu()
        vector = v if vector is None else vector + v
    assert vector is not None and hookpoint is not None
    return {hookpoint: {"action": "add", "steering_coefficient": 1.0,
                        "steering_vector": vector.contiguous(), "bias": None}}


def save_lm_eval_steer(edits: Sequence[Intervention], path: str | Path) -> Path:
    """Write :func:`lm_eval_steer_config` to ``path`` (a new ``.pt`` file), atomically.

    Raises:
        InputError: the path does not end in .pt, or it exists (never overwritten).
    """
    import io

    path = Path(path).expanduser()
    if path.suffix not in (".pt", ".pth"):
        raise InputError(f"{path}: lm-eval reads steer files ending in .pt or .pth")
    if path.exists():
        raise InputError(f"{path} exists; choose a new file name (it is never overwritten)")
    config = lm_eval_steer_config(edits)
    buf = io.BytesIO()
    torch.save(config, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def serve_request(edit: Intervention, *, sae_spec: str, prompt: str = "Tell me about the sea.",
                  max_tokens: int = 64, chat: bool = True) -> dict[str, Any]:
    """A ``llamascope serve`` request body that applies ``edit`` (chat completions by default,
    with ``return_baseline`` so the reply shows the unsteered text too)."""

    feats = [int(i) for i in edit.idx.tolist()]
    entry: dict[str, Any] = {"sae": sae_spec, "feature": feats if len(feats) > 1 else feats[0]}
    if isinstance(edit, Steer):
        entry.update(mode="add", value=_value(edit.strength), relative=edit.relative)
    elif isinstance(edit, Clamp):
        entry.update(mode="clamp", value=_value(edit.value))
    elif isinstance(edit, Scale):
        entry.update(mode="scale", value=_value(edit.factor))
    elif isinstance(edit, Ablate):
        entry.update(mode="ablate", mean=edit.mode == "mean")
    if not isinstance(edit.positions, str):
        raise InputError(f"serve takes positions prompt, generated or all, not {edit.positions!r}")
    entry["positions"] = edit.positions
    body: dict[str, Any] = {"max_tokens": max_tokens, "steering": [entry],
                            "return_baseline": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _value(v: Any) -> Any:
    t = torch.as_tensor(v, dtype=torch.float64).reshape(-1).tolist()
    return t[0] if len(t) == 1 else t


def save_serve_request(edit: Intervention, path: str | Path, *, sae_spec: str,
                       **kwargs: Any) -> Path:
    """Write :func:`serve_request` as JSON to ``path`` (never over an existing file)."""
    path = Path(path).expanduser()
    if path.exists():
        raise InputError(f"{path} exists; choose a new file name (it is never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(serve_request(edit, sae_spec=sae_spec, **kwargs),
                                       indent=1) + "\n")
    return path


__all__ = ["lm_eval_steer_config", "lm_eval_hookpoint", "save_lm_eval_steer", "serve_request",
           "save_serve_request"]
