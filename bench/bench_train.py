#!/usr/bin/env python
"""SAE training throughput on cached activations, relative to the dense compute of one step.

    python bench/bench_train.py [--d-model 576] [--expansion 8] [--k 32] [--batch 2048]

For each configuration it times full optimiser steps (forward, batch-norm MSE, backward, Adam)
of the Top-K SAE with the sparse kernels and with the dense masked decoder, and reports the
ratio of step time to the time of the dense encoder alone (matmul x W_e^T plus its backward:
3 matmuls of 2*B*D*F FLOPs), which is the floor any Top-K trainer pays. Also reports tokens/s
and peak memory (RSS high-water mark on CPU, max_memory_allocated on CUDA). Prints a table;
no asserts. Activations are random (cached activations only set the values, not the cost).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(d: int, f: int, k: int, b: int, device: str, reps: int,
          modes: tuple[bool, ...] = (True, False)) -> list[tuple]:  # noqa: ANN001
    from llamascope_sdk.training.trainable import TopKSAE, batch_norm_mse

    x = torch.randn(b, d, device=device)
    w = torch.randn(f, d, device=device, requires_grad=True)

    def dense_floor() -> None:
        h = x @ w.t()
        h.backward(torch.ones_like(h))

    floor = _time(dense_floor, reps)
    rows = []
    for sparse in modes:
        m = TopKSAE(d, f, sparse=sparse, device=device)
        with torch.no_grad():
            m.W_e.normal_(0, d ** -0.5)
            m.W_d.copy_(m.W_e)
        opt = torch.optim.Adam(m.parameters(), lr=1e-4)

        def step() -> None:
            out = m(x, k)  # noqa: B023
            loss = batch_norm_mse(out.y_hat, x, x.mean(0), b)
            opt.zero_grad(set_to_none=True)  # noqa: B023
            loss.backward()
            opt.step()  # noqa: B023

        dt = _time(step, reps)
        rows.append(("sparse" if sparse else "dense", d, f, k, b, dt, dt / floor, b / dt,
                     _peak_mb(device)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--expansion", type=int, nargs="+", default=[8])
    p.add_argument("--k", type=int, nargs="+", default=[32])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--one", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # child process: one mode, so peak memory is its own
        r = bench(args.d_model, args.d_model * args.expansion[0], args.k[0], args.batch,
                  args.device, args.reps, (args.one == "sparse",))[0]
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.3f} | {r[6]:.2f} | "
              f"{r[7]:,.0f} | {r[8]:,.0f} |", flush=True)
        return
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    print("| decoder | d_model | d_sae | k | batch | s/step | step / dense-encoder fwd+bwd | "
          "tokens/s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in args.expansion:
        for k in args.k:
            for mode in ("sparse", "dense"):
                import subprocess

                cmd = [sys.executable, __file__, "--one", mode, "--d-model", str(args.d_model),
                       "--expansion", str(e), "--k", str(k), "--batch", str(args.batch),
                       "--device", args.device, "--reps", str(args.reps)]
                print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout,
                      end="", flush=True)


if __name__ == "__main__":
    main()
