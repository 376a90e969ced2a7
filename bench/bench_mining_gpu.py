"""Mining at Llama Scope scale on one device: a synthetic SAE shaped like a 32x Llama Scope SAE
(d_model 4,096, 131,072 features) on a Llama-shaped model, in bf16; mining tok/s and the ratio
to its floor (the forward to the SAE's layer plus the encode, same batches, one run).

Llama-3.1-8B cannot be downloaded here, so the model is a randomly initialised
``LlamaForCausalLM`` with Llama-3.1-8B's layer shape (hidden 4,096, MLP 14,336, 32 heads, 8 KV
heads) and ``--layers`` layers (the forward stops at the SAE's layer anyway, as mining does),
and SmolLM2's tokenizer (its vocabulary sets the embedding size). The SAE is random, its
threshold set for an L0 of about ``--l0``. The cost of mining depends on the shapes and the
number of firings, not on what the weights mean, so the ratio is the one a real Llama Scope SAE
would see on a model of this width.

    python bench/bench_mining_gpu.py --device cuda                      # the GPU figure
    python bench/bench_mining_gpu.py --device cpu --d-model 256 --d-sae 4096 --layers 2 \\
        --tokens 8192 --context 256                                     # a quick CPU check

Text: the repository's corpus excerpts (tests/data/corpus), repeated to fill ``--tokens``.
The CPU check only shows that the script runs: with a model that narrow the forward is cheap
and the bookkeeping per firing dominates (d 256, 4,096 features, L0 54: 12.7x); the figure that
matters is the default shape on a GPU. Not yet run on a GPU: none was lent to this task.
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


def llama_shaped(d_model: int, layers: int, vocab: int, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, d_model // 128)
    cfg = LlamaConfig(hidden_size=d_model, intermediate_size=int(3.5 * d_model) // 256 * 256 or 256,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def synthetic_sae(model: Any, tok: Any, layer: int, d_sae: int, l0: int, texts: list[str],
                  device: str, dtype: torch.dtype) -> Any:
    from llamascope_sdk import SAE, corpus
    from llamascope_sdk.core.hyperparams import Hyperparams
    from llamascope_sdk.core.sites import parse_hook_point
    from llamascope_sdk.loading.capture import capture, keep_mask
    from llamascope_sdk.loading.models import special_ids

    d = model.config.hidden_size
    hook = f"blocks.{layer}.hook_resid_post"
    demo_hp = (REPO / "llamascope_sdk" / "assets" / "smollm2-135m-L15R-8x" / "hyperparams.json")
    hp = Hyperparams.model_validate_json(demo_hp.read_text()).model_copy(update={
        "d_model": d, "d_sae": d_sae, "expansion_factor": d_sae // d, "hook_point_in": hook,
        "hook_point_out": hook, "dataset_average_activation_norm": {"in": 1.0, "out": 1.0}})
    site = parse_hook_point(hook)
    b = next(iter(corpus.batches(tok, texts, tokens=4096, context=512, batch_size=8)))
    acts, _ = capture(model, [site], b.ids.to(device), b.valid.to(device))
    x = acts[site]
    norm = float(x.float().norm(dim=-1).mean())
    hp = hp.model_copy(update={"dataset_average_activation_norm": {"in": norm, "out": norm}})
    sae = SAE(hp)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_sae, d, generator=g) / d ** 0.5)
        sae.b_enc.zero_()
        w = torch.randn(d_sae, d, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.b_dec.zero_()
    sae = sae.to(device=device, dtype=dtype)
    sae.source.subfolder = f"synthetic-{d_sae}"
    keep = keep_mask(b.ids, b.valid, torch.tensor(sorted(special_ids(tok)))).to(device)
    with torch.no_grad():
        pre = sae.pre_acts(x[keep]).float().flatten()
        sae.set_threshold(float(pre.topk(l0 * int(keep.sum())).values[-1]))
    return sae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8, help="model layers; the SAE reads the middle one")
    ap.add_argument("--l0", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=100, help="decile samples per feature")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)

    from llamascope_sdk import corpus, mine
    from llamascope_sdk.core.sites import parse_hook_point
    from llamascope_sdk.loading.capture import capture
    from llamascope_sdk.loading.models import load_model
    from llamascope_sdk.mining.mine import state_bytes

    _, tok = load_model("smollm2-135m")  # its tokenizer; the model below is Llama-shaped
    base = [p.read_text(encoding="utf-8") for p in sorted((REPO / "tests" / "data" / "corpus").glob("*.txt"))]
    texts = [t for _ in range(max(1, a.tokens // 8000 + 1)) for t in base]
    model = llama_shaped(a.d_model, a.layers, len(tok), a.device, dtype)
    layer = a.layers // 2
    sae = synthetic_sae(model, tok, layer, a.d_sae, a.l0, texts, a.device, dtype)
    site = parse_hook_point(sae.hyperparams.hook_point_in)
    kw: dict[str, Any] = dict(tokens=a.tokens, context=a.context, batch_size=a.batch_size)
    n_tok = sum(int(b.lengths.sum()) for b in corpus.batches(tok, texts, **kw))

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def floor() -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            for b in corpus.batches(tok, texts, rule="windows", **kw):
                acts, _ = capture(model, [site], b.ids.to(a.device), b.valid.to(a.device))
                sae.encode(acts[site])
        sync()
        return time.perf_counter() - t

    def mining() -> tuple[float, Any]:
        sync()
        t = time.perf_counter()
        out = mine(model, tok, sae, texts, progress=False, n_samples=a.samples, **kw)[sae.name]
        sync()
        return time.perf_counter() - t, out

    floor()  # warm-up
    tf = floor()
    tm, res = mining()
    l0 = float(res.stats.frequency.sum())
    mem = ""
    if a.device.startswith("cuda"):
        mem = f"; peak device memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'cpu'}), "
          f"{a.dtype}; Llama-shaped model d={a.d_model}, {a.layers} layers (SAE at layer {layer}); "
          f"SAE {a.d_sae:,} features, L0 {l0:.0f}; {n_tok:,} tokens, context {a.context}, "
          f"batch {a.batch_size}")
    print(f"floor (forward to layer {layer} + encode) {tf:.2f} s = {n_tok / tf:,.0f} tok/s; "
          f"mining {tm:.2f} s = {n_tok / tm:,.0f} tok/s; mining / floor = {tm / tf:.2f}x "
          f"(target <= 1.25x); state {state_bytes(a.d_sae, n_samples=a.samples) / 2**30:.2f} GiB"
          f"{mem}")


if __name__ == "__main__":
    main()
