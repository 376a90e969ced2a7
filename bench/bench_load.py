"""Loading a real-size checkpoint from a warm Hugging Face cache (8x: d_model 4096, 32768
features, bf16, 537 MB), every number measured in this one run, in fresh subprocesses.

Targets (ratios, so that they hold on any machine):
  (a) load time, folded fp32 / time of ``Path.read_bytes()`` of the same warm file   <= 3.0
      peak-RSS growth during the load / bytes of the final in-memory weights       <= 1.75
  (c) ``dtype="bfloat16"`` gives bf16 weights (no fp32 detour): every parameter's dtype and
      device is printed, and the bf16 peak RSS is below the fp32 one. With CUDA, the load
      reads straight to the device (``device="cuda"``) and the CPU RSS growth is printed.

The checkpoint is written once into a temporary HF cache laid out exactly as
``hf_hub_download`` leaves it (blobs named by sha256, snapshots/<commit>/..., refs/main);
loads go through ``SAE.from_pretrained("L8R-8x")`` with HF_HUB_OFFLINE=1, i.e. through
``hub.download`` and its verification record, as a user's second load would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout: import this tree's llamascope_sdk even where the editable install's
# finder would hand back a namespace package (it does here when sys.path[0] is bench/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO_DIR = "models--OpenMOSS-Team--Llama3_1-8B-Base-LXR-8x"
FOLDER = "Llama3_1-8B-Base-L8R-8x"
COMMIT = "1fd71f5" + "0" * 33
NAME = "L8R-8x"
N_IN = 6.3125  # L8R-8x's dataset norm (spec 2.1)


def make_raw(d_model: int, d_sae: int, seed: int = 0) -> dict:
    """Random training-space tensors with decoder column norms spread like real ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(d_sae, d_model, generator=g).div_(d_model ** 0.5).to(torch.bfloat16)
    dec = torch.randn(d_model, d_sae, generator=g).div_(d_model ** 0.5)
    dec.mul_(0.5 + 2.0 * torch.rand(d_sae, generator=g))
    return {"encoder.weight": enc, "encoder.bias": (0.05 * torch.randn(d_sae, generator=g)).to(torch.bfloat16),
            "decoder.weight": dec.to(torch.bfloat16),
            "decoder.bias": (0.05 * torch.randn(d_model, generator=g)).to(torch.bfloat16)}


def threshold_for_l0(raw: dict, n_in: float, l0: float, n_tokens: int = 512) -> float:
    """The global threshold that gives mean L0 = ``l0`` on random inputs with ||x|| ~ n_in."""
    import torch

    d = raw["decoder.weight"].shape[0]
    s = d ** 0.5 / n_in  # s_in = s_out for R
    x = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(1)) * n_in / d ** 0.5
    h = (s * x) @ raw["encoder.weight"].float().T + raw["encoder.bias"].float()
    a = raw["decoder.weight"].float().norm(dim=0) * h / s
    k = int(l0 * n_tokens)
    return float(a.flatten().kthvalue(a.numel() - k).values)


def hyperparams(d_model: int, d_sae: int, threshold: float) -> dict:
    return {"device": "cuda:0", "seed": 42, "dtype": "torch.bfloat16",
            "hook_point_in": "blocks.8.hook_resid_post", "hook_point_out": "blocks.8.hook_resid_post",
            "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False,
            "expansion_factor": d_sae // d_model, "d_model": d_model, "d_sae": d_sae,
            "bias_init_method": "all_zero", "act_fn": "jumprelu", "jump_relu_threshold": threshold,
            "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": N_IN, "out": N_IN},
            "decoder_exactly_fixed_norm": False, "sparsity_include_decoder_norm": True,
            "use_glu_encoder": False, "init_decoder_norm": 0.5, "init_encoder_norm": None,
            "init_encoder_with_decoder_transpose": True, "lp": 1, "l1_coefficient": 8e-05,
            "l1_coefficient_warmup_steps": 39062, "top_k": 50, "k_warmup_steps": 39062,
            "use_batch_norm_mse": True, "use_ghost_grads": False, "tp_size": 1, "ddp_size": 1}


