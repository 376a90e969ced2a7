"""``llamascope trace``: the attribution graph of a prompt through a transcoder set.

Everything the user typed is checked before any model loads: thresholds, the output folder,
that every transcoder is one (Llama Scope names by the registry, folders by their
hyperparams), the feature stores, and the prompt's length against the model's window (read
from its config and tokenizer, not its weights). Then the model loads (a model of another
width is refused from its config), the transcoders load, and :func:`~llamascope_sdk.trace.attribute`
runs; the graph, its viewer JSON, the HTML view and the strongest paths go into one folder
written whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llamascope_sdk.cli.app import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    app,
    check_text,
    command,
    echo_json,
    say,
)

#: Llama Scope transcoder sets: every layer's TC checkpoint of that width.
_SETS = {"lxtc-8x": 8, "lxtc-32x": 32}
_LLAMA_LAYERS = 32


def _check_fraction(name: str, value: float) -> None:
    from llamascope_sdk.base.errors import InputError

    if not 0.0 < value <= 1.0:
        raise InputError(f"{name} {value:g} is outside (0, 1]", hint=f"e.g. {name} 0.8")


def _expand(spec: str) -> list[str]:
    """``demo`` | ``LXTC-8x`` | comma-separated names and folders (a folder of SAE folders
    counts as each of them) -> one item per transcoder (``demo`` stays one item)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[str] = []
    for item in items:
        if item.lower() in _SETS:
            out += [f"L{i}TC-{_SETS[item.lower()]}x" for i in range(_LLAMA_LAYERS)]
            continue
        p = Path(item).expanduser()
        subs = sorted(d for d in p.iterdir() if d.is_dir()) if p.is_dir() else []
        own = p.is_dir() and any((p / f).is_file() for f in ("hyperparams.json", "cfg.json"))
        out += [str(d) for d in subs] if subs and not own else [item]
    return out


def _check_transcoders(items: list[str], device: str) -> tuple[list[Any], list[str]]:
    """(SAEs loaded from local folders, names to load later), each checked to be a
    transcoder before any model loads."""
    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.loading.registry import claims, resolve
    from llamascope_sdk.loading.sae import SAE

    local, named = [], []
    for item in items:
        if item.lower() == "demo":
            raise InputError("--transcoders demo stands alone (the demo set covers every layer)")
        if Path(item).expanduser().is_dir():
            sae = SAE.from_pretrained(item, device=device)
            if not sae.is_transcoder:
                raise InputError(f"{item} is not a transcoder ({sae.hyperparams.hook_point_in} -> "
                                 f"{sae.hyperparams.hook_point_out})",
                                 hint="give transcoders, e.g. --transcoders LXTC-8x or demo")
            local.append(sae)
        elif claims(item):
            ref = resolve(item)
            if ref.position != "TC":
                raise InputError(f"{item} ({ref.name}) is not a transcoder",
                                 hint="the Llama Scope transcoders are L0TC-8x ... L31TC-32x "
                                      "(or all of them: LXTC-8x, LXTC-32x)")
            named.append(ref.name)
        else:
            raise InputError(f"--transcoders: {item!r} is neither a folder nor a Llama Scope "
                             "transcoder name",
                             hint="use demo, LXTC-8x, LXTC-32x, names like L12TC-8x, or folders")
    return local, named


