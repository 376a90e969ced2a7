"""Hook sites: where a Llama Scope hook point lives in a transformers Llama model.

Spec section 1.3 maps the TransformerLens names of hyperparams.json to transformers modules
(``m = model.model``)::

    blocks.L.hook_resid_post        output of m.layers[L]            (tensor, or tuple[0])
    blocks.L.hook_attn_out          output[0] of m.layers[L].self_attn (o_proj, before the add)
    blocks.L.hook_mlp_out           output of m.layers[L].mlp
    blocks.L.ln2.hook_normalized    r / sqrt(mean(r^2) + eps), r = INPUT of
                                    m.layers[L].post_attention_layernorm, without the gain

Forward hooks on modules are used rather than ``output_hidden_states``: the last entry of
hidden_states is taken after the final norm, so it is not L31R.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from llamascope_sdk.base.errors import HookpointNotFoundError, IncompatibleModelError

Kind = Literal["resid_post", "attn_out", "mlp_out", "ln2_normalized"]


@dataclass(frozen=True)
class HookKind:
    """One row of the hook-point table: what a kind of site is called and where it lives."""

    kind: Kind
    #: The TransformerLens name after ``blocks.L.`` (as in hyperparams.json).
    suffix: str
    #: The submodule of the decoder layer whose forward is hooked ("" = the layer itself).
    module: str
    #: True when the activation is the module's input (a forward pre-hook), not its output.
    reads_input: bool
    #: In which order a decoder layer's hooked modules run.
    order: int


#: THE table of hook points; everything else (parsing, module paths, the registry's hook
#: points, the exporters' positions) is derived from it.
HOOK_KINDS: dict[Kind, HookKind] = {h.kind: h for h in (
    HookKind("attn_out", "hook_attn_out", "self_attn", False, 0),
    HookKind("ln2_normalized", "ln2.hook_normalized", "post_attention_layernorm", True, 1),
    HookKind("mlp_out", "hook_mlp_out", "mlp", False, 2),
    HookKind("resid_post", "hook_resid_post", "", False, 3),
)}
#: Llama Scope positions -> (input kind, output kind): R/A/M SAEs read and reconstruct one
#: site, a transcoder (TC) reads the normalised MLP input and predicts the MLP output.
POSITIONS: dict[str, tuple[Kind, Kind]] = {
    "R": ("resid_post", "resid_post"), "A": ("attn_out", "attn_out"),
    "M": ("mlp_out", "mlp_out"), "TC": ("ln2_normalized", "mlp_out"),
}
_BY_SUFFIX = {h.suffix: h.kind for h in HOOK_KINDS.values()}
_HOOK = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(x) for x in _BY_SUFFIX) + r")$")


@dataclass(frozen=True)
class Site:
    """One place in the model: a layer and what is read there."""

    layer: int
    kind: Kind

    @property
    def hook_point(self) -> str:
        return f"blocks.{self.layer}.{HOOK_KINDS[self.kind].suffix}"

    @property
    def module_path(self) -> str:
        """The transformers module whose forward the hook wraps."""
        sub = HOOK_KINDS[self.kind].module
        return f"model.layers.{self.layer}" + (f".{sub}" if sub else "")

    @property
    def reads_input(self) -> bool:
        """True when the activation is the module's input (a forward pre-hook), not its output."""
        return HOOK_KINDS[self.kind].reads_input

    @property
    def order(self) -> tuple[int, int]:
        """Sorts sites in the order a forward reaches them."""
        return self.layer, HOOK_KINDS[self.kind].order

    def describe(self) -> str:
        """The transformers module and what is read there, e.g.
        ``model.layers.12.mlp (output)``."""
        what = "input / rms, no gain" if self.kind == "ln2_normalized" else "output"
        return f"{self.module_path} ({what})"


def parse_hook_point(hook_point: str) -> Site:
    """``"blocks.12.hook_mlp_out"`` -> ``Site(12, "mlp_out")``.

    Raises:
        HookpointNotFoundError: a name that is not one of the four Llama Scope hook points.
    """
    m = _HOOK.match(hook_point.strip())
    if m is None:
        allowed = ", ".join(f"blocks.L.{h.suffix}" for h in HOOK_KINDS.values())
        raise HookpointNotFoundError(f"unknown hook point {hook_point!r}: allowed are {allowed}")
    return Site(int(m.group(1)), _BY_SUFFIX[m.group(2)])


def position_sites(layer: int, position: str) -> tuple[Site, Site]:
    """(input site, output site) of a Llama Scope position (R, A, M, TC) at ``layer``."""
    kin, kout = POSITIONS[position]
    return Site(layer, kin), Site(layer, kout)


def position_of(site_in: Site, site_out: Site) -> str:
    """The Llama Scope position (R, A, M, TC) of an (input, output) pair of sites.

    Raises:
        HookpointNotFoundError: a pair no position has (e.g. different layers).
    """
    for pos, kinds in POSITIONS.items():
        if site_in.layer == site_out.layer and (site_in.kind, site_out.kind) == kinds:
            return pos
    raise HookpointNotFoundError(
        f"{site_in.hook_point} -> {site_out.hook_point} is no Llama Scope position: allowed "
        "are one site read and reconstructed (R, A, M) or blocks.L.ln2.hook_normalized -> "
        "blocks.L.hook_mlp_out (TC)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Llama-family model (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise IncompatibleModelError(
            f"{type(model).__name__} has no model.layers: a Llama-family causal LM is required "
            "(LlamaForCausalLM or a model with the same layout)")
    return layers


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None)
    if size is None:
        raise IncompatibleModelError(f"{type(model).__name__} has no config.hidden_size")
    return int(size)


def module_for(model: nn.Module, site: Site) -> nn.Module:
    """The module a hook for ``site`` attaches to, with clear errors when it is missing."""
    layers = decoder_layers(model)
    if not 0 <= site.layer < len(layers):
        raise IncompatibleModelError(
            f"{site.hook_point}: layer {site.layer} does not exist; the model has layers "
            f"0-{len(layers) - 1}")
    layer = layers[site.layer]
    attr = HOOK_KINDS[site.kind].module
    if not attr:
        return layer
    mod = getattr(layer, attr, None)
    if not isinstance(mod, nn.Module):
        raise HookpointNotFoundError(
            f"{site.hook_point}: {type(layer).__name__} has no '{attr}' submodule, so this "
            f"model class cannot host {site.kind} SAEs")
    return mod


def first(output: Any) -> torch.Tensor:
    """The hidden-states tensor of a module output that may be a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


def replace_first(output: Any, new: torch.Tensor) -> Any:
    """Re-pack ``new`` into an output of the same structure (tensor or tuple)."""
    return (new, *output[1:]) if isinstance(output, tuple) else new


def rms_normalized(module: nn.Module, r: torch.Tensor) -> torch.Tensor:
    """TransformerLens ``ln2.hook_normalized``: r / sqrt(mean(r^2) + eps) in fp32, cast back,
    without the norm's gain."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    eps = 1e-5 if eps is None else float(eps)
    r32 = r.float()
    return (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype)


def read_activation(site: Site, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> torch.Tensor:
    """The raw activation at ``site`` from a hook's (args, output)."""
    if site.reads_input:
        return rms_normalized(module, args[0])
    return first(output)