def build_cache(root: Path, d_model: int = 4096, d_sae: int = 32768, l0: float = 50.0) -> Path:
    """Write the HF cache layout once; returns the cache root (HF_HUB_CACHE)."""
    from safetensors.torch import save_file

    raw = make_raw(d_model, d_sae)
    theta = threshold_for_l0(raw, N_IN, l0)
    repo = root / REPO_DIR
    snap = repo / "snapshots" / COMMIT / FOLDER
    (snap / "checkpoints").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    tmp = repo / "blobs" / "tmp.safetensors"
    save_file(raw, str(tmp))
    del raw
    h = hashlib.sha256()
    with open(tmp, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    blob = repo / "blobs" / h.hexdigest()
    tmp.rename(blob)
    files = {"checkpoints/final.safetensors": blob}
    for name, text in (("hyperparams.json", json.dumps(hyperparams(d_model, d_sae, theta), indent=4)),
                       ("lm_config.json", json.dumps({"model_name": "meta-llama/Llama-3.1-8B"}))):
        data = text.encode()
        b = repo / "blobs" / hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        b.write_bytes(data)
        files[name] = b
    for rel, b in files.items():
        link = snap / rel
        link.symlink_to(os.path.relpath(b, link.parent))
    return root


def env_for(cache: Path, sdk_cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "LLAMASCOPE_CACHE": str(sdk_cache), "HF_HUB_DISABLE_TELEMETRY": "1"}


# ----------------------------------------------------------------------------- child side
def child(kind: str, dtype: str, device: str, path: str) -> None:
    import resource

    import torch  # imports are not part of the measurement

    from llamascope_sdk import SAE

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def hwm() -> int:  # per-process high-water mark; unlike ru_maxrss, not inherited at fork
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cuda": torch.cuda.is_available()}
    before, before_hwm = rss(), hwm()
    t = time.perf_counter()
    if kind == "build":
        build_cache(Path(path))
    elif kind == "read_bytes":
        data = Path(path).read_bytes()
        out["bytes"] = len(data)
    else:
        sae = SAE.from_pretrained(NAME, dtype=dtype, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out["weights_bytes"] = sum(t.numel() * t.element_size()
                                   for t in [*sae.parameters(), *sae.buffers()])
        out["params"] = [[n, str(p.dtype), str(p.device)] for n, p in
                         [*sae.named_parameters(), *sae.named_buffers()]]
        if device.startswith("cuda"):
            out["cuda_peak"] = torch.cuda.max_memory_allocated()
    out["seconds"] = time.perf_counter() - t
    out["rss_growth"] = rss() - before
    out["hwm_growth"] = hwm() - before_hwm
    print(json.dumps(out))


def run_child(env: dict[str, str], *args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="subprocess runs per row (best is used)")
    ap.add_argument("--keep", type=Path, default=None, help="build the cache here and keep it")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "DTYPE", "DEVICE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    # This process never imports torch or holds tensors: on Linux a child's ru_maxrss starts
    # at its parent's RSS (it survives fork and exec), which would hide the load's growth.
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        t = time.perf_counter()
        cache = root / "hub"
        env = env_for(cache, root / "sdk")
        if not (cache / REPO_DIR).is_dir():
            run_child(env, "build", "-", "cpu", str(cache))
        print(f"checkpoint written in {time.perf_counter() - t:.1f} s ({cache})")
        blob = next((cache / REPO_DIR / "blobs").glob("?" * 64))
        # First load: verifies the sha256 once and writes the record; also warms the page cache.
        run_child(env, "load", "float32", "cpu", "-")
        rb = [run_child(env, "read_bytes", "-", "cpu", str(blob)) for _ in range(args.runs)]
        f32 = [run_child(env, "load", "float32", "cpu", "-") for _ in range(args.runs)]
        b16 = [run_child(env, "load", "bfloat16", "cpu", "-") for _ in range(args.runs)]
        t_read = min(r["seconds"] for r in rb)
        t_f32 = min(r["seconds"] for r in f32)
        t_b16 = min(r["seconds"] for r in b16)
        rss_f32 = statistics.median(r["rss_growth"] for r in f32)
        rss_b16 = statistics.median(r["rss_growth"] for r in b16)
        w_f32, w_b16 = f32[0]["weights_bytes"], b16[0]["weights_bytes"]
        size = rb[0]["bytes"]
        print(f"\nfile {size / 1e6:.1f} MB; best time of {args.runs} fresh subprocesses per row, median "
              f"RSS; torch {f32[0]['torch']}, {f32[0]['threads']} threads\n")
        print(f"{'measurement':46s} {'value':>12s}")
        print(f"{'Path.read_bytes() warm':46s} {t_read:11.3f}s")
        print(f"{'from_pretrained fp32 (warm cache, offline)':46s} {t_f32:11.3f}s")
        print(f"{'from_pretrained bf16 (warm cache, offline)':46s} {t_b16:11.3f}s")
        print(f"{'peak-RSS growth fp32':46s} {_gb(rss_f32):>12s}")
        print(f"{'final weights fp32':46s} {_gb(w_f32):>12s}")
        print(f"{'peak-RSS growth bf16':46s} {_gb(rss_b16):>12s}")
        print(f"{'(check: VmHWM growth fp32 / bf16)':46s} "
              f"{_gb(f32[0]['hwm_growth'])} / {_gb(b16[0]['hwm_growth'])}")
        print(f"{'final weights bf16':46s} {_gb(w_b16):>12s}")
        print("\n(c) parameters after from_pretrained(..., dtype='bfloat16'):")
        for name, dt, dev in b16[0]["params"]:
            print(f"    {name:14s} {dt:16s} {dev}")
        rows = [
            ("(a) load fp32 / read_bytes", t_f32 / t_read, 3.0),
            ("(a) peak-RSS growth / weights bytes (fp32)", rss_f32 / w_f32, 1.75),
            ("(c) peak-RSS bf16 / peak-RSS fp32", rss_b16 / rss_f32, 1.0),
        ]
        params_ok = all(dt == "torch.bfloat16" for n, dt, _ in b16[0]["params"]
                        if n not in ("decoder_norm",))
        print(f"\n{'target':46s} {'ratio':>7s} {'limit':>6s}  result")
        for name, ratio, limit in rows:
            ok = ratio <= limit if "bf16 / peak" not in name else ratio < limit
            print(f"{name:46s} {ratio:7.2f} {limit:6.2f}  {'PASS' if ok else 'FAIL'}")
        print(f"{'(c) every weight bf16 (decoder_norm stays fp32)':46s} {'':>7s} {'':>6s}  "
              f"{'PASS' if params_ok else 'FAIL'}")
        if f32[0]["cuda"]:
            cu = run_child(env, "load", "bfloat16", "cuda", "-")
            devs = {dev for _, _, dev in cu["params"]}
            print(f"(c) CUDA: devices {sorted(devs)}, load {cu['seconds']:.3f}s, CPU peak-RSS growth "
                  f"{_gb(cu['rss_growth'])}, CUDA peak {_gb(cu['cuda_peak'])} for {_gb(cu['weights_bytes'])}")
        else:
            print("(c) CUDA: not available on this machine (safe_open(device=...) path not exercised)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
