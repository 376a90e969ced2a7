"""attach(): sites against independent captures, lifetime, reading, splicing, errors and dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llamascope_sdk import SAE, attach
from llamascope_sdk.base.errors import (
    FeatureIndexError,
    HookpointNotFoundError,
    IncompatibleModelError,
)
from llamascope_sdk.core.sites import rms_normalized
from llamascope_sdk.loading.models import tokenize
from llamascope_sdk.steering.interventions import Clamp, Steer

from .helpers import raw_tensors, release_hyperparams, tiny_sae

TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


def synthetic_sae(model: nn.Module, ids: torch.Tensor, layer: int, position: str, d_sae: int = 2304,
                  seed: int = 0, l0: int = 40, tied: bool = False) -> SAE:
    """A random SAE at a real site whose threshold makes about ``l0`` features fire per token
    of ``ids`` (BOS excluded). ``tied``: encoder rows along the decoder directions, so that
    steering a feature raises its own activation."""
    d = model.config.hidden_size
    raw = raw_tensors(d, d_sae, seed, dtype=torch.float32)
    if tied:
        raw["encoder.weight"] = raw["decoder.weight"].t().contiguous()
    sae = SAE.from_raw(release_hyperparams(d_model=d, d_sae=d_sae, layer=layer, position=position,
                                           threshold=0.0, norm_in=float(d) ** 0.5), raw)
    sae.source.subfolder = f"L{layer}{position}-s{seed}"
    with attach(model, [sae], capture=("inputs",)) as h, torch.no_grad():
        model(input_ids=ids)
    pre = sae.pre_acts(h.inputs[sae.name][:, 1:]).flatten()
    sae.threshold.fill_(float(pre.topk(l0 * (ids.shape[1] - 1)).values[-1]))
    return sae


def _no_hooks(model: nn.Module) -> bool:
    """No hook of ours is left (transformers installs its own output-capturing hooks on the
    first ``output_hidden_states=True`` call and keeps them, so those are ignored here)."""
    return not any(getattr(fn, "__module__", "") == "llamascope_sdk.core.hooks"
                   for m in model.modules()
                   for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def _empty_hook_dicts(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- sites on the real model
@pytest.fixture(scope="module")
def smol(smollm2):
    model, tok = smollm2
    return model, tok, tokenize(tok, TEXT)


@pytest.mark.smollm
def test_sites_match_independent_capture(smol):
    model, _, ids = smol
    L = 5
    layer = model.model.layers[L]
    saes = {p: synthetic_sae(model, ids, L, p, seed=i) for i, p in enumerate(["R", "A", "M", "TC"])}
    attn = {}
    probe = layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: attn.setdefault("out", o))
    try:
        with torch.no_grad():
            clean = model(input_ids=ids, output_hidden_states=True)
    finally:
        probe.remove()
    hs = clean.hidden_states
    with torch.no_grad():
        resid_mid = hs[L] + attn["out"]
        mlp_out = layer.mlp(layer.post_attention_layernorm(resid_mid))
    eps = model.config.rms_norm_eps
    tc_in = resid_mid / torch.sqrt(resid_mid.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(resid_mid + mlp_out, hs[L + 1], atol=1e-4, rtol=1e-4)

    with attach(model, saes, capture=True) as h, torch.no_grad():
        model(input_ids=ids)
    want = {"R": (hs[L + 1], hs[L + 1]), "A": (attn["out"], attn["out"]), "M": (mlp_out, mlp_out),
            "TC": (tc_in, mlp_out)}
    for p, (x, y) in want.items():
        torch.testing.assert_close(h.inputs[p], x, atol=1e-5, rtol=1e-5, msg=p)
        torch.testing.assert_close(h.targets[p], y, atol=1e-5, rtol=1e-5, msg=p)
        f = saes[p].encode(h.inputs[p])
        f[:, 0] = 0  # BOS excluded by default
        torch.testing.assert_close(h.features[p], f, msg=p)
        torch.testing.assert_close(h.recons[p], saes[p].decode(saes[p].encode(x)), atol=1e-4, rtol=1e-4)
        assert 5 < (h.features[p][0, 1:] > 0).sum(-1).float().mean() < 200, p
    assert _no_hooks(model)


@pytest.mark.smollm
def test_two_saes_on_one_site_and_last_layer(smol):
    model, _, ids = smol
    last = model.config.num_hidden_layers - 1
    a, b = synthetic_sae(model, ids, 3, "R", seed=1), synthetic_sae(model, ids, 3, "R", seed=2)
    top = synthetic_sae(model, ids, last, "R", seed=3)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    with attach(model, {"a": a, "b": b, "top": top}, capture=("features", "inputs")) as h, torch.no_grad():
        model(input_ids=ids)
    torch.testing.assert_close(h.inputs["a"], hs[4])
    torch.testing.assert_close(h.inputs["b"], hs[4])
    assert not torch.equal(h.features["a"], h.features["b"])
    # hidden_states[-1] is after the final norm: the last layer's output is not in it.
    torch.testing.assert_close(model.model.norm(h.inputs["top"]), hs[last + 1])


# ---------------------------------------------------------------- splicing
@pytest.mark.smollm
@pytest.mark.parametrize("position", ["R", "A", "M", "TC"])
def test_splice_with_error_term_keeps_logits(smol, position):
    model, _, ids = smol
    sae = synthetic_sae(model, ids, 7, position)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with attach(model, [sae], splice=True):
            spliced = model(input_ids=ids).logits
        with attach(model, [sae], splice=True, error_term=False):
            lossy = model(input_ids=ids).logits
    assert (spliced - clean).abs().max() <= 1e-4
    assert (lossy - clean).abs().max() > 1e-2
    assert _no_hooks(model)


@pytest.mark.smollm
def test_splice_leaves_special_positions_clean(smol):
    model, _, ids = smol
    sae = synthetic_sae(model, ids, 4, "R")

    def flowing(**kw):  # what reaches layer 5 (transformers' own hidden_states hooks run first)
        seen = {}
        probe = model.model.layers[5].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        try:
            with torch.no_grad(), attach(model, [sae], **kw) as h:
                model(input_ids=ids)
        finally:
            probe.remove()
        return seen["x"], h

    clean, _ = flowing()
    spliced, _ = flowing(splice=True, error_term=False)
    everywhere, h = flowing(splice=True, error_term=False, include_special=True)
    torch.testing.assert_close(spliced[:, 0], clean[:, 0])  # BOS untouched
    torch.testing.assert_close(spliced[:, 1:], sae(clean[:, 1:]), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(everywhere[:, 0], clean[:, 0])
    assert (h.features[sae.name][0, 0] > 0).any()


# ---------------------------------------------------------------- lifetime (tiny model)
def test_hooks_removed_on_exit_exception_and_interrupt(tiny_llama):
    from transformers import LlamaForCausalLM

    tiny_llama = LlamaForCausalLM(tiny_llama.config).eval()  # fresh: no transformers hooks yet
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    saes = [tiny_sae(position=p) for p in ("R", "A", "M", "TC")] + [tiny_sae(seed=1)]
    with attach(tiny_llama, saes, splice=False, interventions=[Steer(saes[0], [1], 2.0)]) as h:
        assert not _empty_hook_dicts(tiny_llama)
        tiny_llama(input_ids=ids)
    assert _empty_hook_dicts(tiny_llama) and len(h.features) == 5
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc), attach(tiny_llama, saes):
            tiny_llama(input_ids=ids)
            raise exc("stop")
        assert _empty_hook_dicts(tiny_llama)
    # An interrupt raised inside a hook, in the middle of the forward.
    boom = tiny_llama.model.layers[0].register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt), attach(tiny_llama, saes):
            tiny_llama(input_ids=ids)
    finally:
        boom.remove()
    assert _empty_hook_dicts(tiny_llama)
    h = attach(tiny_llama, saes)
    h.remove()
    h.remove()  # idempotent
    assert _empty_hook_dicts(tiny_llama)


class _Block(nn.Module):
    def __init__(self, d: int, as_tuple: bool):
        super().__init__()
        self.mlp = nn.Linear(d, d)
        self.as_tuple = as_tuple

    def forward(self, h):
        out = h + self.mlp(h)
        return (out, None) if self.as_tuple else out


class _Toy(nn.Module):
    """The layout attach() needs (model.layers, config.hidden_size), with tuple or tensor layers."""

    def __init__(self, as_tuple: bool, d: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.config = type("Cfg", (), {"hidden_size": d, "bos_token_id": 1, "eos_token_id": 2,
                                       "pad_token_id": 0})()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(16, d)
        self.model.layers = nn.ModuleList([_Block(d, as_tuple) for _ in range(2)])
        self.as_tuple = as_tuple

    def forward(self, input_ids):
        return self.model_forward(input_ids)

    def model_forward(self, input_ids):
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            out = layer(h)
            h = out[0] if self.as_tuple else out
        return h


def test_tuple_and_tensor_outputs_give_the_same_result():
    ids = torch.tensor([[1, 3, 4, 5]])
    sae = tiny_sae(layer=0)
    results = []
    for as_tuple in (False, True):
        toy = _Toy(as_tuple)
        with attach(toy, [sae], interventions=[Clamp(sae, [0, 3], 1.5)]) as h, torch.no_grad():
            results.append((toy(ids), h.features[sae.name]))
        with torch.no_grad():
            assert not torch.allclose(results[-1][0], toy(ids))
        assert _empty_hook_dicts(toy)
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


# ---------------------------------------------------------------- errors
def test_bad_input_errors(tiny_llama):
    with pytest.raises(IncompatibleModelError, match=r"d_model=32.*hidden_size=64"):
        attach(tiny_llama, [tiny_sae(d_model=32)])
    with pytest.raises(IncompatibleModelError, match="layer 40 does not exist"):
        attach(tiny_llama, [tiny_sae(layer=40)])
    toy = _Toy(False)
    with pytest.raises(HookpointNotFoundError, match="self_attn"):
        attach(toy, [tiny_sae(layer=0, position="A")])
    with pytest.raises(FeatureIndexError, match="256"):
        Steer(tiny_sae(), [3, 256], 1.0)
    with pytest.raises(ValueError, match="only one can replace"):
        attach(tiny_llama, [tiny_sae(), tiny_sae(seed=1)], splice=True)
    # A failed attach leaves nothing behind.
    with pytest.raises(IncompatibleModelError):
        attach(tiny_llama, [tiny_sae(), tiny_sae(layer=7)])
    assert _no_hooks(tiny_llama) and _no_hooks(toy)


@pytest.mark.parametrize(("model_dtype", "sae_dtype"), [(torch.bfloat16, torch.float32),
                                                        (torch.float32, torch.bfloat16)])
def test_dtypes_reconciled_at_the_boundary(tiny_llama, model_dtype, sae_dtype):
    model = copy.deepcopy(tiny_llama).to(model_dtype)
    sae = tiny_sae(position="TC").to(sae_dtype)
    res = tiny_sae(layer=0).to(sae_dtype)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        clean = model(input_ids=ids, output_hidden_states=True)
        with attach(model, [sae, res], splice=True, capture=("features", "inputs"),
                    interventions=[Steer(res, [2], 3.0), Clamp(sae, [1], 0.5)]) as h:
            out = model(input_ids=ids, output_hidden_states=True)
    assert all(t.dtype == model_dtype for t in out.hidden_states) and out.logits.dtype == model_dtype
    assert h.features[sae.name].dtype == sae_dtype and h.inputs[sae.name].dtype == model_dtype
    assert not torch.allclose(out.logits, clean.logits)
    with torch.no_grad(), attach(model, [sae, res], splice=True):
        same = model(input_ids=ids).logits
    torch.testing.assert_close(same, clean.logits, atol=2e-2, rtol=2e-2)


def test_tc_input_is_gain_free_normalised(tiny_llama):
    sae = tiny_sae(position="TC", layer=2)
    ln = tiny_llama.model.layers[2].post_attention_layernorm
    seen = {}
    probe = ln.register_forward_pre_hook(lambda m, a: seen.setdefault("r", a[0]))
    try:
        with attach(tiny_llama, [sae], capture=("inputs",)) as h, torch.no_grad():
            tiny_llama(input_ids=torch.tensor([[1, 4, 5, 6]]))
    finally:
        probe.remove()
    torch.testing.assert_close(h.inputs[sae.name], rms_normalized(ln, seen["r"]))


# ---------------------------------------------------------------------------- sites and compat
def test_hooks_depends_only_on_sites() -> None:
    """The one hook mechanism imports nothing of the SDK but the hook-point table."""
    import ast
    from pathlib import Path

    import llamascope_sdk.core.hooks as hooks

    tree = ast.parse(Path(hooks.__file__).read_text())
    def ours(nodes: list[ast.stmt] | list[ast.AST]) -> list[ast.ImportFrom]:
        return [n for n in nodes if isinstance(n, ast.ImportFrom)
                and (n.level > 0 or (n.module or "").startswith("llamascope_sdk"))]

    assert [n.module for n in ours(tree.body)] == ["llamascope_sdk.core.sites"]
    assert len(ours(list(ast.walk(tree)))) == 1  # no imports hidden inside functions either


@pytest.mark.parametrize(("hook_point", "module", "reads_input", "position"), [
    ("blocks.0.hook_resid_post", "model.layers.0", False, "R"),
    ("blocks.7.hook_attn_out", "model.layers.7.self_attn", False, "A"),
    ("blocks.31.hook_mlp_out", "model.layers.31.mlp", False, "M"),
    ("blocks.12.ln2.hook_normalized", "model.layers.12.post_attention_layernorm", True, None),
])
def test_hook_point_table(tiny_llama, hook_point, module, reads_input, position) -> None:
    from llamascope_sdk.core.sites import module_for, parse_hook_point, position_of

    site = parse_hook_point(hook_point)
    assert (site.hook_point, site.module_path, site.reads_input) == (hook_point, module, reads_input)
    if position is not None:
        assert position_of(site, site) == position
    if site.layer < 3:
        assert module_for(tiny_llama, site) is tiny_llama.get_submodule(module)
    with pytest.raises(HookpointNotFoundError, match="allowed are blocks.L.hook_attn_out"):
        parse_hook_point(hook_point.replace("blocks", "layers"))


def test_positions_come_from_the_table() -> None:
    from llamascope_sdk.core.sites import Site, parse_hook_point, position_of
    from llamascope_sdk.loading.registry import ALL_SAES

    tc = Site(5, "ln2_normalized"), Site(5, "mlp_out")
    assert position_of(*tc) == "TC"
    with pytest.raises(HookpointNotFoundError, match="no Llama Scope position"):
        position_of(Site(5, "ln2_normalized"), Site(6, "mlp_out"))
    for ref in ALL_SAES:
        sin, sout = parse_hook_point(ref.hook_point_in), parse_hook_point(ref.hook_point_out)
        assert position_of(sin, sout) == ref.position and sin.layer == ref.layer
        assert ref.hf_in.startswith(sin.module_path + " (") and ref.hf_out == f"{sout.module_path} (output)"


def test_compatibility_is_checked_once_per_model_and_sae(tiny_llama, monkeypatch) -> None:
    from llamascope_sdk.loading import compat

    calls = []
    real = compat.hidden_size
    monkeypatch.setattr(compat, "hidden_size", lambda m: calls.append(m) or real(m))
    sae = tiny_sae()
    first = compat.check_compatible(tiny_llama, sae)
    assert compat.check_compatible(tiny_llama, sae) == first and len(calls) == 1
    attach(tiny_llama, [sae]).remove()  # attach checks too: still once
    assert len(calls) == 1
    other = copy.deepcopy(tiny_llama)
    compat.check_compatible(other, sae)  # another model: checked again
    assert len(calls) == 2
    with pytest.raises(IncompatibleModelError):
        compat.check_compatible(tiny_llama, tiny_sae(d_model=32))


# ---------------------------------------------------------------------------- module_hooks
def test_module_hooks_remove_every_handle_also_when_a_later_one_fails() -> None:
    from llamascope_sdk.core.hooks import module_hooks

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    seen: list[str] = []
    specs = [(model[0], "post", lambda _m, _a, _o: seen.append("post")),
             (model[1], "pre", lambda _m, _a: seen.append("pre"))]
    with module_hooks(specs):
        model(torch.zeros(1, 2))
    assert seen == ["post", "pre"] and _empty_hook_dicts(model)
    bad = [*specs, (model[1], "around", print)]
    with pytest.raises(ValueError, match="hook kind 'around'; allowed are pre, pre_kwargs, post"), \
            module_hooks(bad):
        pass
    assert _empty_hook_dicts(model)  # the two registered before the bad one are gone too
    with pytest.raises(RuntimeError, match="boom"), module_hooks(specs):
        raise RuntimeError("boom")
    assert _empty_hook_dicts(model)


def test_only_core_hooks_registers_module_hooks() -> None:
    """One mechanism: no other module of the package calls a ``register_*hook`` method."""
    import ast
    from pathlib import Path

    import llamascope_sdk

    root = Path(llamascope_sdk.__file__).parent
    calls = {str(p.relative_to(root)) for p in root.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Attribute) and node.attr.startswith("register_")
             and node.attr.endswith("hook")}
    assert calls == {"core/hooks.py"}
