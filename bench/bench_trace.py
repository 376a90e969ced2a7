#!/usr/bin/env python
"""Cost of ``llamascope_sdk.trace.attribute`` on this CPU (issue 25 item 5), one run:

1. a 32-token SmolLM2-135M graph with the demo transcoder set: wall time and peak resident
   memory of the attribution call, against the memory formula the attribution prints
   (:func:`llamascope_sdk.trace.memory.estimate`; the target is within +-25%);
2. its floor: one forward of the frozen replacement model on the prompt plus one batched
   backward per batch of targets (``ceil((logits + feature rows) / batch)`` backward passes
   of ``batch`` gradients each, from the final norm to every MLP-output leaf and the
   embeddings: the most work any batch needs), timed with the same frozen forward and
   nothing else; the ratio attribution / floor (below 1 is possible: attribution batches a
   round's features by layer, so most of its backward passes stop below the last layer);
3. a 1,024-token prompt (the repository's corpus excerpts) under a stated memory cap;
4. side by side, circuit-tracer's time and memory on the same 32-token graph (its own venv,
   through ``bench/trace_parity_circuit_tracer.py``), with the node-by-node comparison.

    .venv/bin/python bench/bench_trace.py                         # everything
    .venv/bin/python bench/bench_trace.py --no-circuit-tracer     # without step 4

Memory is the process's resident set (CPU run), sampled every 2 ms during the call, above
what it held before the call (model and transcoders were loaded before; the estimate's
weight term is left out of the comparison for that reason). Times are wall-clock on a 2-core
CPU shared with other jobs, one thread: compare ratios measured in one run, not absolute
seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.trace_parity_circuit_tracer import PROMPT, PeakRSS  # noqa: E402

GIB = float(1 << 30)
MIB = float(1 << 20)


def timed_graph(model: Any, tok: Any, tcs: list[Any], ids: torch.Tensor,
                **kw: Any) -> tuple[Any, float, PeakRSS, Any]:
    """(graph, seconds, memory, estimate) of one attribution."""
    from llamascope_sdk.trace import attribute, replacement
    from llamascope_sdk.trace.memory import estimate, widest_position

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        g = attribute(model, tcs, ids, tokenizer=tok, **kw)
        seconds = time.perf_counter() - t0
    tcs_by = replacement.by_layer(model, tcs)
    est = estimate(model, tcs_by, n_pos=g.n_pos, n_active=int(g.active_features_A3.shape[0]),
                   n_feature_rows=g.n_features, n_logits=g.n_logits,
                   batch_size=int(g.info["batch_size"]),
                   widest=widest_position(g.active_features_A3))
    return g, seconds, mem, est


def floor_seconds(model: Any, ids: torch.Tensor, batch: int, n_backward: int) -> float:
    """One frozen forward of the prompt plus ``n_backward`` batched backward passes (``batch``
    gradients each, as attribution runs them) from the final norm's output to every MLP-output
    leaf and the embedding leaf."""
    from llamascope_sdk.trace.frozen import frozen_forward

    inner = getattr(model, "model", model)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with frozen_forward(model) as tape:
        inner(input_ids=ids[None], use_cache=False)
        assert tape.final is not None and tape.embed is not None
        leaves = [tape.mlp_out[L] for L in sorted(tape.mlp_out)] + [tape.embed]
        for _ in range(n_backward):
            grad = torch.randn((batch, *tape.final.shape), generator=g, dtype=tape.final.dtype)
            torch.autograd.grad(tape.final, leaves, grad, retain_graph=True, allow_unused=True,
                                is_grads_batched=True)
    return time.perf_counter() - t0


def added_estimate(est: Any) -> float:
    """The estimate's bytes beyond the weights (loaded before the measured call)."""
    return float(est.added)


def long_prompt_ids(tok: Any, n: int) -> torch.Tensor:
    from llamascope_sdk.loading.models import tokenize

    text = "\n\n".join((ROOT / "tests/data/corpus" / f).read_text()
                       for f in ("wikitext2-valid.txt", "tinyshakespeare.txt"))
    ids = tokenize(tok, text)[0][:n]
    if ids.numel() < n:
        sys.exit(f"error: the corpus excerpts hold only {ids.numel()} tokens, {n} asked")
    return ids


def report_graph(label: str, g: Any, seconds: float, mem: PeakRSS, est: Any) -> dict[str, Any]:
    r = mem.report()
    predicted = added_estimate(est) / MIB
    out = {"tokens": g.n_pos, "active_features": int(g.active_features_A3.shape[0]),
           "feature_rows": g.n_features, "logits": g.n_logits, "batch": g.info["batch_size"],
           "seconds": seconds, "rss_added_mib": r["rss_added_mib"],
           "rss_peak_mib": r["rss_peak_mib"], "estimate_added_mib": predicted,
           "measured_over_estimate": r["rss_added_mib"] / predicted}
    print(f"{label}: {g.n_pos} tokens, {out['active_features']:,} active features, "
          f"{g.n_features} feature rows + {g.n_logits} logits, batch {out['batch']}: "
          f"{seconds:.1f} s, peak RSS {r['rss_peak_mib']:.0f} MiB "
          f"({r['rss_added_mib']:.0f} MiB added by the call; estimate {predicted:.0f} MiB "
          f"beyond the weights, measured/estimate {out['measured_over_estimate']:.2f})")
    return out


