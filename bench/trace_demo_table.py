#!/usr/bin/env python
"""Predicted against actual for the top nodes of a demo graph (issue 25 item 2 d).

Builds the attribution graph of a prompt with SmolLM2-135M and the demo transcoder set, takes
the nodes with the largest direct edges into the top logit (features and error nodes), and
ablates each one in the real model, unfrozen (every later attention and MLP recomputed): its
contribution (a feature's activation times its decoder direction, or the error vector) is
taken out of that layer's MLP output at that position through the SDK's hooks. The graph's
prediction for that ablation is minus the direct edge (the frozen, first-order effect); the
actual change is that of the top token's logit minus the mean logit (the graph's target).
Prints a Markdown table.

    .venv/bin/python bench/trace_demo_table.py [--prompt TEXT] [--top 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The capital of France is Paris. The capital of Italy is"


def demeaned_logit(model: Any, ids: torch.Tensor, token: int, hooks: dict | None = None) -> float:
    from llamascope_sdk.core.hooks import hooked

    with torch.no_grad(), hooked(model, hooks or {}):
        logits = model(input_ids=ids[None], use_cache=False).logits[0, -1].double()
    return float(logits[token] - logits.mean())


def node_vector(g: Any, tcs: list[Any], node: int) -> tuple[int, int, torch.Tensor]:
    """(layer, position, vector the node adds to that layer's MLP output)."""
    if node < g.n_features:
        layer, pos, feat = (int(v) for v in g.features_F3[node])
        f = torch.zeros(2, tcs[layer].d_sae)
        f[0, feat] = float(g.feature_activations_F[node])
        y = tcs[layer].decode(f)
        return layer, pos, (y[0] - y[1]).detach()
    raise ValueError("only feature nodes carry a decoder vector")


def error_vector(model: Any, g: Any, tcs: list[Any], node: int) -> tuple[int, int, torch.Tensor]:
    """The error node's vector: the MLP output minus the decoded active features there."""
    from llamascope_sdk.core.sites import Site
    from llamascope_sdk.loading.capture import capture

    layer, pos = divmod(node - g.n_features, g.n_pos)
    ids = g.input_tokens_T[None]
    acts, _ = capture(model, [Site(layer, "mlp_out")], ids, torch.ones_like(ids, dtype=torch.bool))
    at = (g.active_features_A3[:, 0] == layer) & (g.active_features_A3[:, 1] == pos)
    f = torch.zeros(1, tcs[layer].d_sae)
    f[0, g.active_features_A3[at, 2]] = g.activations_A[at].float()
    return layer, pos, acts[Site(layer, "mlp_out")][0, pos] - tcs[layer].decode(f)[0]


def ablation_rows(model: Any, g: Any, tcs: list[Any], top: int) -> list[dict[str, Any]]:
    from llamascope_sdk.core.sites import Site

    token = int(g.logit_tokens_K[0])
    base = demeaned_logit(model, g.input_tokens_T, token)
    direct = g.edges_RC[g.n_features, : g.token_offset]  # features and error nodes
    rows = []
    for node in direct.abs().argsort(descending=True)[:top].tolist():
        layer, pos, vec = (node_vector(g, tcs, node) if node < g.n_features
                           else error_vector(model, g, tcs, node))

        def remove(y_BTD: torch.Tensor, pos: int = pos, vec: torch.Tensor = vec) -> torch.Tensor:
            y = y_BTD.clone()
            y[:, pos] -= vec.to(y.dtype)
            return y

        after = demeaned_logit(model, g.input_tokens_T, token, {Site(layer, "mlp_out"): remove})
        rows.append({"node": g.describe_node(node), "predicted": -float(direct[node]),
                     "actual": after - base})
    return rows


def markdown(g: Any, rows: list[dict[str, Any]]) -> str:
    head = [f"Prompt {g.prompt!r}; top logit {g.logit_strings[0]!r} "
            f"(p = {float(g.logit_probs_K[0]):.3f}). Ablating each node in the real model:", "",
            "| node | predicted change (−edge) | actual change | same sign |",
            "|---|---|---|---|"]
    body = [f"| `{r['node']}` | {r['predicted']:+.3f} | {r['actual']:+.3f} | "
            f"{'yes' if r['predicted'] * r['actual'] > 0 else 'no'} |" for r in rows]
    agree = sum(r["predicted"] * r["actual"] > 0 for r in rows)
    return "\n".join([*head, *body, "", f"Same sign for {agree} of {len(rows)} nodes."])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--max-feature-nodes", type=int, default=192)
    args = p.parse_args()
    from llamascope_sdk.loading.models import load_model
    from llamascope_sdk.trace import attribute
    from llamascope_sdk.trace.demo import demo_transcoders

    model, tok = load_model("smollm2-135m")
    tcs = demo_transcoders(model)
    g = attribute(model, tcs, args.prompt, tokenizer=tok, max_feature_nodes=args.max_feature_nodes,
                  batch_size=64)
    print(markdown(g, ablation_rows(model, g, tcs, args.top)))


if __name__ == "__main__":
    main()
