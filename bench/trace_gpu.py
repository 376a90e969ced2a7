#!/usr/bin/env python
"""Prepared device check for issue 25 item 5: attribution at Llama-3.1-8B's shape on a GPU.

A Llama-shaped model (32 layers, d 4,096, MLP 14,336, 32 heads / 8 KV heads, vocabulary
128,256) with random weights and 32 random JumpReLU transcoders of 32,768 features (threshold
set so that about ``--l0`` features fire per token), in bf16; prompts of 64 and 2,500 random
tokens. Per prompt: wall time of ``attribute`` (synchronised), peak allocated GPU memory
against the estimate the attribution prints (:func:`llamascope_sdk.trace.memory.estimate`,
device term), and the host memory of the edge matrix. Random weights give a graph of no
meaning but the real cost: the work depends on the shapes and on the number of active
features, not on the values.

    python bench/trace_gpu.py                         # on the GPU, 64 and 2,500 tokens
    python bench/trace_gpu.py --shape tiny --device cpu   # smoke check on a CPU (seconds)

Writes ``$OUT/trace_gpu.json`` when ``$OUT`` is set (the device machine's output folder).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "features": 32768},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
             "features": 256},
}


def random_model(shape: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k != "features"},
                      max_position_embeddings=4096, rope_theta=500000.0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    return model.eval()


def _hyperparams(layer: int, d: int, f: int) -> dict[str, Any]:
    return {"device": "cpu", "seed": 0, "dtype": "torch.bfloat16",
            "hook_point_in": f"blocks.{layer}.ln2.hook_normalized",
            "hook_point_out": f"blocks.{layer}.hook_mlp_out", "use_decoder_bias": True,
            "apply_decoder_bias_to_pre_encoder": False, "expansion_factor": f // d,
            "d_model": d, "d_sae": f, "bias_init_method": "all_zero", "act_fn": "jumprelu",
            "jump_relu_threshold": 0.0, "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": float(d) ** 0.5, "out": 1.0},
            "decoder_exactly_fixed_norm": False, "sparsity_include_decoder_norm": True,
            "use_glu_encoder": False, "init_decoder_norm": 0.5, "init_encoder_norm": 0.5,
            "init_encoder_with_decoder_transpose": False, "lp": 1, "l1_coefficient": 0.0,
            "l1_coefficient_warmup_steps": 0, "top_k": 32, "k_warmup_steps": 0,
            "use_batch_norm_mse": True, "use_ghost_grads": False, "tp_size": 1, "ddp_size": 1}


def random_transcoders(shape: dict[str, Any], device: str, dtype: torch.dtype,
                       l0: int) -> list[Any]:
    """One random transcoder per layer; the global threshold fires ~``l0`` features per token
    on normalised random inputs."""
    from llamascope_sdk.loading.sae import SAE

    d, f = shape["hidden_size"], shape["features"]
    g = torch.Generator(device=device).manual_seed(1)
    out = []
    for layer in range(shape["num_hidden_layers"]):
        raw = {"encoder.weight": torch.randn(f, d, device=device, dtype=dtype, generator=g) / d ** 0.5,
               "encoder.bias": torch.zeros(f, device=device, dtype=dtype),
               "decoder.weight": torch.randn(d, f, device=device, dtype=dtype, generator=g) / f ** 0.5,
               "decoder.bias": torch.zeros(d, device=device, dtype=dtype)}
        sae = SAE.from_raw(_hyperparams(layer, d, f), raw, device=device, dtype=dtype)
        x = torch.randn(64, d, device=device, dtype=dtype, generator=g)
        pre = sae.pre_acts(x).float()
        sae.set_threshold(float(pre.flatten().kthvalue(pre.numel() - 64 * l0).values))
        out.append(sae)
    return out


def one_prompt(model: Any, tcs: list[Any], n_tokens: int, max_nodes: int, batch: int,
               device: str) -> dict[str, Any]:
    from llamascope_sdk.trace import attribute, replacement
    from llamascope_sdk.trace.memory import estimate, widest_position

    g = torch.Generator().manual_seed(n_tokens)
    ids = torch.randint(3, model.config.vocab_size, (n_tokens,), generator=g)
    ids[0] = 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    graph = attribute(model, tcs, ids, max_feature_nodes=max_nodes, batch_size=batch, verbose=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    est = estimate(model, replacement.by_layer(model, tcs), n_pos=n_tokens,
                   n_active=int(graph.active_features_A3.shape[0]),
                   n_feature_rows=graph.n_features, n_logits=graph.n_logits,
                   batch_size=int(graph.info["batch_size"]),
                   widest=widest_position(graph.active_features_A3))
    r = {"tokens": n_tokens, "active_features": int(graph.active_features_A3.shape[0]),
         "feature_rows": graph.n_features, "logits": graph.n_logits,
         "batch": graph.info["batch_size"], "seconds": seconds,
         "estimate_device_gib": est.device / 2**30, "estimate_host_gib": est.host / 2**30}
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        r.update({"peak_allocated_gib": peak / 2**30, "weights_and_base_gib": base / 2**30,
                  "measured_over_estimate": peak / est.device})
    print(json.dumps(r))
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", default="64,2500", help="prompt lengths, comma-separated")
    p.add_argument("--max-feature-nodes", default="7500,4096", help="one per prompt length")
    p.add_argument("--batch-size", default="256,8", help="one per prompt length")
    p.add_argument("--l0", type=int, default=32, help="features firing per token (about)")
    args = p.parse_args()
    shape = dict(SHAPES[args.shape])
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    lengths = [int(x) for x in args.tokens.split(",")]
    nodes = [int(x) for x in args.max_feature_nodes.split(",")]
    batches = [int(x) for x in args.batch_size.split(",")]
    if not len(lengths) == len(nodes) == len(batches):
        raise SystemExit("error: --tokens, --max-feature-nodes and --batch-size need one value "
                         "per prompt length")
    t0 = time.perf_counter()
    model = random_model(shape, args.device, dtype)
    tcs = random_transcoders(shape, args.device, dtype, args.l0)
    setup = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.shape} shape on {name}: model and transcoders built in {setup:.0f} s")
    runs = [one_prompt(model, tcs, n, m, b, args.device)
            for n, m, b in zip(lengths, nodes, batches, strict=True)]
    out = os.environ.get("OUT")
    if out:
        Path(out, "trace_gpu.json").write_text(json.dumps(
            {"shape": args.shape, "device": name, "setup_seconds": setup, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
