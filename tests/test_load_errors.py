"""Every bad input of a load gives a typed error whose message names what was wrong and what
is allowed: through the fake Hub and from a local folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import (
    CorruptCheckpointError,
    DownloadError,
    HyperparamsError,
    LlamascopeError,
    SaeNotFoundError,
    UnknownSaeError,
)

from .fakehub import D_MODEL, D_SAE, fake_hub_fixture, release_files  # noqa: F401  (fixture)
from .helpers import make_release, raw_tensors, release_hyperparams

REPO_R8 = "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x"
FOLDER = "Llama3_1-8B-Base-L20R-8x"


def _publish(hub, hp: dict | None = None, tensors: dict | None = None, *,
             checkpoint: bytes | None = None, drop: str | None = None) -> None:
    """Commit an L20R-8x folder to the R-8x repo, with one thing broken."""
    hp = hp if hp is not None else release_hyperparams(layer=20, d_model=D_MODEL, d_sae=D_SAE)
    tensors = tensors if tensors is not None else raw_tensors(D_MODEL, D_SAE)
    files = release_files(FOLDER, hp, tensors)
    if checkpoint is not None:
        files[f"{FOLDER}/checkpoints/final.safetensors"] = checkpoint
    if drop is not None:
        del files[f"{FOLDER}/{drop}"]
    hub.commit(REPO_R8, files)


# ------------------------------------------------------------------ Hub: where things live
def test_unknown_name(fake_hub) -> None:
    with pytest.raises(UnknownSaeError, match="closest"):
        SAE.from_pretrained("L12RR-8x")
    assert fake_hub.hub.log == []


def test_repo_missing_in_every_org(fake_hub) -> None:
    with pytest.raises(SaeNotFoundError, match="repository not found") as exc:
        SAE.from_pretrained("L12R-32x")
    msg = str(exc.value)
    assert "OpenMOSS-Team/Llama3_1-8B-Base-LXR-32x" in msg and "fnlp/Llama3_1-8B-Base-LXR-32x" in msg
    assert isinstance(exc.value, FileNotFoundError)


def test_folder_missing(fake_hub) -> None:
    with pytest.raises(SaeNotFoundError, match="no hyperparams.json") as exc:
        SAE.from_pretrained("L13R-8x")
    assert "Llama3_1-8B-Base-L13R-8x" in str(exc.value) and "Llama3_1Base-L13R-8x" in str(exc.value)


def test_checkpoint_file_missing(fake_hub) -> None:
    _publish(fake_hub.hub, drop="checkpoints/final.safetensors")
    with pytest.raises(SaeNotFoundError, match="no checkpoints/final.safetensors"):
        SAE.from_pretrained("L20R-8x")


def test_revision_not_found(fake_hub) -> None:
    with pytest.raises(SaeNotFoundError, match="revision 'no-such-branch' not found") as exc:
        SAE.from_pretrained("L12R-8x", revision="no-such-branch")
    assert "commit sha" in str(exc.value)
    with pytest.raises(SaeNotFoundError, match="revision '0{40}' not found"):
        SAE.from_pretrained("L12R-8x", revision="0" * 40)


def test_connection_cut_halfway_for_good(fake_hub) -> None:
    fake_hub.hub.cut_after["final.safetensors"] = 1000
    fake_hub.hub.cut_always = True
    with pytest.raises(DownloadError, match="failed"):
        SAE.from_pretrained("L12R-8x")


# ------------------------------------------------------------------ Hub: bad content
def test_truncated_safetensors(fake_hub) -> None:
    full = save_safetensors(raw_tensors(D_MODEL, D_SAE))
    _publish(fake_hub.hub, checkpoint=full[: len(full) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        SAE.from_pretrained("L20R-8x")


def test_garbage_safetensors(fake_hub) -> None:
    _publish(fake_hub.hub, checkpoint=b"\x00" * 100)
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors"):
        SAE.from_pretrained("L20R-8x")


def test_wrong_tensor_shapes(fake_hub) -> None:
    tensors = raw_tensors(D_MODEL, D_SAE)
    tensors["decoder.weight"] = tensors["decoder.weight"].t().contiguous()  # [F, D] instead of [D, F]
    _publish(fake_hub.hub, tensors=tensors)
    with pytest.raises(CorruptCheckpointError, match=r"'decoder.weight' has shape \[256, 64\].*\[64, 256\]"):
        SAE.from_pretrained("L20R-8x")


def test_missing_tensor(fake_hub) -> None:
    tensors = raw_tensors(D_MODEL, D_SAE)
    del tensors["encoder.bias"]
    _publish(fake_hub.hub, tensors=tensors)
    with pytest.raises(CorruptCheckpointError, match=r"missing \['encoder.bias'\]"):
        SAE.from_pretrained("L20R-8x")


@pytest.mark.parametrize("field", ["d_sae", "jump_relu_threshold", "dataset_average_activation_norm",
                                   "hook_point_in", "act_fn"])
def test_hyperparams_missing_field(fake_hub, field: str) -> None:
    hp = release_hyperparams(layer=20, d_model=D_MODEL, d_sae=D_SAE)
    del hp[field]
    if field == "jump_relu_threshold":
        hp["jump_relu_threshold"] = "high"  # a missing threshold has a default; a wrong type has not
    _publish(fake_hub.hub, hp=hp)
    with pytest.raises(HyperparamsError, match=f"{field}( |')"):  # the message names the field
        SAE.from_pretrained("L20R-8x")


def test_hyperparams_wrong_type(fake_hub) -> None:
    hp = release_hyperparams(layer=20, d_model=D_MODEL, d_sae=D_SAE)
    hp["d_model"] = "4096 floats"
    _publish(fake_hub.hub, hp=hp)
    with pytest.raises(HyperparamsError, match=r"field 'd_model'.*got '4096 floats'"):
        SAE.from_pretrained("L20R-8x")


def test_hyperparams_not_json(fake_hub) -> None:
    hub = fake_hub.hub
    files = release_files(FOLDER, release_hyperparams(layer=20, d_model=D_MODEL, d_sae=D_SAE),
                          raw_tensors(D_MODEL, D_SAE))
    files[f"{FOLDER}/hyperparams.json"] = b"{not json"
    hub.commit(REPO_R8, files)
    with pytest.raises(HyperparamsError, match="not valid JSON"):
        SAE.from_pretrained("L20R-8x")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["encoder.weight", "decoder.weight", "encoder.bias", "decoder.bias"])
def test_non_finite_weights(fake_hub, bad: float, name: str) -> None:
    tensors = raw_tensors(D_MODEL, D_SAE)
    tensors[name].view(-1)[5] = bad
    _publish(fake_hub.hub, tensors=tensors)
    with pytest.raises(CorruptCheckpointError, match=f"'{name}' holds 1 non-finite"):
        SAE.from_pretrained("L20R-8x")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_non_finite_detected_for_every_target_dtype(tmp_path: Path, dtype: str) -> None:
    tensors = raw_tensors(D_MODEL, D_SAE)
    tensors["encoder.weight"][7, 1] = math.nan
    from .helpers import write_release

    folder = write_release(tmp_path / "sae", release_hyperparams(d_model=D_MODEL, d_sae=D_SAE), tensors)
    with pytest.raises(CorruptCheckpointError, match="'encoder.weight' holds 1 non-finite"):
        SAE.from_pretrained(folder, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_non_float_dtype(fake_hub, dtype: torch.dtype) -> None:
    tensors = raw_tensors(D_MODEL, D_SAE)
    tensors["encoder.weight"] = tensors["encoder.weight"].to(dtype)
    _publish(fake_hub.hub, tensors=tensors)
    with pytest.raises(CorruptCheckpointError, match="'encoder.weight' has dtype .*BF16"):
        SAE.from_pretrained("L20R-8x")


def test_every_load_error_is_a_llamascope_error(fake_hub) -> None:
    for name in ("L12RR-8x", "L12R-32x", "L13R-8x"):
        with pytest.raises(LlamascopeError):
            SAE.from_pretrained(name)


# ------------------------------------------------------------------ local folders
def test_local_folder_missing_checkpoint(tmp_path: Path) -> None:
    folder = make_release(tmp_path / "sae")
    (folder / "checkpoints" / "final.safetensors").unlink()
    with pytest.raises(SaeNotFoundError, match="missing checkpoints/final.safetensors"):
        SAE.from_pretrained(folder)


def test_local_folder_bad_hyperparams(tmp_path: Path) -> None:
    folder = make_release(tmp_path / "sae")
    hp = json.loads((folder / "hyperparams.json").read_text())
    hp["norm_activation"] = "layer-wise"
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    with pytest.raises(HyperparamsError, match="field 'norm_activation'"):
        SAE.from_pretrained(folder)


def test_local_folder_loads_and_lm_config_is_optional(tmp_path: Path) -> None:
    folder = make_release(tmp_path / "sae")
    (folder / "lm_config.json").unlink()
    sae = SAE.from_pretrained(folder)
    assert sae.d_sae == 256 and sae.source.path == str(folder)
