"""training/run.py under torchrun (2 CPU processes, gloo) equals one process on the same data.

Both read the same cached activations with ``ddp_data=replicate`` (each rank keeps its half of
every global batch), so the runs differ only in the order of floating-point sums: the batch
mean and the gradients are all-reduced. Tolerance: 1e-4 absolute on the final parameters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamascope_sdk.training.cache import write_cache
from llamascope_sdk.training.sources import live_source

from .tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    run_dir = out / "tiny-L1R"
    latest = json.loads((run_dir / "latest.json").read_text())
    return load_file(str(run_dir / latest["dir"] / "model.safetensors"))


TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


@pytest.mark.skipif(not Path(TORCHRUN).is_file(), reason="torchrun not installed")
def test_two_processes_equal_one(tmp_path: Path, tiny_llama, char_tokenizer) -> None:
    cfg = tiny_config(tmp_path)
    src = live_source(cfg, [cfg.hook_point_in], tiny_llama, char_tokenizer, loop=False)
    write_cache(src, tmp_path / "cache", shard_tokens=400, progress=False)
    cfg = cfg.model_copy(update={"activation_cache": str(tmp_path / "cache"), "epochs": 3,
                                 "ddp_data": "replicate", "total_tokens": 64 * 30})
    cfg.save(tmp_path / "c.yaml")
    base = [str(ROOT / "training/run.py"), "--config", str(tmp_path / "c.yaml")]
    env = {"OMP_NUM_THREADS": "1", "PATH": shutil.os.environ["PATH"]}
    subprocess.run([sys.executable, *base, "--set", f"output_dir={tmp_path / 'one'}"],
                   check=True, cwd=ROOT, timeout=120, env=env, capture_output=True)
    # --standalone: torchrun's rendezvous takes a free port itself (a port picked here and
    # released before torchrun binds it can be taken in between)
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *base, "--set",
                          f"output_dir={tmp_path / 'two'}"],
                         cwd=ROOT, timeout=120, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-4000:]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4)
    hp = json.loads((tmp_path / "two/tiny-L1R/export/tiny-L1R/hyperparams.json").read_text())
    assert hp["ddp_size"] == 2 and hp["act_fn"] == "jumprelu"
