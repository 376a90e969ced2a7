"""Generating with interventions: ``steer`` and ``ablate`` show baseline and changed text side
by side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from llamascope_sdk.cli.app import (
    DeviceOpt,
    DtypeOpt,
    FeatureOpt,
    JsonOpt,
    ModelOpt,
    PositionsOpt,
    PromptOpt,
    RevisionOpt,
    SaeOpt,
    SeedOpt,
    TokensOpt,
    app,
    check_text,
    command,
    echo_json,
    load_sae_and_model,
    table,
)

ChatOpt = Annotated[bool, typer.Option(
    "--chat", help="Treat the prompt as a user message (the tokenizer's chat template) and "
                   "compare the assistant's replies; steers only generated tokens by default.")]


def _positions(positions: str | None, chat: bool) -> Any:
    """The --positions value (checked by the intervention), by default the assistant's reply
    in a chat and every position otherwise."""
    return positions or ("generated" if chat else "all")


def _defaults(sae_name: str, features: list[int] | None, prompt: str | None,
              strength: float | None, need_strength: bool) -> tuple[list[int], str, float | None]:
    """Fill in the demo's feature, prompt and strength; require them for other SAEs."""
    from llamascope_sdk.loading import demo
    from llamascope_sdk.loading.locate import check_name

    if demo.is_demo(sae_name):
        features = features or [demo.DEMO_FEATURE.index]
        prompt = demo.DEMO_PROMPT if prompt is None else prompt
        strength = demo.DEMO_STRENGTH if strength is None else strength
    else:
        check_name(sae_name)  # an unknown name is the first thing to report (no request made)
    if not features:
        raise typer.BadParameter("give at least one --feature N", param_hint="--feature")
    if prompt is None:
        raise typer.BadParameter("give --prompt TEXT", param_hint="--prompt")
    if need_strength and strength is None:
        raise typer.BadParameter(
            "give --strength S: raw model units (the length of the added vector; compare with "
            "the site's mean norm from `llamascope info`) or, with --relative, multiples of the "
            "feature's typical activation", param_hint="--strength")
    return features, check_text(prompt), strength


def _run(sae: str, features: list[int] | None, prompt: str | None, strength: float | None,
         make: Callable[[Any, list[int], float | None], Any], *, model: str | None,
         max_new_tokens: int, seed: int | None, device: str, dtype: str | None,
         revision: str | None, chat: bool, as_json: bool, title: str,
         need_strength: bool = False) -> None:
    from llamascope_sdk.steering.generation import compare_generations, describe

    feats, text, value = _defaults(sae, features, prompt, strength, need_strength)
    s, lm, tok = load_sae_and_model(sae, model, device, dtype, revision)
    iv = make(s, feats, value)
    result = compare_generations(lm, tok, text, [iv], max_new_tokens=max_new_tokens, seed=seed,
                                 do_sample=seed is not None, chat=chat)
    caption = describe(iv)
    if as_json:
        echo_json({**result.to_dict(), "sae": s.name, "features": feats, "value": value,
                   "description": caption, "labels": {str(f): s.labels[f] for f in feats if f in s.labels}})
        return
    shown = ("" if chat else text)
    table(f"{s.name}: {caption}", ["baseline", title], [[shown + result.baseline, shown + result.steered]])


@app.command()
@command
def steer(sae: SaeOpt, feature: FeatureOpt = None,
          strength: Annotated[float | None, typer.Option(
              "--strength", "-a", help="Raw: the length of the vector added along each feature's "
              "unit decoder direction (model units; the caption gives it as a fraction of the "
              "site's mean norm). With --relative: multiples of the feature's typical activation. "
              "[default: 80 for the demo; required otherwise]", show_default=False)] = None,
          relative: Annotated[bool, typer.Option(help="Strength in multiples of the feature's typical activation (needs the SAE's feature statistics: see `llamascope inspect`).")] = False,
          positions: PositionsOpt = None, prompt: PromptOpt = None, chat: ChatOpt = False,
          model: ModelOpt = None, max_new_tokens: TokensOpt = 40, seed: SeedOpt = None,
          device: DeviceOpt = "cpu", dtype: DtypeOpt = None, revision: RevisionOpt = None,
          as_json: JsonOpt = False) -> None:
    """Generate with and without steering and show both side by side."""
    from llamascope_sdk.steering.interventions import Steer

    if strength is None and relative:
        strength = 1.0  # as strongly as the feature usually fires

    def make(s: Any, feats: list[int], value: float | None) -> Any:
        return Steer(s, feats, 1.0 if value is None else value,
                     positions=_positions(positions, chat), relative=relative)

    _run(sae, feature, prompt, strength, make, model=model, max_new_tokens=max_new_tokens,
         seed=seed, device=device, dtype=dtype, revision=revision, chat=chat, as_json=as_json,
         title="steered", need_strength=True)


@app.command()
@command
def ablate(sae: SaeOpt, feature: FeatureOpt = None,
           mode: Annotated[str, typer.Option(help="zero, or mean (needs the SAE's feature statistics).")] = "zero",
           positions: PositionsOpt = None, prompt: PromptOpt = None, chat: ChatOpt = False,
           model: ModelOpt = None, max_new_tokens: TokensOpt = 40, seed: SeedOpt = None,
           device: DeviceOpt = "cpu", dtype: DtypeOpt = None, revision: RevisionOpt = None,
           as_json: JsonOpt = False) -> None:
    """Generate with and without ablating features and show both side by side."""
    from llamascope_sdk.steering.interventions import Ablate

    def make(s: Any, feats: list[int], _value: float | None) -> Any:
        return Ablate(s, feats, mode=mode,  # type: ignore[arg-type]  # checked by Ablate
                      positions=_positions(positions, chat))

    _run(sae, feature, prompt, None, make, model=model, max_new_tokens=max_new_tokens, seed=seed,
         device=device, dtype=dtype, revision=revision, chat=chat, as_json=as_json,
         title="ablated")

