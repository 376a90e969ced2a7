"""Export a trained SAE in the release layout, with a card that records the recipe.

The card is rendered by :func:`llamascope_sdk.loading.cards.render_card` from :func:`card_info`, the
same template as the 256 release cards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.dtypes import parse_dtype
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.core.sites import parse_hook_point, position_of
from llamascope_sdk.corpus import local_paths
from llamascope_sdk.loading.cards import render_card
from llamascope_sdk.loading.formats.release_writer import write_release
from llamascope_sdk.loading.model_cache import SMOLLM2_ID, is_smollm2
from llamascope_sdk.loading.release import default_lm_config
from llamascope_sdk.training.config import TrainConfig


def release_hyperparams(cfg: TrainConfig, norm_in: float, norm_out: float, threshold: float,
                        world: int = 1, device: str | None = None) -> dict[str, Any]:
    """Every field of a released hyperparams.json (spec 2.1), filled from the recipe."""
    return {
        "device": device or cfg.device, "seed": cfg.seed, "dtype": f"torch.{cfg.export_dtype}",
        "hook_point_in": cfg.hook_point_in, "hook_point_out": cfg.hook_point_out,
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False,
        "expansion_factor": cfg.expansion_factor, "d_model": cfg.d_model, "d_sae": cfg.d_sae,
        "bias_init_method": "all_zero", "act_fn": "jumprelu", "jump_relu_threshold": threshold,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_out},
        "decoder_exactly_fixed_norm": False, "sparsity_include_decoder_norm": True,
        "use_glu_encoder": False, "init_decoder_norm": cfg.init_decoder_norm,
        "init_encoder_norm": cfg.init_encoder_norm if cfg.is_transcoder else None,
        "init_encoder_with_decoder_transpose": not cfg.is_transcoder,
        "lp": 1, "l1_coefficient": 8e-05, "l1_coefficient_warmup_steps": cfg.k_warmup_steps,
        "top_k": cfg.top_k, "k_warmup_steps": cfg.k_warmup_steps, "use_batch_norm_mse": True,
        "use_ghost_grads": False, "tp_size": 1, "ddp_size": world,
    }


def _position(cfg: TrainConfig) -> str:
    return position_of(parse_hook_point(cfg.hook_point_in), parse_hook_point(cfg.hook_point_out))


def dataset_label(dataset: str) -> str:
    """How a card names the training data: a Hub name as is, local files by file name only
    (a card never carries a path of the machine that trained it)."""
    paths = local_paths(dataset)
    if paths is None:
        return f"`{dataset}`"
    return " + ".join(f"`{p.name}`" for p in paths)


def card_info(cfg: TrainConfig, hp: dict[str, Any], metrics: Any = None, *,
              data_label: str | None = None, **extra: Any) -> dict[str, Any]:
    """The :func:`llamascope_sdk.loading.cards.render_card` description of a trained SAE.

    Args:
        cfg, hp: the recipe and the release hyperparams (threshold, dataset norms).
        metrics: training metrics, an ``EvalResult`` (or its dict), or
            ``{column label: EvalResult}``; see ``render_card``.
        data_label: how the summary names the training data (default: :func:`dataset_label`).
        extra: more card keys (``command``, ``extra``, ``metrics_note``, ``load_name``, ...).

    Returns:
        The dict; ``render_card(card_info(...))`` is the README.md text.
    """
    norms = hp["dataset_average_activation_norm"]
    summary = (f"Top-K SAE trained with llamascope-sdk's reproduction of the Llama Scope recipe "
               f"(spec section 4, **{cfg.variant}** column) and converted to JumpReLU (one global "
               f"threshold θ = {hp['jump_relu_threshold']:.6g}, folded space). Trained on "
               f"{data_label or dataset_label(cfg.dataset)} with `{cfg.model}`; dataset norms: in {norms['in']}, out "
               f"{norms['out']}.")
    recipe = {"variant": cfg.variant, "Adam betas": str(tuple(cfg.betas)), "lr": f"{cfg.lr:g}",
              "warm-up steps": cfg.warmup_steps, "final lr ratio": f"{cfg.lr_end_ratio:g}",
              "K annealing": f"{cfg.k_init} -> {cfg.top_k} over {cfg.k_warmup_steps} steps",
              "init decoder norm": f"{cfg.init_decoder_norm:g}", "grad clip": cfg.clip_grad_norm,
              "batch": f"{cfg.batch_size} tokens", "steps": cfg.total_steps,
              "param dtype": cfg.dtype}
    kind = "transcoder" if cfg.is_transcoder else "SAE"
    return {
        "name": cfg.name, "model": SMOLLM2_ID if is_smollm2(cfg.model) else cfg.model,
        "layer": parse_hook_point(cfg.hook_point_out).layer, "position": _position(cfg),
        "d_model": cfg.d_model, "d_sae": cfg.d_sae, "hook_point_in": cfg.hook_point_in,
        "hook_point_out": cfg.hook_point_out, "load_name": f"./{cfg.name}", "summary": summary,
        "datasets": [] if local_paths(cfg.dataset) else [cfg.dataset],
        "architecture": f"JumpReLU {kind} (trained Top-K, K = {cfg.top_k}; one global threshold)",
        "recipe": recipe, "recipe_variant": cfg.variant,
        "tokens": f"{cfg.total_steps * cfg.batch_size:,} tokens in this run",
        "metrics": metrics, **extra,
    }


def export(folder: str | Path, cfg: TrainConfig, raw: dict[str, torch.Tensor],
           hp: dict[str, Any], card_text: str | None = None) -> Path:
    """Write the release folder plus ``recipe.yaml`` (the serialised TrainConfig); the card
    defaults to ``render_card(card_info(cfg, hp))``."""
    lm = default_lm_config(cfg.model, cfg.d_model)
    tensors = {k: v.to(parse_dtype(cfg.export_dtype)) for k, v in raw.items()}
    card_text = card_text if card_text is not None else render_card(card_info(cfg, hp))
    return write_release(folder, Hyperparams.from_dict(hp), tensors, lm, card=card_text,
                         recipe=cfg.to_yaml())
