"""Subprocess entry for the SIGKILL/resume test: train the tiny recipe on a tiny random Llama,
optionally SIGKILL-ing itself right after step ``--kill-at`` (between two checkpoints)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llamascope_sdk.training.ddp import Dist  # noqa: E402
from llamascope_sdk.training.sources import hook_points_of, live_source  # noqa: E402
from llamascope_sdk.training.trainer import Run  # noqa: E402
from tests.training.tiny import CharTokenizer, tiny_config, tiny_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--kill-at", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.folder)
    cfg = tiny_config(folder)
    source = live_source(cfg, hook_points_of([cfg]), tiny_model(), CharTokenizer())
    run = Run([cfg], Dist(), source=source)
    if args.kill_at is not None:
        plain = run.train_step

        def step(batch: dict[str, torch.Tensor]) -> None:
            plain(batch)
            if run.step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        run.train_step = step  # type: ignore[method-assign]
    run.fit(resume=True, progress=False)
    run.save()


if __name__ == "__main__":
    main()
