"""EleutherAI sparsify Top-K sparse coders and transcoders: import.

Checked against EleutherAI/sparsify ``sparsify/sparse_coder.py`` (``SparseCoder.encode``,
``decode``, ``forward``, ``load_from_disk``; spec peers section 8 for 1.3). One folder per
hookpoint holds ``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``,
``transcode``, ``skip_connection``, ``activation``) and ``sae.safetensors`` with
``encoder.weight`` [F, D], ``encoder.bias`` [F], ``W_dec`` [F, D], ``b_dec`` [D] (and
``W_skip`` [D, D] with a skip connection). Its math on the hookpoint's activation x::

    x'  = x - b_dec            when NOT transcoding (sparsify subtracts b_dec first)
    pre = relu(x' @ encoder.weight.T + encoder.bias)
    top = the k largest entries of pre (values and indices)
    y^  = sum over top of value * W_dec[index] + b_dec   (+ x @ W_skip.T with a skip)

Mapping (exact, see :mod:`._build`): ``b_e = encoder.bias - encoder.weight @ b_dec`` (SAE)
or ``encoder.bias`` (transcoder), ``act_fn = "topk"`` with ``top_k = k`` and
``sparsity_include_decoder_norm = False`` (ranked by relu(pre)); our values are sparsify's
times ||W_dec[i]||. Hook points come from the folder name on a Llama model
(``layers.L`` -> ``blocks.L.hook_resid_post``, ``layers.L.mlp`` -> ``blocks.L.hook_mlp_out``,
``layers.L.self_attn`` -> ``blocks.L.hook_attn_out``) or the ``hook_point`` argument.

A transcoder on ``layers.L.mlp`` reads the MLP *input*, i.e. the RMSNorm output *with* its
gain g: ``g * n(r)`` where ``n(r)`` is ``blocks.L.ln2.hook_normalized``. Folding g into the
encoder (``W_e[:, j] *= g_j``) makes it read ``ln2.hook_normalized`` exactly; pass the gain
(``model.model.layers[L].post_attention_layernorm.weight``) as ``rmsnorm_gain``. Refused:
skip connections (``W_skip``: a dense [D, D] term this SDK's SAE does not have), GroupMax
activations, transcoders of any other module.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import llamascope_sdk.loading.formats.layouts as layouts
from llamascope_sdk.base.errors import CorruptCheckpointError
from llamascope_sdk.core.sites import HOOK_KINDS, Site, position_sites
from llamascope_sdk.loading.formats._build import (
    Plain,
    UnsupportedFormatError,
    need,
    plain_record,
    read_json,
    read_tensors,
)

CFG = layouts.SPARSIFY_CFG
WEIGHTS = layouts.SPARSIFY_WEIGHTS
_HOOK = re.compile(r"^(?:.*\.)?layers\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")


def hook_points_for(name: str, transcode: bool) -> tuple[str, str]:
    """(hook_point_in, hook_point_out) of a sparsify hookpoint name on a Llama model."""
    m = _HOOK.match(name)
    if m is None:
        raise UnsupportedFormatError(
            f"cannot tell the hook point of sparsify hookpoint {name!r} (expected layers.L, "
            "layers.L.mlp or layers.L.self_attn)", hint="pass hook_point= (convert --hook-point)")
    layer, sub = int(m.group(1)), m.group(2)
    module = {None: "", "attn": "self_attn", "attention": "self_attn"}.get(sub, sub)
    out = next(Site(layer, h.kind) for h in HOOK_KINDS.values()  # the output hooked there
               if h.module == module and not h.reads_input)
    if transcode:
        tc_in, tc_out = position_sites(layer, "TC")
        if out != tc_out:
            raise UnsupportedFormatError(
                f"sparsify transcoder on {name!r}: only MLP transcoders (layers.L.mlp) map onto "
                f"this SDK's hook points ({tc_in.hook_point} -> {tc_out.hook_point})")
        return tc_in.hook_point, tc_out.hook_point
    return out.hook_point, out.hook_point


def read(folder: str | Path, *, hook_point: str | None = None,
         rmsnorm_gain: torch.Tensor | None = None) -> Plain:
    """Read one sparsify hookpoint folder into a :class:`~._build.Plain` record (exact; see
    the module docstring).

    Args:
        hook_point: the TransformerLens hook name to use instead of the one derived from the
            folder name (for a transcoder: its output hook; the input is ln2.hook_normalized).
        rmsnorm_gain: for an MLP transcoder, the post-attention RMSNorm weight of that layer.
    """
    folder = Path(folder)
    where = f"sparsify folder {folder}"
    cfg = read_json(folder / CFG)
    t = read_tensors(folder / WEIGHTS)
    if cfg.get("skip_connection") or "W_skip" in t:
        raise UnsupportedFormatError(
            f"{where}: a skip connection (W_skip, y^ += x @ W_skip.T) cannot be expressed by this "
            "SDK's SAE (no dense input-to-output term); not imported")
    if str(cfg.get("activation", "topk")).lower() != "topk":
        raise UnsupportedFormatError(f"{where}: activation {cfg.get('activation')!r} is not "
                                     "supported (only topk)")
    transcode = bool(cfg.get("transcode", False))
    W = need(t, ("encoder.weight",), where).double()
    b = need(t, ("encoder.bias",), where).double()
    W_dec = need(t, ("W_dec",), where).double()
    b_dec = need(t, ("b_dec",), where).double()
    k = cfg.get("k")
    if not k:
        raise CorruptCheckpointError(f"{where}: cfg.json has no k")
    if hook_point is not None:
        layer = hook_point.split(".")[1] if hook_point.startswith("blocks.") else None
        hook_in = f"blocks.{layer}.ln2.hook_normalized" if transcode else hook_point
        hook_out = hook_point
    else:
        hook_in, hook_out = hook_points_for(folder.name, transcode)
    if transcode:
        if rmsnorm_gain is None:
            raise UnsupportedFormatError(
                f"{where}: a sparsify MLP transcoder reads the MLP input, RMSNorm output WITH its "
                "gain; give that gain to fold it into the encoder exactly",
                hint="pass rmsnorm_gain=model.model.layers[L].post_attention_layernorm.weight "
                     "(convert --rmsnorm-gain FILE.safetensors|.pt)")
        g = torch.as_tensor(rmsnorm_gain).detach().double().cpu().reshape(-1)
        if g.shape != (W.shape[1],):
            raise ValueError(f"rmsnorm_gain has {g.numel()} values, expected d_in={W.shape[1]}")
        W_e, b_e = W * g[None, :], b
    else:
        W_e, b_e = W, b - W @ b_dec
    return plain_record(W_e=W_e, b_e=b_e, W_d=W_dec, b_d=b_dec, act_fn="topk",
                        hook_point_in=hook_in, hook_point_out=hook_out, top_k=int(k),
                        rank_by_decoder_norm=False, source_format="sparsify", source_config=cfg,
                        file_dtype=t["encoder.weight"].dtype)
