"""Facts about one SAE, for ``llamascope info`` and for people: where it lives, where it hooks,
and the numbers in its hyperparams.json (fetched alone: a few hundred bytes, not the weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.loading import demo
from llamascope_sdk.loading.hub import fetch_hyperparams
from llamascope_sdk.loading.registry import resolve
from llamascope_sdk.loading.release import HYPERPARAMS


def _from_hyperparams(hp: Hyperparams) -> dict[str, Any]:
    norm = hp.dataset_average_activation_norm
    return {
        "d_model": hp.d_model, "d_sae": hp.d_sae, "act_fn": hp.act_fn,
        "jump_relu_threshold": hp.jump_relu_threshold, "norm_activation": hp.norm_activation,
        "dataset_norm_in": None if norm is None else norm.in_,
        "dataset_norm_out": None if norm is None else norm.out,
        "s_in": hp.scale_in, "s_out": hp.scale_out, "hook_point_in": hp.hook_point_in,
        "hook_point_out": hp.hook_point_out, "transcoder": hp.is_transcoder,
    }


def sae_info(name: str, *, revision: str | None = None, fetch: bool = True) -> dict[str, Any]:
    """Registry facts plus, when ``fetch``, the checkpoint's hyperparams (dataset norms, threshold).

    Args:
        name: any Llama Scope spelling, ``"demo"``, or a local release folder.
        revision: Hub revision to read hyperparams.json at.
        fetch: read hyperparams.json (from the cache or the Hub); False gives registry facts only.
    """

    folder = Path(demo.resolve_alias(name)).expanduser()
    if folder.is_dir():
        facts: dict[str, Any] = {"name": name, "folder": str(folder)}
        facts.update(_from_hyperparams(Hyperparams.from_file(folder / HYPERPARAMS)))
        card = folder / "README.md"
        facts["card"] = str(card) if card.is_file() else None
        return facts

    ref = resolve(name)
    facts = ref.as_dict()
    facts.update({
        "width": ref.width, "neuronpedia_url": ref.neuronpedia_url,
        "saelens": None if ref.saelens_id is None else "/".join(ref.saelens_id),
        "card": f"https://huggingface.co/{ref.repo_id()}",
    })
    if ref.position == "A":
        facts["note"] = ("the authors do not recommend the LXA SAEs: many of their features are "
                         "inactive")
    if fetch:

        hp, source = fetch_hyperparams(name, revision=revision)
        facts.update(_from_hyperparams(hp))
        facts.update({"repo_id": source.repo_id, "subfolder": source.subfolder, "commit": source.commit})
    return facts
