"""The local replacement model's forward: a transformers Llama with the nonlinear parts frozen.

Inside :func:`frozen_forward` a forward of ``model.model`` computes the same values as the
original model, but the autograd graph only holds the paths that are linear in the residual
stream once the prompt is fixed:

- every RMSNorm (``input_layernorm``, ``post_attention_layernorm``, the final ``norm``)
  divides by its root-mean-square computed on the prompt and *detached*: ``w * x * s``
  with ``s = rsqrt(mean(x^2) + eps)`` a constant;
- the attention pattern is frozen by detaching the query and key projections: the pattern
  is a function of detached tensors only, so gradients reach the residual through the values
  (and ``o_proj``) alone, whatever attention kernel the model uses (eager, sdpa, flash);
- each MLP's output is replaced by a leaf tensor of the same value (the transcoder's
  reconstruction plus the error, i.e. the MLP output itself), its input detached so the MLP
  builds no graph: nothing flows through an MLP; when the prompt's MLP outputs are known
  (attribution records them first) the MLP is not even run;
- the token embeddings become a leaf tensor.

The tape returned records the tensors attribution reads and injects at: the embedding leaf,
each MLP-output leaf (sources), each layer's transcoder input ``ln2.hook_normalized`` =
``x * s`` without the gain (targets), and the final norm's output (logit targets).

MLP outputs are replaced through :func:`llamascope_sdk.core.hooks.hooked` (site
``blocks.L.hook_mlp_out``); the freezes sit on modules that no hook site names (norms, q/k
projections, the embedding) and are registered here with the same guarantee: every handle is
removed in a ``finally``, on success, on an exception and on KeyboardInterrupt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llamascope_sdk.base.errors import IncompatibleModelError
from llamascope_sdk.core.hooks import ModuleHook, hooked, module_hooks
from llamascope_sdk.core.sites import Site, decoder_layers


@dataclass
class Tape:
    """Tensors of one frozen forward, each [B, T, D] on its layer's device."""

    #: Token embeddings (a leaf): the token-node sources.
    embed: torch.Tensor | None = None
    #: layer -> transcoder input ``ln2.hook_normalized`` (in the graph): feature targets.
    tc_in: dict[int, torch.Tensor] = field(default_factory=dict)
    #: layer -> MLP output (a leaf): feature and error sources.
    mlp_out: dict[int, torch.Tensor] = field(default_factory=dict)
    #: The final norm's output (in the graph): logit targets.
    final: torch.Tensor | None = None


def _rms_eps(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if eps is None:
        raise IncompatibleModelError(
            f"{type(module).__name__} has no variance_epsilon/eps: an RMSNorm is required")
    return float(eps)


def frozen_rms(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised without gain, module output) of a Llama RMSNorm, the denominator detached.

    Same operations as transformers' ``LlamaRMSNorm.forward``, so the values are identical;
    only a float64 model keeps float64 here (transformers computes the norm in float32)."""
    x32 = x if x.dtype == torch.float64 else x.float()
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + _rms_eps(module)).detach()
    normed = (x32 * scale).to(x.dtype)
    weight = getattr(module, "weight", None)
    return normed, (normed if weight is None else weight * normed)


def _norm_hook(record: Callable[[torch.Tensor, torch.Tensor], None] | None) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
        normed, out = frozen_rms(module, args[0])
        # the copies of a batch are equal: checking the first is enough (and cheap)
        if not torch.allclose(out[:1].detach(), output[:1].detach(), rtol=1e-4, atol=1e-6):
            raise IncompatibleModelError(
                f"{type(module).__name__} does not compute weight * x / rms(x): attribution "
                "needs Llama-style RMSNorms")
        if record is not None:
            record(normed, out)
        return out
    return hook


def _detach_output(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
    return output.detach()


def _detach_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].detach(), *args[1:])


def _skip_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """No position reaches the MLP: its output comes from the constants (no wasted work)."""
    return (args[0].detach()[:, :0], *args[1:])


def _leaf(store: dict[int, torch.Tensor], layer: int, const_TD: torch.Tensor | None
          ) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(y: torch.Tensor) -> torch.Tensor:
        if const_TD is None:
            leaf = y.detach().requires_grad_(True)
        else:
            c = const_TD.to(device=y.device, dtype=y.dtype)
            leaf = c.expand(y.shape[0], *c.shape).requires_grad_(True)
        store[layer] = leaf
        return leaf
    return fn


def _submodule(parent: nn.Module, name: str, what: str) -> nn.Module:
    mod = getattr(parent, name, None)
    if not isinstance(mod, nn.Module):
        raise IncompatibleModelError(
            f"{type(parent).__name__} has no '{name}' ({what}): attribution needs a "
            "Llama-family model (q_proj/k_proj attention, RMSNorms, an MLP per layer)")
    return mod


def _freezes(model: nn.Module, tape: Tape, skip_mlp: bool) -> list[ModuleHook]:
    """The hooks that freeze the forward (attention patterns, norm denominators, MLP inputs)
    and fill ``tape``, for :func:`~llamascope_sdk.core.hooks.module_hooks`."""
    inner = getattr(model, "model", model)

    def keep_embed(_m: nn.Module, _a: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        tape.embed = out.detach().requires_grad_(True)
        return tape.embed

    def keep_final(_normed: torch.Tensor, out: torch.Tensor) -> None:
        tape.final = out

    def keep_input(layer: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def record(normed: torch.Tensor, _out: torch.Tensor) -> None:
            tape.tc_in[layer] = normed
        return record

    specs: list[ModuleHook] = [(_submodule(inner, "embed_tokens", "embedding"), "post",
                                keep_embed)]
    for layer, block in enumerate(decoder_layers(model)):
        attn = _submodule(block, "self_attn", "attention")
        specs.append((_submodule(block, "input_layernorm", "norm"), "post", _norm_hook(None)))
        specs += [(_submodule(attn, proj, "attention"), "post", _detach_output)
                  for proj in ("q_proj", "k_proj")]
        specs.append((_submodule(block, "post_attention_layernorm", "norm"), "post",
                      _norm_hook(keep_input(layer))))
        specs.append((_submodule(block, "mlp", "MLP"), "pre",
                      _skip_input if skip_mlp else _detach_input))
    specs.append((_submodule(inner, "norm", "final norm"), "post", _norm_hook(keep_final)))
    return specs


@contextmanager
def frozen_forward(model: nn.Module, mlp_out: Sequence[torch.Tensor] | None = None
                   ) -> Iterator[Tape]:
    """Within the block, ``model.model(input_ids=...)`` is the frozen replacement forward;
    the yielded :class:`Tape` fills as it runs. Model parameters are set not to require
    gradients for the block (so no weight gradient is kept) and restored after it.

    ``mlp_out``: each layer's MLP output on the prompt ([T, D], recorded before); given, the
    MLPs are not run at all (each sees zero positions) and these constants take their place.
    """
    tape = Tape()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        sites = {Site(layer, "mlp_out"): _leaf(tape.mlp_out, layer,
                                               None if mlp_out is None else mlp_out[layer])
                 for layer in range(len(decoder_layers(model)))}
        with module_hooks(_freezes(model, tape, mlp_out is not None)), hooked(model, sites):
            yield tape
    finally:
        for p in params:
            p.requires_grad_(True)
