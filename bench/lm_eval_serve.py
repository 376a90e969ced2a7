"""lm-eval end to end against `llamascope serve`, unsteered and steered, checked against lm-eval's
own ``hf`` and ``steered`` models on the same weights.

Needs the real lm-evaluation-harness in a virtualenv of its own (not a dependency of the SDK):

    python -m venv .venvs/lmeval            # any path (.venvs/ is ignored by git); the SDK importable in it
    .venvs/lmeval/bin/pip install "lm-eval==0.4.*"
    PYTHONPATH=. .venvs/lmeval/bin/python bench/lm_eval_serve.py [--limit N]

Run from the repository root (the tasks in bench/lm_eval_tasks/ read their data by relative
path). The script starts ``llamascope serve --model smollm2-135m --preset sea=STEER.json``
as a subprocess (the demo's feature 4154 at +80 added at every position, served as the model
``smollm2-135m:sea``) and runs lm-eval's command line, each with ``--log_samples``:

* ``local-completions`` with its stock settings (tokenised requests: ``prompt`` is a list of
  token-id lists; loglikelihood with ``logprobs: 1, echo: true, max_tokens: 1``), tokenising
  through the server (its ``/tokenizer_info`` and ``/tokenize``, which lm-eval detects), on the
  multiple-choice task ``llamascope_tiny_mc`` and the ``generate_until`` task
  ``llamascope_tiny_gen``; again with ``--batch_size 8`` (eight prompts per request) and with
  ``tokenizer_backend=huggingface,tokenizer=FOLDER`` (a local copy of the served tokenizer);
* the same against ``smollm2-135m:sea`` (steered);
* ``local-chat-completions`` with ``--apply_chat_template`` on the generate_until task;
* lm-eval's ``hf`` model (``pretrained=FOLDER,dtype=float32``), and its ``steered`` model with the
  same steer exported by :func:`~llamascope_sdk.steering.lm_eval_export.save_lm_eval_steer`.

It prints each run's scores and, per item, the largest difference of the log-likelihoods and
whether every is-greedy flag and generated text agrees; the check passes when the served
accuracy equals the reference's and every log-likelihood is within 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = "llamascope_tiny_mc,llamascope_tiny_gen"
STEER = [{"sae": "demo", "feature": 4154, "value": 80.0, "positions": "all"}]
MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, preset: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "llamascope_sdk", "serve", "--model", MODEL, "--port", str(port),
           "--preset", f"sea={preset}", "--max-batch", "16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    import urllib.request

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llamascope serve exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("llamascope serve did not start in 600 s")


def lm_eval(name: str, args: list[str], out: Path, limit: int | None) -> dict:
    """Run lm-eval's command line; the results and the logged samples per task."""
    exe = Path(sys.executable).parent / "lm_eval"
    if list((out / name).rglob("results_*.json")):  # kept from an earlier run with --out
        print(f"  {name}: reusing {out / name}", flush=True)
        return _read(out / name)
    cmd = [str(exe), *args, "--output_path", str(out / name), "--log_samples", "--seed", "1234",
           "--device", "cpu",
           "--include_path", str(ROOT / "bench" / "lm_eval_tasks")]
    if limit:
        cmd += ["--limit", str(limit)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: lm_eval failed:\n{r.stderr[-4000:]}")
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return _read(out / name)


def _read(folder: Path) -> dict:
    results = json.loads(next(folder.rglob("results_*.json")).read_text())
    samples = {}
    for f in folder.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(x) for x in f.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    return {"results": results["results"], "samples": samples}


def _scores(run: dict) -> dict[str, float]:
    out = {}
    for task, res in run["results"].items():
        for k, v in res.items():
            if k.endswith(",none") and not k.startswith(("alias", "acc_stderr", "exact_match_stderr")) \
                    and "stderr" not in k:
                out[f"{task}:{k.split(',')[0]}"] = v
    return out


def compare(a: dict, b: dict, task: str) -> tuple[float, bool]:
    """(largest |difference| of the per-item log-likelihoods or 0 for generations, whether
    every is-greedy flag / generated text is equal)."""
    sa, sb = a["samples"][task], b["samples"][task]
    assert [s["doc_id"] for s in sa] == [s["doc_id"] for s in sb], "different items"
    worst, same = 0.0, True
    for x, y in zip(sa, sb, strict=True):
        for rx, ry in zip(x["resps"], y["resps"], strict=True):
            vx, vy = rx[0], ry[0]
            if isinstance(vx, list):  # loglikelihood: [logprob, is_greedy]
                worst = max(worst, abs(float(vx[0]) - float(vy[0])))
                same &= str(vx[1]) == str(vy[1])
            else:
                same &= vx == vy
    return worst, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="items per task (default all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="keep lm-eval's outputs here (runs already there are read, not rerun)")
    args = ap.parse_args()
    import lm_eval as lm_eval_pkg

    from llamascope_sdk import SAE, Steer
    from llamascope_sdk.loading import demo
    from llamascope_sdk.loading.models import resolve_model_path
    from llamascope_sdk.steering.lm_eval_export import save_lm_eval_steer

    folder = resolve_model_path(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_serve-"))
    out = args.out or tmp / "out"
    (tmp / "steer.json").write_text(json.dumps(STEER))
    pt = save_lm_eval_steer([Steer(SAE.from_pretrained(demo.DEMO_SAE_DIR), [4154], 80.0)],
                            tmp / "steer.pt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, tmp / "steer.json", tmp / "server.log")
    print(f"lm-eval {lm_eval_pkg.__version__}; llamascope serve on {url}; model folder {folder}")
    comp = f"base_url={url}/v1/completions,max_retries=1"
    chat = f"base_url={url}/v1/chat/completions,max_retries=1"
    hf = f"pretrained={folder},dtype=float32"
    runs: dict[str, dict] = {}
    try:
        specs = {
            "served": ["--model", "local-completions", "--model_args", f"model={MODEL},{comp}",
                       "--tasks", TASKS],
            "served_batch8": ["--model", "local-completions", "--model_args",
                              f"model={MODEL},{comp}", "--batch_size", "8", "--tasks",
                              "llamascope_tiny_mc"],
            "served_hf_tokenizer": ["--model", "local-completions", "--model_args",
                                    f"model={MODEL},{comp},tokenizer_backend=huggingface,"
                                    f"tokenizer={folder}", "--tasks", "llamascope_tiny_mc"],
            "served_steered": ["--model", "local-completions", "--model_args",
                               f"model={MODEL}:sea,{comp}", "--tasks", TASKS],
            "served_chat": ["--model", "local-chat-completions", "--model_args",
                            f"model={MODEL},{chat}", "--apply_chat_template", "--tasks",
                            "llamascope_tiny_gen"],
            "served_chat_steered": ["--model", "local-chat-completions", "--model_args",
                                    f"model={MODEL}:sea,{chat}", "--apply_chat_template",
                                    "--tasks", "llamascope_tiny_gen"],
            "hf": ["--model", "hf", "--model_args", hf, "--tasks", TASKS],
            "hf_chat": ["--model", "hf", "--model_args", hf, "--apply_chat_template", "--tasks",
                        "llamascope_tiny_gen"],
            "steered": ["--model", "steered", "--model_args", f"{hf},steer_path={pt}",
                        "--tasks", TASKS],
        }
        for name, spec in specs.items():
            runs[name] = lm_eval(name, spec, out, args.limit)
    finally:
        server.terminate()
        server.wait(timeout=120)
    report(runs)


def report(runs: dict[str, dict]) -> None:
    print("\nscores (lm-eval's own numbers):")
    for name, run in runs.items():
        print(f"  {name:22s} " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(_scores(run).items())))
    print("\nper item, served vs lm-eval's own model on the same weights:")
    ok = True
    pairs = [("served", "hf", "llamascope_tiny_mc"), ("served_batch8", "hf", "llamascope_tiny_mc"),
             ("served_hf_tokenizer", "hf", "llamascope_tiny_mc"),
             ("served_steered", "steered", "llamascope_tiny_mc"),
             ("served", "hf", "llamascope_tiny_gen"),
             ("served_steered", "steered", "llamascope_tiny_gen"),
             ("served_chat", "hf_chat", "llamascope_tiny_gen")]
    for a, b, task in pairs:
        worst, same = compare(runs[a], runs[b], task)
        acc = [_scores(runs[x]).get(f"{task}:{'acc' if 'mc' in task else 'exact_match'}")
               for x in (a, b)]
        good = same and worst <= 1e-4 and acc[0] == acc[1]
        ok &= good
        print(f"  {a:20s} vs {b:8s} {task:20s} score {acc[0]:.4f} vs {acc[1]:.4f}, "
              f"max |loglik diff| {worst:.2e}, greedy flags/texts equal: {same}  "
              f"{'PASS' if good else 'FAIL'}")
    moved = compare(runs["served"], runs["served_steered"], "llamascope_tiny_mc")[0]
    print(f"  the steer moves the log-likelihoods by up to {moved:.2f} (served vs served_steered)")
    print(f"\n{'PASS' if ok else 'FAIL'}: served == lm-eval's hf (unsteered) and steered models")


if __name__ == "__main__":
    main()