def run_circuit_tracer(g: Any, ids: torch.Tensor, s: dict[str, Any], work: Path,
                       ours: dict[str, Any]) -> dict[str, Any]:
    """circuit-tracer on the same graph settings (fresh process of its venv) and the
    node-by-node comparison with our graph."""
    from safetensors.torch import save_file

    import bench.trace_parity_circuit_tracer as parity

    parity.prepare(work, int(ids.numel()))
    save_file({"adjacency": g.adjacency_matrix().float().contiguous(),
               "features": g.features_F3.long().contiguous(),
               "logit_tokens": g.logit_tokens_K.long().contiguous(),
               "n_active": torch.tensor([g.active_features_A3.shape[0]])},
              str(work / "ours.safetensors"))
    ct = parity._side("circuit-tracer", work, s, parity.CT_PYTHON)
    cmp = parity.compare(work, n_layers=g.n_layers)
    print(f"circuit-tracer 0.5.0 on the same graph: {ct['seconds']:.1f} s, peak RSS "
          f"{ct['rss_peak_mib']:.0f} MiB ({ct['rss_added_mib']:.0f} MiB added by the call); "
          f"ours/circuit-tracer: time {ours['seconds'] / ct['seconds']:.2f}, added memory "
          f"{ours['rss_added_mib'] / max(ct['rss_added_mib'], 1e-9):.2f}")
    print(f"adjacency, node by node over {cmp['compared_nodes']} common nodes "
          f"({cmp['common_features']} of {cmp['feature_nodes']} feature nodes): max |diff| / "
          f"max |edge| = {cmp['max_diff_over_max_edge']:.2e}, max |diff| / row max = "
          f"{cmp['max_diff_over_row_max']:.2e}")
    return {"circuit_tracer": ct, "compare": cmp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--max-feature-nodes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--long-tokens", type=int, default=1024)
    p.add_argument("--long-max-feature-nodes", type=int, default=32)
    p.add_argument("--long-batch-size", type=int, default=8)
    p.add_argument("--memory-cap-gib", type=float, default=4.0,
                   help="the long prompt's peak RSS must stay under this")
    p.add_argument("--no-circuit-tracer", action="store_true")
    p.add_argument("--out", default=str(ROOT / "runs/bench-trace.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    from llamascope_sdk.loading.models import load_model, tokenize
    from llamascope_sdk.trace.demo import demo_transcoders

    model, tok = load_model("smollm2-135m")
    tcs = demo_transcoders(model)
    ids = tokenize(tok, PROMPT)[0][:args.tokens]
    settings = {"max_logits": 10, "logit_probability": 0.95, "batch_size": args.batch_size,
                "max_feature_nodes": args.max_feature_nodes}
    timed_graph(model, tok, tcs, ids[:4], max_feature_nodes=4, batch_size=4)  # warm-up
    g, sec, mem, est = timed_graph(model, tok, tcs, ids, max_feature_nodes=args.max_feature_nodes,
                                   batch_size=args.batch_size)
    res: dict[str, Any] = {"graph32": report_graph("graph", g, sec, mem, est)}
    batch = int(g.info["batch_size"])
    n_back = math.ceil((g.n_logits + g.n_features) / batch)
    fl = floor_seconds(model, ids, batch, n_back)
    res["floor"] = {"seconds": fl, "backward_passes": n_back, "ratio": sec / fl}
    print(f"floor: frozen forward + {n_back} batched backward passes of {batch} = {fl:.1f} s; "
          f"attribution / floor = {sec / fl:.2f}")
    if not args.no_circuit_tracer:
        res.update(run_circuit_tracer(g, ids, settings, ROOT / "runs/trace-parity",
                                      res["graph32"]))
    del g
    long_ids = long_prompt_ids(tok, args.long_tokens)
    g, sec, mem, est = timed_graph(model, tok, tcs, long_ids,
                                   max_feature_nodes=args.long_max_feature_nodes,
                                   batch_size=args.long_batch_size)
    res["long"] = report_graph("long prompt", g, sec, mem, est)
    cap_ok = mem.peak / GIB < args.memory_cap_gib
    res["long"]["memory_cap_gib"] = args.memory_cap_gib
    print(f"long prompt peak RSS {mem.peak / GIB:.2f} GiB vs cap {args.memory_cap_gib:g} GiB: "
          f"{'under' if cap_ok else 'OVER'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
