"""Check the lm-eval export against the real lm-evaluation-harness (not in CI: it needs lm-eval,
accelerate and peft, a heavy install; run it from a scratch virtualenv).

    python3 -m venv /tmp/steer-venv
    /tmp/steer-venv/bin/pip install torch==2.13.0 lm-eval accelerate peft gguf
    PYTHONPATH=. /tmp/steer-venv/bin/python bench/lm_eval_steered_check.py [--model FOLDER]

--model is the converted SmolLM2-135M-Instruct folder (default: the one `make demo` caches under
~/.cache/llamascope/models). The check: the demo's feature 4154 at strength 80 (add, every
position) exported with save_lm_eval_steer; lm-eval's ``steered`` model loads the file and its
next-token logits (fp32, text without BOS) must equal the SDK's Steer through attach() to
1e-4. It also shows what differs with a BOS (lm-eval steers it, the SDK does not) and that a
Clamp is refused by the exporter.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamascope_sdk import SAE, Steer, attach, load_model
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.steering.interventions import Clamp
from llamascope_sdk.steering.lm_eval_export import lm_eval_steer_config, save_lm_eval_steer

TEXT = "My favourite thing about the city is the old market by the river, where"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    folder = args.model or next(iter(sorted(
        (Path.home() / ".cache" / "llamascope" / "models").glob("SmolLM2-135M-Instruct*"))))
    import lm_eval
    from lm_eval.models.hf_steered import SteeredModel

    torch.set_grad_enabled(False)
    model, tok = load_model(str(folder), dtype="float32")
    sae = SAE.from_pretrained("demo")
    edit = Steer(sae, [4154], 80.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_lm_eval_steer([edit], Path(tmp) / "steer.pt")
        lm = SteeredModel(pretrained=str(folder), steer_path=str(path), device="cpu",
                          dtype="float32")
        ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
        theirs = lm._model_call(ids).float()
        with attach(model, interventions=[edit], capture=False):
            ours = model(ids).logits.float()
        clean = model(ids).logits.float()
        diff = (theirs - ours).abs().max().item()
        print(f"lm-eval {lm_eval.__version__}: steered next-token logits vs the SDK's Steer "
              f"(fp32, {ids.shape[1]} tokens, no BOS): max |diff| = {diff:.2e} "
              f"({'PASS' if diff <= 1e-4 else 'FAIL'} at 1e-4); the edit moves them by "
              f"{(ours - clean).abs().max().item():.2f}")
        bos = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], 1)
        theirs_b = lm._model_call(bos).float()
        with attach(model, interventions=[edit], capture=False):
            ours_b = model(bos).logits.float()
        print(f"with a BOS first: max |diff| = {(theirs_b - ours_b).abs().max().item():.2e} "
              "(lm-eval also steers the BOS position; the SDK leaves special tokens alone)")
    try:
        lm_eval_steer_config([Clamp(sae, [4154], 80.0)])
        print("FAIL: a Clamp was exported")
    except InputError as exc:
        print(f"clamp refused: {exc}")
    if diff > 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
