"""The training run: one data stream feeding several SAEs, checkpoints, logging, export.

``train(cfgs)`` is the library entry point behind ``training/run.py``. All configs must share
their data settings (:meth:`TrainConfig.data_key`): they read one LM pass and one shuffle buffer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ck
from .buffer import ShuffleBuffer
from .config import TrainConfig
from .ddp import Dist, init_from_env, shutdown
from .sae_trainer import SAETrainer
from .sources import build_source, hook_points_of


class Run:
    """State of one multi-SAE training run on one rank."""

    def __init__(self, cfgs: list[TrainConfig], dist: Dist, source: Any = None) -> None:
        keys = {c.data_key() for c in cfgs}
        if len(keys) > 1:
            raise ValueError("SAEs trained together must share model, dataset, batch_size, "
                             "total_tokens, seed, buffer and cache settings; got "
                             f"{len(keys)} different settings for {[c.name for c in cfgs]}")
        self.cfgs, self.dist, self.cfg = cfgs, dist, cfgs[0]
        if self.cfg.batch_size % dist.world:
            raise ValueError(f"batch_size={self.cfg.batch_size} is not divisible by the "
                             f"{dist.world} data-parallel ranks")
        torch.manual_seed(self.cfg.seed)
        self.source = source if source is not None else build_source(cfgs, rank=dist.rank,
                                                                      world=dist.world)
        shard = self.cfg.ddp_data == "shard"
        cap = self.cfg.buffer_tokens // (dist.world if shard else 1)
        self.buffer = ShuffleBuffer(self.source, hook_points_of(cfgs), cap,
                                    seed=self.cfg.seed + (1000 * dist.rank if shard else 0))
        self.trainers = [SAETrainer(c, dist) for c in cfgs]
        name = "+".join(c.name for c in cfgs)
        self.run_dir = Path(self.cfg.output_dir) / name
        self.step = 0
        self.finished = False

    # ------------------------------------------------------------------ data
    def _local(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cfg.ddp_data == "replicate" and self.dist.world > 1:
            return {k: v[self.dist.rank::self.dist.world] for k, v in rows.items()}
        return rows

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        shard = self.cfg.ddp_data == "shard"
        n = self.cfg.batch_size // self.dist.world if shard else self.cfg.batch_size
        batch = self.buffer.next_batch(n)
        ok = torch.tensor([0.0 if batch is None else 1.0])
        if float(self.dist.sum(ok)) < self.dist.world:  # every rank stops together
            return None
        return self._local(batch)

    def init_norms(self) -> None:
        shard = self.cfg.ddp_data == "shard"
        n = self.cfg.norm_tokens // (self.dist.world if shard else 1)
        rows = self.buffer.peek(n)
        for t in self.trainers:
            t.set_norms(rows[t.cfg.hook_point_in], rows[t.cfg.hook_point_out])

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        tmp = ck.tmp_dir(self.run_dir, self.step)
        if self.dist.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        buf_t, buf_s = self.buffer.state_dict()
        buf_t["torch_rng"] = torch.get_rng_state()
        ck.save_tensors(buf_t, tmp / f"buffer-rank{self.dist.rank}.safetensors")
        (tmp / f"data-rank{self.dist.rank}.json").write_text(json.dumps(buf_s))
        if self.dist.is_main:
            model: dict[str, torch.Tensor] = {}
            optim: dict[str, torch.Tensor] = {}
            stats: dict[str, torch.Tensor] = {}
            saes = []
            for i, t in enumerate(self.trainers):
                m, o, s, scalars = t.state(i)
                model.update(m)
                optim.update(o)
                stats.update(s)
                saes.append(scalars)
            ck.save_tensors(model, tmp / "model.safetensors")
            ck.save_tensors(optim, tmp / "optim.safetensors")
            ck.save_tensors(stats, tmp / "stats.safetensors")
            state = {"step": self.step, "world": self.dist.world, "saes": saes,
                     "configs": [c.to_dict() for c in self.cfgs]}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        self.dist.barrier()
        if self.dist.is_main:
            ck.commit(self.run_dir, self.step, self.cfg.keep_checkpoints)
        self.dist.barrier()

    def load(self) -> bool:
        folder = ck.latest(self.run_dir)
        if folder is None:
            return False
        state = json.loads((folder / "state.json").read_text())
        if state["world"] != self.dist.world:
            raise ValueError(f"checkpoint {folder} was written by {state['world']} ranks; "
                             f"resume with the same number (got {self.dist.world})")
        model = ck.load_tensors(folder / "model.safetensors")
        optim = ck.load_tensors(folder / "optim.safetensors")
        stats = ck.load_tensors(folder / "stats.safetensors")
        for i, t in enumerate(self.trainers):
            t.load(i, model, optim, stats, state["saes"][i])
        buf_t = ck.load_tensors(folder / f"buffer-rank{self.dist.rank}.safetensors")
        buf_s = json.loads((folder / f"data-rank{self.dist.rank}.json").read_text())
        self.buffer.load_state_dict(buf_t, buf_s)
        torch.set_rng_state(buf_t["torch_rng"])
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        for t in self.trainers:
            t.step(batch[t.cfg.hook_point_in], batch[t.cfg.hook_point_out], self.cfg.batch_size)
        self.step += 1

    def log(self, bar: Any, wandb_run: Any, tokens_per_s: float) -> None:
        rows = [t.metrics() for t in self.trainers]
        if not self.dist.is_main:
            return
        m = rows[0]
        text = (f"tok/s {tokens_per_s:,.0f} L0 {m['l0']:.1f} EV {m['ev']:.3f} "
                f"MSE {m['mse']:.4g} dead {m['dead']:.3f} k {m['k']:.0f}")
        if bar is not None:
            bar.set_postfix_str(text)
        else:
            print(f"step {self.step}: {text}", flush=True)
        if wandb_run is not None:
            wandb_run.log({f"{t.cfg.name}/{k}": v for t, r in zip(self.trainers, rows, strict=True)
                           for k, v in r.items()} | {"tokens_per_s": tokens_per_s}, step=self.step)
        self.last_metrics = rows

    def fit(self, resume: bool = True, max_steps: int | None = None, progress: bool = True) -> None:
        """Train until total_steps (or the data ends, or ``max_steps`` for this call)."""
        cfg = self.cfg
        if not (resume and self.load()):
            self.init_norms()
        wandb_run = None
        if cfg.wandb_project and self.dist.is_main:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("wandb_project is set but wandb is missing: pip install wandb") from exc
            wandb_run = wandb.init(project=cfg.wandb_project, name=self.run_dir.name,
                                   config={c.name: c.to_dict() for c in self.cfgs})
        bar = None
        if progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        stop_at = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        t0, s0 = time.time(), self.step
        batch: dict[str, torch.Tensor] | None = {}
        while self.step < stop_at:
            batch = self.next_batch()
            if batch is None:
                break
            self.train_step(batch)
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == stop_at:
                rate = (self.step - s0) * cfg.batch_size / max(time.time() - t0, 1e-9)
                self.log(bar, wandb_run, rate)
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.total_steps:
                self.save()
        self.finished = self.step >= cfg.total_steps or batch is None
        if bar is not None:
            bar.close()
        if wandb_run is not None:
            wandb_run.finish()


def threshold_inputs(run: Run, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """A fresh batch of ``threshold_tokens`` rows from the same pipeline (spec 3.3)."""
    from .cache import CacheSource

    if cfg.activation_cache:
        src = CacheSource(cfg.activation_cache, epochs=1, seed=cfg.seed + 7,
                          hook_points=hook_points_of(run.cfgs))
        buf = ShuffleBuffer(src, hook_points_of(run.cfgs), cfg.buffer_tokens, seed=cfg.seed + 7)
    else:
        buf = run.buffer
    rows = buf.peek(cfg.threshold_tokens)
    if rows[cfg.hook_point_in].shape[0] < cfg.threshold_tokens:
        raise ValueError(f"only {rows[cfg.hook_point_in].shape[0]} tokens available for the "
                         f"JumpReLU threshold; threshold_tokens={cfg.threshold_tokens}")
    return rows


def export_run(run: Run, out_root: Path | None = None) -> list[Path]:
    """Post-process every SAE of a finished run to JumpReLU and write release folders."""
    from llamascope_sdk.cards import render_card

    from .export import card_info, export, release_hyperparams
    from .postprocess import fold, jumprelu_threshold, mean_l0

    folders = []
    rows = threshold_inputs(run, run.cfg)
    for t in run.trainers:
        cfg = t.cfg
        raw = t.sae.raw_tensors(torch.bfloat16 if cfg.export_dtype == "bfloat16" else torch.float32)
        hp = release_hyperparams(cfg, t.norm_in, t.norm_out, 0.0, world=run.dist.world)
        x = rows[cfg.hook_point_in].float()
        theta = jumprelu_threshold(fold(hp, raw), x, cfg.top_k)
        hp["jump_relu_threshold"] = theta
        l0 = mean_l0(fold(hp, raw), x, theta)
        metrics = {"threshold-batch mean L0": l0, "train steps": t.step_count}
        metrics.update({f"last train {k}": v for k, v in getattr(run, "last_metrics", [{}])[
            run.trainers.index(t)].items() if k in ("ev", "mse", "dead")})
        folder = (out_root or run.run_dir / "export") / cfg.name
        folders.append(export(folder, cfg, raw, hp, render_card(card_info(cfg, hp, metrics))))
    return folders


def train(cfgs: list[TrainConfig], *, resume: bool = True, max_steps: int | None = None,
          progress: bool = True, export_to: Path | None = None) -> list[Path]:
    """Train the SAEs of ``cfgs`` together and export them when finished.

    Returns:
        The exported release folders (rank 0), or [] when the run stopped early (max_steps).
    """
    dist = init_from_env(cfgs[0].device)
    try:
        run = Run(cfgs, dist)
        run.fit(resume=resume, max_steps=max_steps, progress=progress)
        run.save()
        if not run.finished or not dist.is_main:
            return []
        return export_run(run, export_to)
    finally:
        shutdown() if dist.world > 1 else None
