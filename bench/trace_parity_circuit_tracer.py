#!/usr/bin/env python
"""Parity with circuit-tracer (issue 25 item 3): the same model, transcoders and prompt through
``llamascope_sdk.trace.attribute`` and through circuit-tracer, adjacency matrices compared
node by node, with each side's time and peak memory.

    .venv/bin/python bench/trace_parity_circuit_tracer.py                  # 32-token demo prompt
    .venv/bin/python bench/trace_parity_circuit_tracer.py --tokens 12 --max-feature-nodes 100000

circuit-tracer pins transformers 4.57.3, so it runs in its own virtualenv (not in CI)::

    python -m venv .venvs/circuittracer            # in the repository (ignored by git); or any
    .venvs/circuittracer/bin/pip install circuit-tracer   # path, given with --ct-python; 0.5.0 was measured

Protocol: (1) this process (the SDK's venv) writes a work folder: SmolLM2-135M's weights as
the SDK loads them (safetensors, HF key names) with its tokenizer, the demo transcoder set
exported in circuit-tracer's layout (:mod:`llamascope_sdk.loading.formats.circuit_tracer`:
``feature_input_hook: ln2.hook_normalized``) and the token ids; (2) a fresh process of this
venv runs our attribution and writes its graph; (3) a fresh process of circuit-tracer's venv
(this same file, ``--side circuit-tracer``, which imports nothing from the SDK) builds a
TransformerLens model from a hand-written ``HookedTransformerConfig`` (TransformerLens does not
list SmolLM2), loads the weights with TransformerLens's own ``convert_llama_weights``, wraps it
with circuit-tracer's ``TransformerLensReplacementModel`` and runs ``circuit_tracer.attribute``;
(4) this process compares. Both sides run in float32 on the CPU with one thread and the same
settings (logit targets, batch, feature rows). Time is wall-clock of the attribution call
alone; memory is the process's peak resident set during it (sampled every 2 ms), above what
it held before the call, and the process's overall peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = str(ROOT / ".venvs/circuittracer/bin/python")
#: 32 tokens with SmolLM2's tokenizer, BOS included.
PROMPT = ("Fact: the capital of the state containing Dallas is Austin. Fact: the capital of the "
          "state containing Seattle is Olympia. Fact: the capital of France is")


# ------------------------------------------------------------------ memory (stdlib only)
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size of this process while the ``with`` block runs (2 ms samples)."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    def report(self) -> dict[str, float]:
        return {"rss_before_mib": self.before / 2**20, "rss_peak_mib": self.peak / 2**20,
                "rss_added_mib": (self.peak - self.before) / 2**20,
                "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------ work folder (SDK venv)
def prepare(work: Path, n_tokens: int) -> None:
    """Model weights + tokenizer, the exported transcoder set, the token ids."""
    import torch
    from safetensors.torch import save_file

    from llamascope_sdk.loading.formats.circuit_tracer import export
    from llamascope_sdk.loading.models import load_model, tokenize
    from llamascope_sdk.trace.demo import demo_transcoders

    model, tok = load_model("smollm2-135m")
    ids = tokenize(tok, PROMPT)[0][:n_tokens]
    (work / "model").mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(work / "model" / "model.safetensors"))
    c = model.config
    rope = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta")
    fields = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "max_position_embeddings",
                                           "rms_norm_eps", "hidden_act", "tie_word_embeddings")}
    (work / "model" / "llama_config.json").write_text(json.dumps({**fields, "rope_theta": rope}))
    tok.save_pretrained(str(work / "model"))
    if not (work / "tc" / "config.yaml").is_file():
        export(demo_transcoders(), work / "tc", model_name="smollm2-135m", scan="smollm2-135m-TC-320")
    (work / "ids.json").write_text(json.dumps([int(i) for i in ids]))
    del torch


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_logits": args.max_logits, "logit_probability": args.logit_probability,
            "batch_size": args.batch_size, "max_feature_nodes": args.max_feature_nodes}


# ------------------------------------------------------------------ our side (SDK venv)
def run_ours(work: Path, s: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    from llamascope_sdk.loading.models import load_model
    from llamascope_sdk.trace import attribute
    from llamascope_sdk.trace.demo import demo_transcoders

    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    tcs = demo_transcoders(model)
    ids = torch.tensor(json.loads((work / "ids.json").read_text()))
    attribute(model, tcs, ids[:4], tokenizer=tok, max_feature_nodes=4, batch_size=4)  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        g = attribute(model, tcs, ids, tokenizer=tok, max_logits=s["max_logits"],
                      logit_probability=s["logit_probability"], batch_size=s["batch_size"],
                      max_feature_nodes=s["max_feature_nodes"])
        seconds = time.perf_counter() - t0
    save_file({"adjacency": g.adjacency_matrix().float().contiguous(),
               "features": g.features_F3.long().contiguous(),
               "logit_tokens": g.logit_tokens_K.long().contiguous(),
               "n_active": torch.tensor([g.active_features_A3.shape[0]])},
              str(work / "ours.safetensors"))
    (work / "ours.json").write_text(json.dumps({"seconds": seconds, **mem.report(),
                                                "n_features": g.n_features}))


# ------------------------------------------------------------------ circuit-tracer's side
def _ct_model(work: Path) -> Any:
    import torch
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from safetensors.torch import load_file
    from transformer_lens.config.HookedTransformerConfig import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    c = json.loads((work / "model" / "llama_config.json").read_text())
    hf = LlamaForCausalLM(LlamaConfig(**c)).eval()
    hf.load_state_dict(load_file(str(work / "model" / "model.safetensors")), strict=False)
    hf.tie_weights()
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    cfg = HookedTransformerConfig(  # TransformerLens's LlamaForCausalLM mapping, written out
        d_model=c["hidden_size"], d_head=c["hidden_size"] // heads, n_heads=heads,
        d_mlp=c["intermediate_size"], n_layers=c["num_hidden_layers"],
        n_ctx=c["max_position_embeddings"], eps=c["rms_norm_eps"], d_vocab=c["vocab_size"],
        act_fn=c["hidden_act"], n_key_value_heads=kv if kv != heads else None,
        normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=c["hidden_size"] // heads, final_rms=True,
        gated_mlp=True, rotary_base=c["rope_theta"], original_architecture="LlamaForCausalLM",
        dtype=torch.float32, device="cpu", default_prepend_bos=False, model_name="smollm2-135m")
    import yaml

    tc_cfg = yaml.safe_load((work / "tc" / "config.yaml").read_text())
    tcs = load_transcoder_set(dict(enumerate(tc_cfg["transcoders"])), scan=tc_cfg["scan"],
                              feature_input_hook=tc_cfg["feature_input_hook"],
                              feature_output_hook=tc_cfg["feature_output_hook"],
                              device=torch.device("cpu"), dtype=torch.float32,
                              lazy_encoder=False, lazy_decoder=False)
    model = TransformerLensReplacementModel(cfg, tokenizer=_ct_tokenizer(work))
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    model._configure_replacement_model(tcs)
    return model


def _ct_tokenizer(work: Path) -> Any:
    """The SDK's tokenizer as transformers 4.57 reads it: the same tokenizer.json, its config
    naming PreTrainedTokenizerFast (transformers 5 writes TokenizersBackend, unknown to 4.57;
    TransformerLens reloads the tokenizer by folder, so it must be a folder)."""
    import shutil

    from transformers import AutoTokenizer

    c = json.loads((work / "model" / "tokenizer_config.json").read_text())
    special = {k: c[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if c.get(k)}
    folder = work / "ct_tokenizer"
    folder.mkdir(exist_ok=True)
    shutil.copy(work / "model" / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **special}))
    return AutoTokenizer.from_pretrained(str(folder))


def run_circuit_tracer(work: Path, s: dict[str, Any]) -> None:
    import torch
    from circuit_tracer import attribute
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    model = _ct_model(work)
    ids = torch.tensor(json.loads((work / "ids.json").read_text()))
    attribute(ids[:4], model, max_feature_nodes=4, batch_size=4)  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        g = attribute(ids, model, max_n_logits=s["max_logits"],
                      desired_logit_prob=s["logit_probability"], batch_size=s["batch_size"],
                      max_feature_nodes=s["max_feature_nodes"])
        seconds = time.perf_counter() - t0
    feats = g.active_features[g.selected_features]
    save_file({"adjacency": g.adjacency_matrix.float().contiguous(),
               "features": feats.long().contiguous(),
               "logit_tokens": torch.tensor([t.vocab_idx for t in g.logit_targets]),
               "n_active": torch.tensor([g.active_features.shape[0]])},
              str(work / "ct.safetensors"))
    (work / "ct.json").write_text(json.dumps({"seconds": seconds, **mem.report(),
                                              "n_features": int(feats.shape[0])}))


# ------------------------------------------------------------------ comparison (SDK venv)
def _node_index(t: dict[str, Any], n_layers: int, n_pos: int, keys: list[tuple[int, ...]],
                logits: list[int]) -> list[int]:
    """Row/column indices of the common nodes in one side's adjacency: the common features
    (``keys``), every error and token node, then the common logits."""
    where = {tuple(int(v) for v in f): i for i, f in enumerate(t["features"])}
    n_f = int(t["features"].shape[0])
    tok = [int(x) for x in t["logit_tokens"]]
    base = n_f + (n_layers + 1) * n_pos
    return ([where[k] for k in keys] + list(range(n_f, base))
            + [base + tok.index(x) for x in logits])


def compare(work: Path, n_layers: int) -> dict[str, Any]:
    """Edge-by-edge differences over the nodes both graphs hold."""
    from safetensors.torch import load_file

    ours, ct = load_file(str(work / "ours.safetensors")), load_file(str(work / "ct.safetensors"))
    n_pos = len(json.loads((work / "ids.json").read_text()))
    fo = {tuple(int(v) for v in f) for f in ours["features"]}
    fc = {tuple(int(v) for v in f) for f in ct["features"]}
    keys = sorted(fo & fc)
    lo, lc = [int(x) for x in ours["logit_tokens"]], [int(x) for x in ct["logit_tokens"]]
    logits = [x for x in lo if x in lc]
    io = _node_index(ours, n_layers, n_pos, keys, logits)
    ic = _node_index(ct, n_layers, n_pos, keys, logits)
    a, b = ours["adjacency"][io][:, io].double(), ct["adjacency"][ic][:, ic].double()
    diff = (a - b).abs()
    row_scale = b.abs().amax(1, keepdim=True).clamp_min(1e-30)
    return {"active_features": [int(ours["n_active"]), int(ct["n_active"])],
            "feature_nodes": [len(fo), len(fc)], "common_features": len(keys),
            "logit_tokens": [lo, lc], "compared_nodes": len(io),
            "compared_edges": int((b != 0).sum()), "max_abs_edge": float(b.abs().max()),
            "max_abs_diff": float(diff.max()),
            "max_diff_over_max_edge": float(diff.max() / b.abs().max()),
            "max_diff_over_row_max": float((diff / row_scale).max())}


def _side(side: str, work: Path, s: dict[str, Any], python: str) -> dict[str, Any]:
    """Run one side in a fresh process; its json report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--work", str(work),
           "--settings", json.dumps(s)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the {side} side failed:\n{done.stderr[-3000:]}")
    return json.loads((work / ("ours.json" if side == "ours" else "ct.json")).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs/trace-parity"))
    p.add_argument("--tokens", type=int, default=32, help="prompt length, BOS included")
    p.add_argument("--max-logits", type=int, default=10)
    p.add_argument("--logit-probability", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int, default=7500)
    p.add_argument("--ct-python", default=CT_PYTHON)
    p.add_argument("--side", choices=["ours", "circuit-tracer"], help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.side:
        s = json.loads(args.settings)
        (run_ours if args.side == "ours" else run_circuit_tracer)(work, s)
        return
    if not Path(args.ct_python).is_file():
        sys.exit(f"error: no circuit-tracer interpreter at {args.ct_python}; create its venv "
                 "(see this script's docstring) or pass --ct-python")
    prepare(work, args.tokens)
    s = settings(args)
    ours = _side("ours", work, s, sys.executable)
    ct = _side("circuit-tracer", work, s, args.ct_python)
    print_report(work, s, ours, ct, compare(work, n_layers=30))


def print_report(work: Path, s: dict[str, Any], ours: dict[str, Any], ct: dict[str, Any],
                 cmp: dict[str, Any]) -> None:
    n = len(json.loads((work / "ids.json").read_text()))
    print(f"prompt: {n} tokens; settings {json.dumps(s)}; float32, CPU, 1 thread")
    print(f"{'':16}{'seconds':>10}{'peak RSS MiB':>14}{'added MiB':>11}{'feature nodes':>15}")
    for name, r in (("llamascope-sdk", ours), ("circuit-tracer", ct)):
        print(f"{name:16}{r['seconds']:>10.1f}{r['rss_peak_mib']:>14.0f}{r['rss_added_mib']:>11.0f}"
              f"{r['n_features']:>15}")
    print(f"time ratio ours/circuit-tracer {ours['seconds'] / ct['seconds']:.2f}, added-memory "
          f"ratio {ours['rss_added_mib'] / max(ct['rss_added_mib'], 1e-9):.2f}")
    print("adjacency comparison: " + json.dumps(cmp))
    ok = cmp["max_diff_over_max_edge"] <= 1e-4
    print(f"parity (max |diff| / max |edge| <= 1e-4 over {cmp['compared_nodes']} common nodes): "
          f"{'PASS' if ok else 'FAIL'}")
    (work / "parity.json").write_text(json.dumps({"settings": s, "ours": ours,
                                                  "circuit_tracer": ct, "compare": cmp}, indent=1))


if __name__ == "__main__":
    main()