def _check_model(model_name: str, prompt: str, width: int | None) -> None:
    """Refuse a model of another width than the transcoders and a prompt longer than its
    window, reading only its config and tokenizer (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.loading.models import check_hidden_size, resolve_model_path, tokenize

    path = resolve_model_path(model_name)
    if width is not None:
        check_hidden_size(model_name, path, width)
    window = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    n = int(tokenize(AutoTokenizer.from_pretrained(path), prompt).shape[1])
    if isinstance(window, int) and n > window:
        raise InputError(f"--prompt is {n} tokens (BOS included), more than the model's window "
                         f"of {window} positions", hint=f"use at most {window} tokens")


def _load_stores(paths: list[Path]) -> list[Any]:
    from llamascope_sdk.store.feature_store import FeatureStore, load_store

    stores: list[FeatureStore] = []
    for p in paths:
        subs = sorted(d for d in p.iterdir() if (d / "manifest.json").is_file()) \
            if p.is_dir() and not (p / "manifest.json").is_file() else []
        stores += [FeatureStore.load(d) for d in subs] if subs else [load_store(p)]
    return stores


def _match_stores(stores: list[Any], tcs: dict[int, Any]) -> dict[int, Any]:
    """``{layer: store}``: each store goes to the transcoder it was mined with (fingerprint)."""
    from llamascope_sdk.base.errors import StoreMismatchError

    out: dict[int, Any] = {}
    for store in stores:
        for layer, sae in tcs.items():
            try:
                store.check_sae(sae)
            except StoreMismatchError:
                continue
            out[layer] = store
            break
        else:
            raise StoreMismatchError(f"the feature store {store.path or store.name} was mined "
                                     "with none of these transcoders",
                                     hint="give the stores of this transcoder set")
    return out


def _width(local: list[Any], named: list[str]) -> int | None:
    """The hidden size the transcoders need (None for the demo set, built for its model)."""
    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.loading.registry import D_MODEL

    widths = {sae.d_model for sae in local} | ({D_MODEL} if named else set())
    if len(widths) > 1:
        raise InputError(f"--transcoders mixes widths {sorted(widths)}: one model's set is needed")
    return widths.pop() if widths else None


def _default_model(transcoders: str, local: list[Any]) -> str:
    from llamascope_sdk.loading.models import base_model_of

    if transcoders.strip().lower() == "demo":
        return "smollm2-135m"
    return base_model_of(local[0]) if local else base_model_of(None)


def _transcoders(spec: str, local: list[Any], named: list[str], model: Any, device: str
                 ) -> list[Any]:
    """The transcoder set on the model's device: the demo set, or the local and named ones."""
    import importlib

    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.loading.sae import SAE

    if spec.strip().lower() == "demo":
        try:
            demo = importlib.import_module("llamascope_sdk.trace.demo")
        except ImportError:
            raise InputError("the demo transcoder set is not part of this build",
                             hint="give transcoder folders or names with --transcoders") from None
        return list(demo.demo_transcoders(model))
    return [*local, *(SAE.from_pretrained(n, device=device) for n in named)]


def _target_id(tok: Any, target: str | None) -> int | None:
    from llamascope_sdk.base.errors import InputError

    if target is None:
        return None
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(f"--target {target!r} is {len(ids)} tokens; it must be exactly one",
                         hint="give one token, often with its leading space, e.g. ' Paris'")
    return int(ids[0])


