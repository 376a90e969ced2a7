"""Check the format converters against the REAL peer libraries (not a test; not collected).

Run it with the python of a scratch virtualenv that holds the peers, never the project's::

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0
    /tmp/peers/bin/pip install "sae-lens==6.54.*" "circuit-tracer==0.5.0" \
        "eai-sparsify==1.3.3" "llamascopium==2.0.0b34"
    /tmp/peers/bin/pip install -e . --no-deps && /tmp/peers/bin/pip install safetensors \
        huggingface-hub pydantic typer jinja2 transformers accelerate
    /tmp/peers/bin/python bench/peer_interop_check.py [--skip-missing]

For synthetic Llama Scope checkpoints whose decoder norms are far from 1 (tests/helpers.py),
positions R and TC, and for the bundled demo SAE, each check converts with this SDK, loads with
the peer's own loader (or saves with the peer's own writer and imports with ours), runs both on
the same activations and compares, in float32:

* values: our ``sae.encode(x)`` against the peer's feature values mapped to model units by the
  documented factor (1 where the export writes folded weights; ``||W_dec_i||`` for SAELens /
  sparsify imports; ``||d_i|| / s_out`` for Llamascopium's dataset-wise mode);
* recon: our ``sae.decode(sae.encode(x))`` against the peer's decode of its own encode;
* masks: which features fire (entries within 1e-5 of the gate are counted apart as ties).

PASS needs identical masks (up to such ties) and both relative errors <= 1e-5.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEERS = {"sae_lens": "sae-lens 6.54.x", "circuit_tracer": "circuit-tracer 0.5.0",
         "sparsify": "eai-sparsify 1.3.3", "llamascopium": "llamascopium 2.0.0b34",
         "llamascope_sdk": "this repo (pip install -e . --no-deps)"}
TOL = 1e-5


def import_peers(skip_missing: bool) -> dict[str, object]:
    found, missing = {}, []
    for mod, what in PEERS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found[mod] = importlib.import_module(mod)
        except Exception as exc:  # ImportError, or a peer failing at import time
            missing.append(f"  {mod} ({what}): {type(exc).__name__}: {exc}")
    if missing and ("llamascope_sdk" not in found or not skip_missing):
        sys.exit("peer_interop_check: these packages are not importable with " + sys.executable
                 + ":\n" + "\n".join(missing) + "\nInstall them in a scratch venv (see this "
                 "file's docstring), or pass --skip-missing to check only the others.")
    for line in missing:
        print("SKIPPED (not importable):" + line, file=sys.stderr)
    return found


# ---------------------------------------------------------------------------- comparison
import torch  # noqa: E402

ROWS: list[tuple[str, str, str, str, str, str]] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def record(name: str, ours_f: torch.Tensor, peer_f: torch.Tensor, ours_y: torch.Tensor,
           peer_y: torch.Tensor, gate: torch.Tensor | None = None, note: str = "",
           verdict: str | None = None) -> None:
    """Compare values, masks and reconstructions; ``gate`` [..., F] is the quantity each
    implementation compares with its threshold/rank cut minus the cut (ties: |gate| small)."""
    ev, ey = rel(ours_f, peer_f), rel(ours_y, peer_y)
    m_ours, m_peer = ours_f != 0, peer_f != 0
    diff = m_ours ^ m_peer
    n_diff = int(diff.sum())
    ties = 0
    if n_diff and gate is not None:
        ties = int((diff & (gate.abs() <= TOL * gate.abs().max())).sum())
    same = n_diff == 0
    masks = "yes" if same else (f"{n_diff - ties} differ" + (f" (+{ties} ties)" if ties else ""))
    ok = (n_diff - ties == 0) and ev <= TOL and ey <= TOL
    l0 = float(m_ours.sum(-1).float().mean())
    ROWS.append((name, f"{ev:.2e}", f"{ey:.2e}", masks, verdict or ("PASS" if ok else "FAIL"),
                 f"L0={l0:.1f}" + (f"; {note}" if note else "")))


def fail(name: str, exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    ROWS.append((name, "-", "-", "-", "FAIL", msg[:160]))
    traceback.print_exc(file=sys.stderr)


def run(name: str, fn: Callable[[], None]) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as exc:
        fail(name, exc)


def activations(sae, n: int = 256, seed: int = 1) -> torch.Tensor:
    """Inputs scaled like real ones: norm ~ the dataset norm of the input hook (sqrt(D) for a
    transcoder's ln2.hook_normalized, 8.06 for the synthetic ones), each a sum of 32 decoder
    directions plus 30% noise, so that a realistic share of features fire."""
    g = torch.Generator().manual_seed(seed)
    d = sae.d_model
    norms = sae.hyperparams.dataset_average_activation_norm
    target = float(norms.in_) if norms is not None else math.sqrt(d)
    idx = torch.randint(0, sae.d_sae, (n, 32), generator=g)
    code = torch.zeros(n, sae.d_sae).scatter_(-1, idx, 0.5 + torch.rand(n, 32, generator=g))
    x = code @ sae.W_dec.detach().float()
    noise = torch.randn(n, d, generator=g)
    x = x / x.norm(dim=-1, keepdim=True) + 0.3 * noise / noise.norm(dim=-1, keepdim=True)
    scale = target * (0.6 + 0.8 * torch.rand(n, 1, generator=g))
    return (x / x.norm(dim=-1, keepdim=True) * scale).float()


def ours(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        f = sae.encode(x)
        return f, sae.decode(f)


# ---------------------------------------------------------------------------- sources
def synthetic(tmp: Path, position: str, layer: int = 12, seed: int = 0, **hp) -> Path:
    from tests.helpers import make_release

    return make_release(tmp / f"syn-L{layer}{position}-{seed}", position=position, layer=layer,
                        seed=seed, **hp)


def synthetic_topk(include_norm: bool, seed: int = 3):
    from llamascope_sdk import SAE
    from tests.helpers import raw_tensors, release_hyperparams

    hp = release_hyperparams(position="R")
    hp.update(act_fn="topk", top_k=16, sparsity_include_decoder_norm=include_norm)
    return SAE.from_raw(hp, raw_tensors(64, 256, seed, torch.float32))


# ---------------------------------------------------------------------------- SAELens
def saelens_export(tmp: Path, label: str, src) -> None:
    import sae_lens

    from llamascope_sdk import SAE
    from llamascope_sdk.loading.convert import convert

    sae = src if isinstance(src, SAE) else SAE.from_pretrained(src, dtype=torch.float32)
    out = convert(src, "saelens", tmp / f"saelens-{label}")
    peer = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    peer.eval()
    x = activations(sae)
    f, y = ours(sae, x)
    with torch.no_grad():
        pf = peer.encode(x)
        py = peer.decode(pf)
        pre = x @ peer.W_enc + peer.b_enc
    hp = sae.hyperparams
    if hp.act_fn == "topk":
        scale = sae.decoder_norm.float() if not hp.sparsity_include_decoder_norm else torch.ones(sae.d_sae)
        pf_model = pf * scale  # documented: values f_ours / ||d_i|| when ranked without norms
        key = pre * (peer.W_dec.norm(dim=-1) if peer.cfg.rescale_acts_by_decoder_norm else 1)
        kth = key.topk(hp.top_k, dim=-1).values[..., -1:]
        gate = key - kth
    else:
        pf_model = pf
        gate = pre - peer.threshold
    record(f"saelens export {label}", f, pf_model, y, py, gate, type(peer).__name__)
    # What SAELens keeps of the metadata (hook names) once its loader has read cfg.json.
    meta = peer.cfg.metadata
    want = {"hook_name": hp.hook_point_in}
    if sae.is_transcoder:
        want["hook_name_out"] = hp.hook_point_out
    got = {k: getattr(meta, k, None) for k in want}
    bad = {k: v for k, v in got.items() if v != want[k]}
    written = json.loads((Path(out) / "cfg.json").read_text())
    version = written.get("sae_lens_version") or (written.get("metadata") or {}).get("sae_lens_version")
    ROWS.append((f"saelens export {label}: metadata", "-", "-", "-", "FAIL" if bad else "PASS",
                 (f"lost {bad}, want {want}; " if bad else f"{got}; ")
                 + f"cfg.json sae_lens_version={version!r} (None: read as a pre-6.0 config)"))


def saelens_import(tmp: Path, label: str, kind: str, apply_b_dec: bool = True,
                   rescale: bool = False) -> None:
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    from llamascope_sdk import SAE

    d, F, k = 64, 256, 16
    g = torch.Generator().manual_seed(7)
    meta = SAEMetadata(model_name="meta-llama/Llama-3.1-8B", hook_name="blocks.12.hook_resid_post")
    common = dict(d_in=d, d_sae=F, dtype="float32", device="cpu",
                  apply_b_dec_to_input=apply_b_dec, metadata=meta)
    if kind == "jumprelu":
        peer = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    elif kind == "topk":
        peer = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=k, rescale_acts_by_decoder_norm=rescale,
                                                       **common))
    else:
        peer = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    with torch.no_grad():
        W_dec = torch.randn(F, d, generator=g) / math.sqrt(d)
        W_dec *= (0.3 + 2.7 * torch.rand(F, 1, generator=g))  # row norms ~0.3..3
        peer.W_dec.copy_(W_dec)
        peer.W_enc.copy_(torch.randn(d, F, generator=g) / math.sqrt(d))
        peer.b_enc.copy_(0.1 * torch.randn(F, generator=g))
        peer.b_dec.copy_(0.1 * torch.randn(d, generator=g))
        if kind == "jumprelu":
            peer.threshold.copy_(0.05 + 0.6 * torch.rand(F, generator=g))  # per feature
    folder = tmp / f"saelens-own-{label}"
    peer.save_model(folder)
    sae = SAE.from_pretrained(folder, dtype=torch.float32)
    x = activations(sae)
    f, y = ours(sae, x)
    with torch.no_grad():
        pf = peer.encode(x)
        py = peer.decode(pf)
        sae_in = x - peer.b_dec * apply_b_dec
        pre = sae_in @ peer.W_enc + peer.b_enc
    norms = peer.W_dec.detach().norm(dim=-1)
    if kind == "jumprelu":
        gate = pre - peer.threshold
    elif kind == "topk":
        key = pre * (norms if rescale else 1)
        gate = key - key.topk(k, dim=-1).values[..., -1:]
    else:
        gate = pre
    factor = torch.ones(F) if (kind == "topk" and rescale) else norms
    record(f"saelens import {label}", f, pf.detach() * factor, y, py.detach(), gate.detach(),
           f"per-feature thr={sae.per_feature_threshold}" if kind == "jumprelu" else "")


# ---------------------------------------------------------------------------- circuit-tracer
def circuit_tracer_check(tmp: Path) -> None:
    import yaml
    from circuit_tracer.utils.hf_utils import load_transcoders

    from llamascope_sdk import SAE
    from llamascope_sdk.loading.convert import convert

    paths = [synthetic(tmp, "TC", layer=i, seed=10 + i) for i in range(3)]
    out = convert(",".join(str(p) for p in paths), "circuit-tracer", tmp / "ct-set")
    config = yaml.safe_load((out / "config.yaml").read_text())
    for lazy in (False, True):
        tset = load_transcoders(dict(config), device=torch.device("cpu"), dtype=torch.float32,
                                lazy_encoder=lazy, lazy_decoder=lazy)
        name = f"circuit-tracer set L0-2 TC ({'lazy' if lazy else 'eager'} load)"
        fs, pfs, ys, pys, gates = [], [], [], [], []
        for layer, p in enumerate(paths):
            sae = SAE.from_pretrained(p, dtype=torch.float32)
            x = activations(sae, seed=20 + layer)
            f, y = ours(sae, x)
            tc = tset[layer]
            with torch.no_grad():
                pf = tc.encode(x)
                py = tc.decode(pf)
                pre = tc.encode(x, apply_activation_function=False)
            fs.append(f), pfs.append(pf), ys.append(y), pys.append(py)
            gates.append(pre - tc.activation_function.threshold.detach())
        note = (f"scan={tset.scan!r}; in={tset.feature_input_hook}; out={tset.feature_output_hook}"
                f"; layers={len(tset)}")
        record(name, torch.cat(fs), torch.cat(pfs), torch.cat(ys), torch.cat(pys),
               torch.cat(gates), note)
    # hub_repo: the hf:// paths circuit-tracer will download (parsed, not fetched).
    from circuit_tracer.utils.hf_utils import parse_hf_uri

    hub = convert(",".join(str(p) for p in paths), "circuit-tracer", tmp / "ct-hub",
                  hub_repo="org/llamascope-tc")
    uris = yaml.safe_load((hub / "config.yaml").read_text())["transcoders"]
    parsed = [parse_hf_uri(u) for u in uris]
    ok = all(u.repo_id == "org/llamascope-tc" and u.file_path == f"layer_{i}.safetensors"
             for i, u in enumerate(parsed))
    ROWS.append(("circuit-tracer hub_repo hf:// paths", "-", "-", "-", "PASS" if ok else "FAIL",
                 f"{uris[0]} -> repo_id={parsed[0].repo_id!r} file={parsed[0].file_path!r}"))
    # The hook circuit-tracer will cache: blocks.L.<feature_input_hook> on a TransformerLens
    # Llama-style block must exist and be the RMSNorm output before the gain (what LXTC reads).
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=64, d_head=16, n_heads=4, d_mlp=128,
                                  d_vocab=50, n_ctx=16, act_fn="silu", gated_mlp=True,
                                  normalization_type="RMS", positional_embedding_type="rotary",
                                  rotary_dim=16, final_rms=True, seed=0, device="cpu")
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.blocks[1].ln2.w.copy_(1.0 + torch.rand(64))  # a non-trivial gain
        _, cache = model.run_with_cache(torch.randint(0, 50, (2, 8)))
    hook = f"blocks.1.{config['feature_input_hook']}"
    r = cache["blocks.1.hook_resid_mid"]
    want = r / (r.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
    got = cache[hook]
    sub = model.blocks[1]
    for part in config["feature_input_hook"].split("."):
        sub = getattr(sub, part)  # what ReplacementModel._configure_skip_connection does
    sae = SAE.from_pretrained(paths[1], dtype=torch.float32)
    f, y = ours(sae, got.reshape(-1, 64))
    with torch.no_grad():
        pf = tset[1].encode(got.reshape(-1, 64))
        py = tset[1].decode(pf)
    record("circuit-tracer TL hook ln2.hook_normalized", f, pf, y, py, None,
           f"hook==r/rms(r) rel err {rel(got, want):.1e}; getattr ok ({type(sub).__name__})")


# ---------------------------------------------------------------------------- sparsify
def sparsify_check(tmp: Path, transcode: bool) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    from llamascope_sdk import SAE

    d, F, k = 64, 256, 16
    g = torch.Generator().manual_seed(11)
    coder = SparseCoder(d, SparseCoderConfig(num_latents=F, k=k, transcode=transcode))
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(F, d, generator=g) / math.sqrt(d))
        coder.encoder.bias.copy_(0.1 * torch.randn(F, generator=g))
        coder.W_dec.copy_(torch.randn(F, d, generator=g) / math.sqrt(d)
                          * (0.3 + 2.7 * torch.rand(F, 1, generator=g)))
        coder.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    folder = tmp / "sparsify" / ("layers.3.mlp" if transcode else "layers.12")
    coder.save_to_disk(folder)
    gain = (0.5 + torch.rand(d, generator=g)) if transcode else None
    sae = SAE.from_pretrained(folder, dtype=torch.float32, rmsnorm_gain=gain)
    x = activations(sae)  # for the transcoder: ln2.hook_normalized (norm ~ sqrt(D))
    f, y = ours(sae, x)
    x_peer = x * gain if transcode else x  # sparsify's transcoder reads the MLP input g * n(r)
    with torch.no_grad():
        acts, idx, pre = coder.encode(x_peer)
        pf = torch.zeros(x.shape[0], F).scatter_(-1, idx, acts)
        py = coder.decode(acts, idx)
        gate = pre - pre.topk(k, dim=-1).values[..., -1:]
    norms = coder.W_dec.detach().norm(dim=-1)
    label = "sparsify import transcoder layers.3.mlp (+gain)" if transcode else "sparsify import SAE layers.12"
    record(label, f, pf * norms, y, py, gate,
           f"hooks {sae.hyperparams.hook_point_in} -> {sae.hyperparams.hook_point_out}")


# ---------------------------------------------------------------------------- Llamascopium
def llamascopium_export(tmp: Path, label: str, src, fold: bool = False) -> None:
    from llamascopium.models.sparse_dictionary import SparseDictionary

    from llamascope_sdk import SAE
    from llamascope_sdk.loading.convert import convert

    sae = SAE.from_pretrained(src, dtype=torch.float32)
    out = tmp / f"lsc-{label}"
    if not out.exists():
        convert(src, "llamascopium", out)
    peer = SparseDictionary.from_pretrained(str(out), fold_activation_scale=fold,
                                            dtype=torch.float32)
    peer.eval()
    hp = sae.hyperparams
    x = activations(sae)
    f, y = ours(sae, x)
    with torch.no_grad():
        if fold:  # "inference" mode: raw activations in and out
            s_in = s_out = 1.0
        else:     # dataset-wise mode: normalise the input, denormalise the output
            s_in, s_out = hp.scale_in, hp.scale_out
        pf, pre = peer.encode(x * s_in, return_hidden_pre=True)
        py = peer.decode(pf) / s_out
        n = peer.decoder_norm()
        t = peer.activation_function.log_jumprelu_threshold.exp()
        gate = pre * n - t
        # back to model units: our value = ||W_D_i|| * f_peer / s_out (dataset-wise); after
        # Llamascopium's own fold the peer's values are already in model units / ||d_i||*...
        pf_model = pf * n / s_out
    note = f"peer dtype={peer.cfg.dtype}; mode={peer.cfg.norm_activation}"
    verdict = None
    if fold:  # is the difference Llamascopium's own fold changing its own model?
        plain = SparseDictionary.from_pretrained(str(out), dtype=torch.float32)
        with torch.no_grad():
            pf0 = plain.encode(x * hp.scale_in)
        self_diff = int(((pf0 != 0) ^ (pf != 0)).sum())
        ours_vs_plain = int(((pf0 != 0) ^ (f != 0)).sum())
        note += (f"; Llamascopium folded vs its own dataset-wise load of the same folder: "
                 f"{self_diff} mask diffs (ours vs its dataset-wise: {ours_vs_plain}); its "
                 "SparseAutoEncoder.standardize_parameters_of_dataset_norm leaves the JumpReLU "
                 "threshold unscaled")
        if self_diff and not ours_vs_plain:
            verdict = "PEER BUG"
    record(f"llamascopium export {label}" + (" [fold_activation_scale=True]" if fold else ""),
           f, pf_model, y, py, gate, note, verdict)


def llamascopium_import(tmp: Path, fold: bool = False, patch_expansion: bool = False) -> None:
    from llamascopium.models.sae import SAEConfig, SparseAutoEncoder

    from llamascope_sdk import SAE

    d, F = 64, 256
    g = torch.Generator().manual_seed(5)
    hook_in, hook_out = "blocks.12.ln2.hook_normalized", "blocks.12.hook_mlp_out"
    cfg = SAEConfig(sae_type="sae", hook_point_in=hook_in, hook_point_out=hook_out, d_model=d,
                    expansion_factor=F / d, act_fn="jumprelu", norm_activation="dataset-wise",
                    sparsity_include_decoder_norm=True, dtype=torch.float32, device="cpu")
    peer = SparseAutoEncoder(cfg)
    with torch.no_grad():
        peer.W_E.copy_(torch.randn(d, F, generator=g) / math.sqrt(d))
        peer.b_E.copy_(0.1 * torch.randn(F, generator=g))
        peer.W_D.copy_(torch.randn(F, d, generator=g) / math.sqrt(d)
                       * (0.3 + 2.7 * torch.rand(F, 1, generator=g)))
        peer.b_D.copy_(0.1 * torch.randn(d, generator=g))
        peer.activation_function.log_jumprelu_threshold.copy_(
            (0.1 + 0.8 * torch.rand(F, generator=g)).log())
    peer.set_dataset_average_activation_norm({hook_in: 8.0625, hook_out: 3.96875})
    out = tmp / ("lsc-own-fold" if fold else "lsc-own")
    peer.save_pretrained(out, fold_activation_scale=fold)  # writes sae_weights.safetensors
    peer.cfg.save_hyperparameters(out)                     # writes config.json
    label = "llamascopium import own save_pretrained (TC, " + (
        "fold_activation_scale=True)" if fold else "dataset-wise)")
    if patch_expansion:  # Llamascopium writes expansion_factor as a float (4.0)
        c = json.loads((out / "config.json").read_text())
        c["expansion_factor"] = int(c["expansion_factor"])
        (out / "config.json").write_text(json.dumps(c))
        label += " [config expansion_factor 4.0 -> 4]"
    sae = SAE.from_pretrained(out, dtype=torch.float32)
    x = activations(sae)
    f, y = ours(sae, x)
    hp = sae.hyperparams
    s_out = 1.0 if fold else hp.scale_out
    with torch.no_grad():
        batch = peer.normalize_activations({hook_in: x})  # identity once folded ("inference")
        pf, pre = peer.encode(batch[hook_in], return_hidden_pre=True)
        py = peer.decode(pf) / s_out
        n = peer.decoder_norm()
        gate = pre * n - peer.activation_function.log_jumprelu_threshold.exp()
    record(label, f, pf * n / s_out, y, py, gate,
           f"per-feature thr={sae.per_feature_threshold}; mode={peer.cfg.norm_activation}")


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-missing", action="store_true",
                    help="check only the peers that import (default: exit if one does not)")
    args = ap.parse_args()
    found = import_peers(args.skip_missing)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from importlib.metadata import version

    for dist in ("torch", "sae-lens", "circuit-tracer", "eai-sparsify", "llamascopium",
                 "transformer-lens", "llamascope-sdk"):
        try:
            print(f"{dist} {version(dist)}")
        except Exception:
            print(f"{dist} (not installed)")
    with tempfile.TemporaryDirectory(prefix="peer-interop-") as t:
        tmp = Path(t)
        R, TC = synthetic(tmp, "R"), synthetic(tmp, "TC", seed=1)
        if "sae_lens" in found:
            for label, src in (("synthetic R", R), ("synthetic TC", TC), ("demo", "demo"),
                               ("topk rank-by-norm", synthetic_topk(True)),
                               ("topk rank-by-relu(h)", synthetic_topk(False))):
                run(f"saelens export {label}", lambda s=src, lab=label: saelens_export(tmp, lab, s))
            for label, kind, kw in (("JumpReLU (apply_b_dec_to_input)", "jumprelu", {}),
                                    ("JumpReLU (no b_dec on input)", "jumprelu", {"apply_b_dec": False}),
                                    ("TopK", "topk", {}),
                                    ("TopK rescale_acts_by_decoder_norm", "topk", {"rescale": True}),
                                    ("Standard (ReLU)", "standard", {})):
                run(f"saelens import {label}", lambda lab=label, k=kind, kw=kw: saelens_import(tmp, lab, k, **kw))
        if "circuit_tracer" in found:
            run("circuit-tracer", lambda: circuit_tracer_check(tmp))
        if "sparsify" in found:
            run("sparsify import SAE", lambda: sparsify_check(tmp, False))
            run("sparsify import transcoder", lambda: sparsify_check(tmp, True))
        if "llamascopium" in found:
            for label, src in (("synthetic R", R), ("synthetic TC", TC), ("demo", "demo")):
                run(f"llamascopium export {label}", lambda s=src, lab=label: llamascopium_export(tmp, lab, s))
            run("llamascopium export synthetic R [fold]",
                lambda: llamascopium_export(tmp, "synthetic R", R, fold=True))
            for fold in (False, True):
                for patch in (False, True):
                    run(f"llamascopium import own save{' fold' if fold else ''}"
                        f"{' patched' if patch else ''}",
                        lambda f=fold, p=patch: llamascopium_import(tmp, f, p))
    head = ("check", "max rel err values", "max rel err recon", "masks identical", "result", "notes")
    widths = [max(len(str(r[i])) for r in [*ROWS, head]) for i in range(5)]
    line = " | ".join(h.ljust(w) for h, w in zip(head[:5], widths, strict=True)) + " | notes"
    print(line)
    print("-" * len(line))
    for r in ROWS:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r[:5], widths, strict=True)) + " | " + r[5])
    n_fail = sum(r[4] == "FAIL" for r in ROWS)
    n_peer = sum(r[4] == "PEER BUG" for r in ROWS)
    print(json.dumps({"checks": len(ROWS), "failed": n_fail, "peer_bugs": n_peer}))
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
