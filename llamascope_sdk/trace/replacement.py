"""The prompt's local replacement model: transcoders by layer, active features, errors, targets.

One no-grad forward of the model (through the hooks of :mod:`.frozen`, which change no value)
records, at every layer L, the transcoder input ``x_L = blocks.L.ln2.hook_normalized`` (the
MLP input normalised without the RMSNorm gain, what every transcoder the SDK loads reads; a
transcoder trained on the post-gain MLP input is loaded with the gain folded into its encoder,
which reads the same numbers) and the MLP output ``y_L``. Then, per layer with a transcoder::

    f_L = encode(x_L)                    active features: f_L[p, i] != 0, p >= 1
    e_L = y_L - decode(f_L)              the error node of (L, p); y_L itself without one

Position 0 (the BOS the SDK always prepends) holds no feature or error node: its MLP outputs
are constants of the replacement model, as in circuit-tracer (attention sinks).

Logit targets: the most probable next tokens, at most ``max_logits``, until their cumulative
probability reaches ``logit_probability`` (or the one ``target`` token); each target's read
vector is its unembedding row minus the mean row, ``u_t - mean_v u_v``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llamascope_sdk.base.errors import IncompatibleModelError, InputError
from llamascope_sdk.core.sites import decoder_layers, hidden_size, parse_hook_point
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.trace.frozen import frozen_forward

#: Positions whose features and errors are not nodes (the BOS).
ZERO_POSITIONS = 1


@dataclass
class LayerFeatures:
    """Active features of one layer: positions, indices and activations (on the SAE's device)."""

    pos: torch.Tensor  # [n] long
    feat: torch.Tensor  # [n] long
    act: torch.Tensor  # [n] in the work dtype


@dataclass
class Replacement:
    """Everything attribution needs from the prompt's forward."""

    ids_T: torch.Tensor
    transcoders: dict[int, SAE]
    features: dict[int, LayerFeatures]  # only layers with a transcoder
    errors: list[torch.Tensor]  # per layer [T, D] on the layer's device, row 0 zero
    mlp_out: list[torch.Tensor]  # per layer [T, D], the model's dtype and device
    tokens_TD: torch.Tensor  # token embeddings [T, D]
    logits_V: torch.Tensor  # last-position logits, float32
    n_layers: int
    #: Arithmetic of errors, contractions and edges: float64 for a float64 model, else float32.
    dtype: torch.dtype = torch.float32

    @property
    def n_pos(self) -> int:
        return int(self.ids_T.numel())

    def active_A3(self) -> torch.Tensor:
        """(layer, position, feature) of every active feature, in node order, on the CPU."""
        parts = [torch.stack([torch.full_like(lf.pos, layer), lf.pos, lf.feat], 1).cpu()
                 for layer, lf in sorted(self.features.items())]
        return torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.long)

    def activations_A(self) -> torch.Tensor:
        parts = [lf.act.cpu() for _, lf in sorted(self.features.items())]
        return torch.cat(parts) if parts else torch.zeros(0)


def by_layer(model: nn.Module, transcoders: Sequence[SAE] | Mapping[int, SAE]) -> dict[int, SAE]:
    """``{layer: transcoder}`` after checking each is a transcoder of this model's width,
    reading ``blocks.L.ln2.hook_normalized`` and writing ``blocks.L.hook_mlp_out``, one per layer.

    Raises:
        InputError: something that is not a transcoder, or two for one layer.
        IncompatibleModelError: a width or layer this model does not have.
    """
    items = list(transcoders.values()) if isinstance(transcoders, Mapping) else list(transcoders)
    n_layers, d = len(decoder_layers(model)), hidden_size(model)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise IncompatibleModelError(
            "some of the model's weights are offloaded (on the meta device): attribution needs "
            "every weight on a real device; spread the model over GPUs and CPU with device_map "
            "instead of offloading it")
    out: dict[int, SAE] = {}
    for sae in items:
        if not isinstance(sae, SAE):
            raise InputError(f"expected SAE transcoders, got {type(sae).__name__}")
        site_in = parse_hook_point(sae.hyperparams.hook_point_in)
        site_out = parse_hook_point(sae.hyperparams.hook_point_out)
        if (site_in.kind, site_out.kind) != ("ln2_normalized", "mlp_out") or \
                site_in.layer != site_out.layer:
            raise InputError(
                f"{sae.name} reads {site_in.hook_point} and writes {site_out.hook_point}: "
                "attribution needs transcoders (blocks.L.ln2.hook_normalized -> "
                "blocks.L.hook_mlp_out), e.g. LXTC-8x or the demo set")
        if sae.d_model != d or not 0 <= site_out.layer < n_layers:
            raise IncompatibleModelError(
                f"{sae.name} (layer {site_out.layer}, d_model {sae.d_model}) does not fit this "
                f"model ({n_layers} layers, hidden size {d})")
        if site_out.layer in out:
            raise InputError(f"two transcoders for layer {site_out.layer}: "
                             f"{out[site_out.layer].name} and {sae.name}")
        out[site_out.layer] = sae
    if isinstance(transcoders, Mapping):
        for layer, sae in transcoders.items():
            if int(layer) not in out or out[int(layer)] is not sae:
                raise InputError(f"transcoder {sae.name} was given for layer {layer} but "
                                 "reads another layer")
    return out


