"""Subprocess entry for the SIGKILL tests: train the tiny recipe on the shared tiny Llama (saved
by the test with ``save_pretrained``), optionally SIGKILL-ing itself right after step
``--kill-at`` (between two checkpoints) or at the ``--kill-op``-th file operation of the save of
step ``--kill-save`` (inside a checkpoint write)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llamascope_sdk.base.dist import Dist  # noqa: E402
from llamascope_sdk.training import checkpoint as ck  # noqa: E402
from llamascope_sdk.training.loop import Run  # noqa: E402
from llamascope_sdk.training.sources import hook_points_of, live_source  # noqa: E402
from tests.conftest import CharTokenizer  # noqa: E402
from tests.training.tiny import tiny_config  # noqa: E402


def kill_at_op(n: int) -> None:
    """SIGKILL this process instead of performing the n-th file operation of a save."""
    count = [0]

    def wrap(fn):  # noqa: ANN001, ANN202
        def inner(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return inner

    os.replace = wrap(os.replace)
    os.mkdir = wrap(os.mkdir)
    shutil.rmtree = wrap(shutil.rmtree)
    ck.save_file = wrap(ck.save_file)
    ck.write_text = wrap(ck.write_text)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("model")
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--kill-save", type=int, default=None)
    p.add_argument("--kill-op", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM

    folder = Path(args.folder)
    cfg = tiny_config(folder)
    model = LlamaForCausalLM.from_pretrained(args.model).eval()
    source = live_source(cfg, hook_points_of([cfg]), model, CharTokenizer())
    run = Run([cfg], Dist(), source=source)
    plain_step, plain_save = run.train_step, run.save

    def step(batch: dict[str, torch.Tensor]) -> None:
        plain_step(batch)
        if run.step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def save() -> Path:
        if run.step == args.kill_save:
            kill_at_op(args.kill_op)
        return plain_save()

    run.train_step = step  # type: ignore[method-assign]
    run.save = save  # type: ignore[method-assign]
    run.fit(resume=True, progress=False)
    if run.saved_step != run.step:
        run.save()


if __name__ == "__main__":
    main()
