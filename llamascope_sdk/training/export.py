"""Export a trained SAE in the release layout, with a card that records the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.release import atomic_write_text, default_lm_config, write_release

from .config import TrainConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


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


def recipe_table(cfg: TrainConfig) -> str:
    rows = [("variant", cfg.variant), ("Adam betas", str(tuple(cfg.betas))),
            ("lr", f"{cfg.lr:g}"), ("warm-up steps", str(cfg.warmup_steps)),
            ("final lr ratio", f"{cfg.lr_end_ratio:g}"),
            ("K annealing", f"{cfg.k_init} -> {cfg.top_k} over {cfg.k_warmup_steps} steps"),
            ("init decoder norm", f"{cfg.init_decoder_norm:g}"),
            ("grad clip", str(cfg.clip_grad_norm)), ("batch", f"{cfg.batch_size} tokens"),
            ("steps", str(cfg.total_steps)), ("param dtype", cfg.dtype)]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def card(cfg: TrainConfig, hp: dict[str, Any], metrics: dict[str, Any] | None = None,
         extra: str = "") -> str:
    lines = [f"# {cfg.name}", "",
             f"Top-K SAE trained with llamascope-sdk's reproduction of the Llama Scope recipe "
             f"(spec section 4, **{cfg.variant}** column) and converted to JumpReLU (one global "
             f"threshold θ = {hp['jump_relu_threshold']:.6g}, folded space).", "",
             f"- model: `{cfg.model}`; input `{cfg.hook_point_in}`, target `{cfg.hook_point_out}`",
             f"- d_model {cfg.d_model}, d_sae {cfg.d_sae}, training K {cfg.top_k}",
             f"- dataset: `{cfg.dataset}`",
             f"- dataset norms: in {hp['dataset_average_activation_norm']['in']}, out "
             f"{hp['dataset_average_activation_norm']['out']}", "", "## Recipe", "",
             recipe_table(cfg), ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in metrics.items()]
        lines.append("")
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def export(folder: str | Path, cfg: TrainConfig, raw: dict[str, torch.Tensor],
           hp: dict[str, Any], card_text: str) -> Path:
    """Write the release folder plus ``recipe.yaml`` (the serialised TrainConfig)."""
    from llamascope_sdk.hyperparams import Hyperparams

    lm = default_lm_config(cfg.model, cfg.d_model)
    tensors = {k: v.to(_DTYPES[cfg.export_dtype]) for k, v in raw.items()}
    out = write_release(folder, Hyperparams.from_dict(hp), tensors, lm, card=card_text)
    atomic_write_text(Path(out) / "recipe.yaml", cfg.to_yaml())
    return Path(out)
