"""The training run: one data stream feeding several SAEs, checkpoints, logging, export.

``train(cfgs)`` is the library entry point behind ``training/run.py``. All configs must share
their data settings (:meth:`TrainConfig.data_key`): they read one LM pass and one shuffle buffer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

import llamascope_sdk.training.checkpoint as ck
from llamascope_sdk.base.dist import Dist, init_from_env, shutdown
from llamascope_sdk.loading.cards import render_card
from llamascope_sdk.training.buffer import ShuffleBuffer
from llamascope_sdk.training.cache import CacheSource
from llamascope_sdk.training.config import TrainConfig
from llamascope_sdk.training.errors import CheckpointError
from llamascope_sdk.training.export import card_info, export, release_hyperparams
from llamascope_sdk.training.optimizer import SAEOptimizer
from llamascope_sdk.training.postprocess import fold, jumprelu_threshold, mean_l0
from llamascope_sdk.training.sources import build_source, hook_points_of

log = logging.getLogger(__name__)


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
        self.saes = [SAEOptimizer(c, dist) for c in cfgs]
        name = "+".join(c.name for c in cfgs)
        self.run_dir = Path(self.cfg.output_dir) / name
        self.step = 0
        self.saved_step: int | None = None
        self.started = False
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
        all_ok = float(self.dist.sum(ok)) >= self.dist.world  # every rank stops together
        if batch is None or not all_ok:
            return None
        return self._local(batch)

    def init_norms(self) -> None:
        shard = self.cfg.ddp_data == "shard"
        n = self.cfg.norm_tokens // (self.dist.world if shard else 1)
        rows = self.buffer.peek(n)
        for t in self.saes:
            t.set_norms(rows[t.cfg.hook_point_in], rows[t.cfg.hook_point_out])

    # ------------------------------------------------------------------ checkpoints
    def _say(self, text: str) -> None:
        if self.dist.is_main:
            log.info(text)

    def save(self) -> Path:
        """Write a checkpoint of the current step (see :mod:`.checkpoint` for the order).

        Raises:
            NonFiniteError: a parameter or an Adam moment is NaN/inf; nothing is written.
        """
        for t in self.saes:  # every rank holds the same parameters: all raise together
            t.check_finite()
        seq = ck.next_seq(self.run_dir) if self.dist.is_main else 0
        seq = int(self.dist.sum(torch.tensor([float(seq)], dtype=torch.float64)))
        tmp = ck.tmp_dir(self.run_dir, self.step, seq)
        if self.dist.is_main:
            ck.begin(tmp)
        self.dist.barrier()
        buf_t, buf_s = self.buffer.state_dict()
        buf_t["torch_rng"] = torch.get_rng_state()
        ck.save_tensors(buf_t, tmp / ck.buffer_file(self.dist.rank))
        ck.save_json(buf_s, tmp / ck.data_file(self.dist.rank))
        if self.dist.is_main:
            model: dict[str, torch.Tensor] = {}
            optim: dict[str, torch.Tensor] = {}
            stats: dict[str, torch.Tensor] = {}
            saes = []
            for i, t in enumerate(self.saes):
                m, o, s, scalars = t.state(i)
                model.update(m)
                optim.update(o)
                stats.update(s)
                saes.append(scalars)
            ck.save_tensors(model, tmp / ck.MODEL)
            ck.save_tensors(optim, tmp / ck.OPTIM)
            ck.save_tensors(stats, tmp / ck.STATS)
            ck.save_json({"step": self.step, "seq": seq, "world": self.dist.world, "saes": saes,
                          "configs": [c.to_dict() for c in self.cfgs]}, tmp / ck.STATE)
        self.dist.barrier()
        final = self.run_dir / ck.final_name(self.step, seq)
        if self.dist.is_main:
            ck.commit(tmp, self.cfg.keep_checkpoints)
        self.dist.barrier()
        self.saved_step = self.step
        return final

    def load(self) -> bool:
        """Resume from the newest intact checkpoint; False when the run directory has none.

        Raises:
            CheckpointError: checkpoints exist but none is intact, or latest.json is invalid.
        """
        entries = ck.candidates(self.run_dir)
        if not entries:
            return False
        problems: list[str] = []
        for e in entries:
            try:
                got: ck.Checkpoint | None = ck.read(e.folder, self.dist.rank, self.dist.world)
                reason = ""
            except ck.Unusable as exc:
                got, reason = None, str(exc)
            ok = self.dist.sum(torch.tensor([0.0 if got is None else 1.0]))
            if got is not None and float(ok) == self.dist.world:
                self._apply(got)
                skipped = f" (skipped {len(problems)} newer unusable one(s))" if problems else ""
                self._say(f"resuming from {e.folder} (step {self.step}){skipped}")
                return True
            problems.append(f"{e.folder.name}: {reason or 'unusable on another rank'}")
            self._say(f"skipping checkpoint {e.folder}: {problems[-1].split(': ', 1)[1]}")
        raise CheckpointError(
            f"{self.run_dir} holds {len(entries)} checkpoint(s) but none can be resumed: "
            + "; ".join(problems),
            hint="restore a good step-* folder, or start over with --no-resume")

    def _apply(self, c: ck.Checkpoint) -> None:
        names = [s.get("name") for s in c.state["saes"]]
        if names != [cfg.name for cfg in self.cfgs]:
            raise CheckpointError(f"checkpoint {c.folder} holds SAEs {names}, this run trains "
                                  f"{[cfg.name for cfg in self.cfgs]}",
                                  hint="use another output_dir, or --no-resume")
        try:
            for i, t in enumerate(self.saes):
                t.load(i, c.model, c.optim, c.stats, c.state["saes"][i])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {c.folder} does not fit this recipe ({exc})",
                                  hint="use another output_dir, or --no-resume") from None
        self.buffer.load_state_dict(c.buffer, c.data)
        torch.set_rng_state(c.buffer["torch_rng"])
        self.step = self.saved_step = c.step

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        for t in self.saes:
            t.step(batch[t.cfg.hook_point_in], batch[t.cfg.hook_point_out], self.cfg.batch_size)
        self.step += 1

    def log(self, bar: Any, wandb_run: Any, tokens_per_s: float) -> None:
        rows = [t.metrics() for t in self.saes]
        if not self.dist.is_main:
            return
        m = rows[0]
        text = (f"tok/s {tokens_per_s:,.0f} L0 {m['l0']:.1f} EV {m['ev']:.3f} "
                f"MSE {m['mse']:.4g} dead {m['dead']:.3f} k {m['k']:.0f}")
        if bar is not None:
            bar.set_postfix_str(text)
        else:
            log.info("step %d: %s", self.step, text)
        if wandb_run is not None:
            wandb_run.log({f"{t.cfg.name}/{k}": v for t, r in zip(self.saes, rows, strict=True)
                           for k, v in r.items()} | {"tokens_per_s": tokens_per_s}, step=self.step)
        self.last_metrics = rows

    def fit(self, resume: bool = True, max_steps: int | None = None, progress: bool = True) -> None:
        """Train until total_steps (or the data ends, or ``max_steps`` for this call).

        The first call resumes from the newest intact checkpoint (unless ``resume=False``) or
        starts over; later calls on the same Run continue where the previous one stopped.
        """
        cfg = self.cfg
        if not self.started:  # a later call continues the run in memory
            if not (resume and self.load()):
                self.init_norms()
            self.started = True
        wandb_run = None
        if cfg.wandb_project and self.dist.is_main:
            try:
                import wandb  # optional (wandb_project), imported only when asked for
            except ImportError as exc:
                raise ImportError("wandb_project is set but wandb is missing: pip install wandb") from exc
            wandb_run = wandb.init(project=cfg.wandb_project, name=self.run_dir.name,
                                   config={c.name: c.to_dict() for c in self.cfgs})
        bar = None
        if progress and self.dist.is_main:
            from tqdm.auto import tqdm  # the train extra; only for the progress bar

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
    for t in run.saes:
        t.check_finite()
    folders = []
    rows = threshold_inputs(run, run.cfg)
    for t in run.saes:
        cfg = t.cfg
        raw = t.sae.raw_tensors(torch.bfloat16 if cfg.export_dtype == "bfloat16" else torch.float32)
        hp = release_hyperparams(cfg, t.norm_in, t.norm_out, 0.0, world=run.dist.world)
        x = rows[cfg.hook_point_in].float()
        theta = jumprelu_threshold(fold(hp, raw), x, cfg.top_k)
        hp["jump_relu_threshold"] = theta
        l0 = mean_l0(fold(hp, raw), x, theta)
        metrics = {"threshold-batch mean L0": l0, "train steps": t.step_count}
        metrics.update({f"last train {k}": v for k, v in getattr(run, "last_metrics", [{}])[
            run.saes.index(t)].items() if k in ("ev", "mse", "dead")})
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
        if run.saved_step != run.step:  # a re-run of a finished job writes nothing new
            run.save()
        if not run.finished or not dist.is_main:
            return []
        return export_run(run, export_to)
    finally:
        shutdown() if dist.world > 1 else None
