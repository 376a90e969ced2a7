"""Synthetic Llama Scope checkpoints in the exact release layout, written independently of the
SDK's own writer (plain json + safetensors), for loading tests and the fake Hub."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamascope_sdk import SAE


def release_hyperparams(layer: int = 12, position: str = "R", d_model: int = 64, d_sae: int = 256,
                        threshold: float = 0.25, norm_in: float = 8.0625, norm_out: float | None = None,
                        expansion: int | None = None) -> dict:
    """Every field a released hyperparams.json has (spec 2.1), for a small synthetic SAE."""
    hook_out = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out", "TC": "hook_mlp_out"}
    hp_out = f"blocks.{layer}.{hook_out[position]}"
    hp_in = f"blocks.{layer}.ln2.hook_normalized" if position == "TC" else hp_out
    if norm_out is None:
        norm_out = 3.96875 if position == "TC" else norm_in
    exp = expansion if expansion is not None else d_sae // d_model
    return {
        "device": "cuda:0", "seed": 42, "dtype": "torch.bfloat16",
        "hook_point_in": hp_in, "hook_point_out": hp_out,
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False,
        "expansion_factor": exp, "d_model": d_model, "d_sae": d_sae,
        "bias_init_method": "all_zero", "act_fn": "jumprelu", "jump_relu_threshold": threshold,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_out},
        "decoder_exactly_fixed_norm": False, "sparsity_include_decoder_norm": True,
        "use_glu_encoder": False, "init_decoder_norm": 0.5,
        "init_encoder_norm": 0.5 if position == "TC" else None,
        "init_encoder_with_decoder_transpose": position != "TC",
        "lp": 1, "l1_coefficient": 8e-05, "l1_coefficient_warmup_steps": 39062,
        "top_k": 50, "k_warmup_steps": 39062, "use_batch_norm_mse": True,
        "use_ghost_grads": False, "tp_size": 1, "ddp_size": 1,
    }


def raw_tensors(d_model: int, d_sae: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Training-space tensors whose decoder columns are deliberately NOT unit norm
    (norms spread over roughly 0.3..3, like the ~1.54 mean measured on real files)."""
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d_model, d_sae, generator=g) / math.sqrt(d_model)
    dec = dec * (0.3 + 2.7 * torch.rand(d_sae, generator=g))  # column norms ~0.3..3
    enc = torch.randn(d_sae, d_model, generator=g) / math.sqrt(d_model)
    return {
        "encoder.weight": enc.to(dtype),
        "encoder.bias": (0.1 * torch.randn(d_sae, generator=g)).to(dtype),
        "decoder.weight": dec.to(dtype),
        "decoder.bias": (0.1 * torch.randn(d_model, generator=g)).to(dtype),
    }


def write_release(folder: Path, hp: dict, tensors: dict) -> Path:
    folder = Path(folder)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp, indent=4))
    (folder / "lm_config.json").write_text(json.dumps(
        {"model_name": "meta-llama/Llama-3.1-8B", "use_flash_attn": False, "cache_dir": None,
         "d_model": hp["d_model"], "local_files_only": False}))
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    return folder


def make_release(folder: Path, position: str = "R", layer: int = 12, d_model: int = 64,
                 d_sae: int = 256, seed: int = 0, **hp_kwargs) -> Path:
    hp = release_hyperparams(layer=layer, position=position, d_model=d_model, d_sae=d_sae, **hp_kwargs)
    return write_release(folder, hp, raw_tensors(d_model, d_sae, seed))


def reference_encode(hp: dict, raw: dict, x: torch.Tensor) -> torch.Tensor:
    """Spec 3.2 written out plainly in float64: a_i = ||d_i|| h_i / s_out, f = a 1[a > theta]."""
    d = hp["d_model"]
    s_in = math.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    W_e = raw["encoder.weight"].double()
    b_e = raw["encoder.bias"].double()
    W_d = raw["decoder.weight"].double()
    h = (s_in * x.double()) @ W_e.T + b_e
    a = W_d.norm(dim=0) * h / s_out
    return torch.where(a > hp["jump_relu_threshold"], a, torch.zeros_like(a))


def reference_decode(hp: dict, raw: dict, f: torch.Tensor) -> torch.Tensor:
    """y^ = sum_i f_i d_i/||d_i|| + b_d/s_out, in float64."""
    d = hp["d_model"]
    s_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    W_d = raw["decoder.weight"].double()
    unit = W_d / W_d.norm(dim=0)
    return f.double() @ unit.T + raw["decoder.bias"].double() / s_out


def reference_forward_training_space(hp: dict, raw: dict, x: torch.Tensor) -> torch.Tensor:
    """The other closed form of spec 3.2: (W_d (h * m) + b_d) / s_out, m_i = 1[||d_i|| h_i > theta s_out]."""
    d = hp["d_model"]
    s_in = math.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    W_e, b_e = raw["encoder.weight"].double(), raw["encoder.bias"].double()
    W_d, b_d = raw["decoder.weight"].double(), raw["decoder.bias"].double()
    h = (s_in * x.double()) @ W_e.T + b_e
    m = (W_d.norm(dim=0) * h > hp["jump_relu_threshold"] * s_out).double()
    return ((h * m) @ W_d.T + b_d) / s_out


def tiny_sae(layer: int = 1, position: str = "R", seed: int = 0, *, d_model: int = 64,
             d_sae: int = 256, threshold: float = 0.05, raw_dtype: torch.dtype = torch.float32,
             **hp_kwargs) -> SAE:
    """The suite's one small synthetic SAE factory: release hyperparams and raw tensors whose
    decoder norms are far from 1 (:func:`raw_tensors`), built with ``SAE.from_raw``. Fits the
    ``tiny_llama`` fixture (hidden size 64) by default."""
    hp = release_hyperparams(layer=layer, position=position, d_model=d_model, d_sae=d_sae,
                             threshold=threshold, **hp_kwargs)
    return SAE.from_raw(hp, raw_tensors(d_model, d_sae, seed, raw_dtype))
