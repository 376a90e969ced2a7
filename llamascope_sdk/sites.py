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

from .errors import HookpointNotFoundError, IncompatibleModelError

Kind = Literal["resid_post", "attn_out", "mlp_out", "ln2_normalized"]
_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_attn_out|hook_mlp_out|ln2\.hook_normalized)$")
_KIND = {"hook_resid_post": "resid_post", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out",
         "ln2.hook_normalized": "ln2_normalized"}


@dataclass(frozen=True)
class Site:
    """One place in the model: a layer and what is read there."""

    layer: int
    kind: Kind

    @property
    def hook_point(self) -> str:
        inv = {v: k for k, v in _KIND.items()}
        return f"blocks.{self.layer}.{inv[self.kind]}"

    @property
    def module_path(self) -> str:
        """The transformers module whose forward the hook wraps."""
        sub = {"resid_post": "", "attn_out": ".self_attn", "mlp_out": ".mlp",
               "ln2_normalized": ".post_attention_layernorm"}[self.kind]
        return f"model.layers.{self.layer}{sub}"

    @property
    def reads_input(self) -> bool:
        """True when the activation is the module's input (a forward pre-hook), not its output."""
        return self.kind == "ln2_normalized"


def parse_hook_point(hook_point: str) -> Site:
    """``"blocks.12.hook_mlp_out"`` -> ``Site(12, "mlp_out")``.

    Raises:
        HookpointNotFoundError: a name that is not one of the four Llama Scope hook points.
    """
    m = _HOOK.match(hook_point.strip())
    if m is None:
        raise HookpointNotFoundError(
            f"unknown hook point {hook_point!r}: allowed are blocks.L.hook_resid_post, "
            "blocks.L.hook_attn_out, blocks.L.hook_mlp_out and blocks.L.ln2.hook_normalized")
    return Site(int(m.group(1)), _KIND[m.group(2)])  # type: ignore[arg-type]


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
    if site.kind == "resid_post":
        return layer
    attr = {"attn_out": "self_attn", "mlp_out": "mlp", "ln2_normalized": "post_attention_layernorm"}[site.kind]
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