def _forward_record(model: nn.Module, ids_T: torch.Tensor
                    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """(transcoder inputs, MLP outputs, last-position logits) of one no-grad forward, through
    the frozen forward's hooks (same values as the model; float64 norms in a float64 model)."""
    inner = getattr(model, "model", model)
    with torch.no_grad(), frozen_forward(model) as tape:
        inner(input_ids=ids_T[None].to(embed_device(model)), use_cache=False)
        assert tape.final is not None
        head = unembedding(model)
        logits_V = tape.final[0, -1].to(head.device) @ head.T
    x_in = {layer: x.detach() for layer, x in tape.tc_in.items()}
    y_out = {layer: y.detach() for layer, y in tape.mlp_out.items()}
    return x_in, y_out, logits_V.detach().float()


def work_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (bf16/fp16 models included)."""
    p = next(model.parameters())
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def layer_features(sae: SAE, x_TD: torch.Tensor, y_TD: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[LayerFeatures, torch.Tensor]:
    """Active features of one layer (BOS excluded) and its error [T, D] (row 0 zero)."""
    with torch.no_grad():
        acts_TF = sae.encode(x_TD)
        acts_TF[:ZERO_POSITIONS] = 0
        recon_TD = sae.decode(acts_TF).to(device=y_TD.device, dtype=dtype)
        pos, feat = acts_TF.nonzero(as_tuple=True)
        err_TD = y_TD.to(dtype) - recon_TD
        acts_TF = acts_TF.to(dtype)
    err_TD[:ZERO_POSITIONS] = 0
    return LayerFeatures(pos, feat, acts_TF[pos, feat]), err_TD


def build(model: nn.Module, transcoders: dict[int, SAE], ids_T: torch.Tensor) -> Replacement:
    """Run the prompt once and build its :class:`Replacement`."""
    x_in, y_out, logits_V = _forward_record(model, ids_T)
    n_layers, dtype = len(decoder_layers(model)), work_dtype(model)
    features: dict[int, LayerFeatures] = {}
    errors: list[torch.Tensor] = []
    for layer in range(n_layers):
        y_TD = y_out[layer][0]
        if layer in transcoders:
            features[layer], err_TD = layer_features(transcoders[layer], x_in[layer][0], y_TD,
                                                     dtype)
        else:
            err_TD = y_TD.to(dtype).clone()
            err_TD[:ZERO_POSITIONS] = 0
        errors.append(err_TD)
    embed = input_embedding(model)
    with torch.no_grad():
        tokens_TD = embed(ids_T.to(embed_device(model))).to(dtype)
    mlp_out = [y_out[layer][0] for layer in range(n_layers)]
    return Replacement(ids_T.cpu(), transcoders, features, errors, mlp_out, tokens_TD, logits_V,
                       n_layers, dtype)


def input_embedding(model: nn.Module) -> nn.Module:
    """The token embedding module (``model.model.embed_tokens``)."""
    get: Any = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module):
        raise IncompatibleModelError(f"{type(model).__name__} has no input embedding")
    return emb


def embed_device(model: nn.Module) -> torch.device:
    """Where token ids go: the device of the embedding's weight."""
    weight = input_embedding(model).weight
    assert isinstance(weight, torch.Tensor)
    return weight.device


def unembedding(model: nn.Module) -> torch.Tensor:
    """The [V, D] unembedding matrix (``lm_head.weight``)."""
    get: Any = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise IncompatibleModelError(f"{type(model).__name__} has no lm_head: a causal LM is needed")
    if getattr(head, "bias", None) is not None:
        raise IncompatibleModelError("an lm_head with a bias is not supported")
    return weight


def logit_targets(model: nn.Module, logits_V: torch.Tensor, *, max_logits: int,
                  logit_probability: float, target: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [K], probabilities [K], read vectors [K, D] in the work dtype) of the logit
    targets."""
    probs_V = torch.softmax(logits_V.float(), dim=-1)
    if target is not None:
        if not 0 <= target < probs_V.numel():
            raise InputError(f"target token id {target} is outside the vocabulary "
                             f"(0..{probs_V.numel() - 1})")
        idx = torch.tensor([target], device=probs_V.device)
    else:
        top_p, top_idx = torch.topk(probs_V, min(max_logits, probs_V.numel()))
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), logit_probability)) + 1
        idx = top_idx[:cutoff]
    w_VD = unembedding(model)
    with torch.no_grad():
        dt = work_dtype(model)
        vecs_KD = w_VD[idx.to(w_VD.device)].to(dt) - w_VD.mean(0, keepdim=True, dtype=dt)
    return idx.cpu(), probs_V[idx].cpu(), vecs_KD