@app.command("trace")
@command
def trace_cmd(
        transcoders: Annotated[str, typer.Option(
            "--transcoders", "-t", help="demo, LXTC-8x, LXTC-32x, or comma-separated transcoder "
                                        "names (L12TC-8x) and folders.")],
        prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to attribute.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (new, empty, or an "
                                                              "earlier trace output).")],
        model: Annotated[str | None, typer.Option(
            "--model", "-m", help="Model. [default: smollm2-135m for demo, else the "
                                  "transcoders' base model]", show_default=False)] = None,
        target: Annotated[str | None, typer.Option(
            "--target", help="Attribute this one next token instead of the top logits.",
            show_default=False)] = None,
        max_nodes: Annotated[int, typer.Option(
            "--max-nodes", min=0, help="Feature nodes given rows (most influential first).")] = 7500,
        node_threshold: Annotated[float, typer.Option(
            "--node-threshold", help="Keep the nodes holding this share of influence, in (0, 1].")] = 0.8,
        edge_threshold: Annotated[float, typer.Option(
            "--edge-threshold", help="Keep the edges holding this share of influence, in (0, 1].")] = 0.98,
        max_logits: Annotated[int, typer.Option("--max-logits", min=1, help="Logit targets at most.")] = 10,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Targets per backward pass.")] = 256,
        store: Annotated[list[Path] | None, typer.Option(
            "--store", help="Feature store(s) of the transcoders, or a folder of them: labels, "
                            "examples and pages in the view. Repeatable.", show_default=False)] = None,
        device: DeviceOpt = "cpu", dtype: DtypeOpt = None, as_json: JsonOpt = False) -> None:
    """Attribution graph of the next token: which transcoder features, at which layers and
    positions, push which others and the output (circuit-tracer's definition; docs/trace.md)."""
    from llamascope_sdk.base.devices import resolve_device
    from llamascope_sdk.trace.files import check_trace_target

    check_text(prompt)
    _check_fraction("--node-threshold", node_threshold)
    _check_fraction("--edge-threshold", edge_threshold)
    target_dir = check_trace_target(out)
    resolve_device(device)
    demo = transcoders.strip().lower() == "demo"
    local, named = ([], []) if demo else _check_transcoders(_expand(transcoders), device)
    stores = _load_stores(list(store or []))
    model_name = model or _default_model(transcoders, local)
    _check_model(model_name, prompt, _width(local, named))
    _run(transcoders, local, named, stores, model_name, prompt, target_dir, target=target,
         max_nodes=max_nodes, thresholds=(node_threshold, edge_threshold), max_logits=max_logits,
         batch_size=batch_size, device=device, dtype=dtype, as_json=as_json)


def _run(spec: str, local: list[Any], named: list[str], stores: list[Any], model_name: str,
         prompt: str, out: Path, *, target: str | None, max_nodes: int,
         thresholds: tuple[float, float], max_logits: int, batch_size: int, device: str,
         dtype: str | None, as_json: bool) -> None:
    from llamascope_sdk.loading.models import load_model
    from llamascope_sdk.trace import attribute, prune
    from llamascope_sdk.trace.export import feature_notes, viewer_json
    from llamascope_sdk.trace.files import save_trace
    from llamascope_sdk.trace.html import render
    from llamascope_sdk.trace.paths import paths_text
    from llamascope_sdk.trace.replacement import by_layer

    lm, tok = load_model(model_name, device=device, dtype=dtype, hidden_size=_width(local, named))
    tcs = by_layer(lm, _transcoders(spec, local, named, lm, device))
    by_store = _match_stores(stores, tcs)
    graph = attribute(lm, tcs, prompt, tokenizer=tok, max_logits=max_logits,
                      max_feature_nodes=max_nodes, batch_size=batch_size,
                      target=_target_id(tok, target), report=lambda m: say(m, err=as_json))
    graph.model_name = model_name
    pruned = prune(graph, *thresholds)
    notes = feature_notes(graph, tcs, by_store)
    viewer = viewer_json(graph, pruned, slug=out.name, node_threshold=thresholds[0], notes=notes)
    text = paths_text(graph, pruned)
    save_trace(out, graph, viewer=viewer, page=render(viewer, graph.n_layers, notes), paths=text)
    if as_json:
        echo_json({"out": str(out), "n_features": graph.n_features,
                   "n_active": int(graph.active_features_A3.shape[0]),
                   "kept_nodes": len(viewer["nodes"]), "kept_edges": len(viewer["links"]),
                   "logits": [{"token": s, "p": float(p)} for s, p in
                              zip(graph.logit_strings, graph.logit_probs_K.tolist(), strict=True)],
                   "seconds": graph.info["seconds"], "paths": text.splitlines()[1:]})
        return
    for line in text.splitlines():
        say(line)
    say(f"kept {len(viewer['nodes'])} nodes and {len(viewer['links'])} edges of "
        f"{graph.n_nodes} nodes; wrote {out}/graph.html (open it in a browser), viewer.json, "
        "graph.safetensors, graph.json")
