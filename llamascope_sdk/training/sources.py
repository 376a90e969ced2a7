"""Wire a run's data: load the LM and build a live or cached activation source for a rank."""

from __future__ import annotations

from typing import Any

import torch

from llamascope_sdk.corpus import pad_id
from llamascope_sdk.loading.models import load_model, special_ids
from llamascope_sdk.training.activations import ActivationGenerator, LiveSource
from llamascope_sdk.training.cache import CacheSource
from llamascope_sdk.training.config import TrainConfig
from llamascope_sdk.training.data import TokenSource
from llamascope_sdk.training.errors import TrainConfigError


def hook_points_of(cfgs: list[TrainConfig]) -> list[str]:
    """Every hook point the SAEs read or predict, deduplicated in order."""
    return list(dict.fromkeys(h for c in cfgs for h in (c.hook_point_in, c.hook_point_out)))


def load_lm(cfg: TrainConfig) -> tuple[Any, Any]:
    dtype = cfg.lm_dtype or ("bfloat16" if cfg.device.startswith("cuda") else "float32")
    return load_model(cfg.model, device=cfg.device, dtype=dtype)


def check_model_fits(cfg: TrainConfig, model: Any) -> None:
    """The recipe's context and width against the loaded model's config.

    Raises:
        TrainConfigError: ``context_size`` above ``max_position_embeddings``, or ``d_model``
            different from the model's hidden size.
    """
    conf = getattr(model, "config", None)
    window = getattr(conf, "max_position_embeddings", None)
    if window is not None and cfg.context_size > window:
        raise TrainConfigError(f"context_size={cfg.context_size} exceeds the context window of "
                               f"{cfg.model} (max_position_embeddings={window})",
                               hint=f"--set context_size={window} or less")
    hidden = getattr(conf, "hidden_size", None)
    if hidden is not None and cfg.d_model != hidden:
        raise TrainConfigError(f"d_model={cfg.d_model} but {cfg.model} has hidden_size={hidden}",
                               hint=f"--set d_model={hidden}")


def live_source(cfg: TrainConfig, hook_points: list[str], model: Any, tokenizer: Any, *,
                rank: int = 0, world: int = 1, heldout: bool = False,
                loop: bool = True) -> LiveSource:
    """A live source; rank r of world generates documents i % world == r."""
    check_model_fits(cfg, model)
    tokens = TokenSource(tokenizer, cfg.dataset, split=cfg.dataset_split,
                         text_field=cfg.text_field, context_size=cfg.context_size,
                         holdout_fraction=cfg.holdout_fraction, rank=rank, world=world,
                         loop=loop, split_long=cfg.split_long_documents, heldout=heldout)
    gen = ActivationGenerator(model, hook_points, special_ids(tokenizer), dtype=torch.float32)
    return LiveSource(gen, tokens, cfg.store_batch_size, pad_id(tokenizer))


def build_source(cfgs: list[TrainConfig], *, rank: int = 0, world: int = 1,
                 model: Any = None, tokenizer: Any = None) -> LiveSource | CacheSource:
    """The training source for these SAEs (which share data settings) on one rank."""
    cfg = cfgs[0]
    hps = hook_points_of(cfgs)
    shard_rank, shard_world = (rank, world) if cfg.ddp_data == "shard" else (0, 1)
    if cfg.activation_cache:
        return CacheSource(cfg.activation_cache, epochs=cfg.epochs, seed=cfg.seed,
                           rank=shard_rank, world=shard_world, hook_points=hps)
    if model is None:
        model, tokenizer = load_lm(cfg)
    return live_source(cfg, hps, model, tokenizer, rank=shard_rank, world=shard_world)
