"""An SAE's files: building an :class:`~llamascope_sdk.loading.sae.SAE` from release tensors, a release
folder or a foreign checkpoint's record, and writing it back (a release folder, a Hub upload).

The :class:`~llamascope_sdk.loading.sae.SAE` class methods (``from_raw``, ``from_plain``,
``from_folder``, ``save_pretrained``, ``push_to_hub``) are the public names; they call these.
Which folder to read, and in which format, is decided once by :mod:`llamascope_sdk.loading.locate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llamascope_sdk.base.devices import resolve_device
from llamascope_sdk.base.dtypes import SAFETENSORS, parse_dtype
from llamascope_sdk.base.errors import CorruptCheckpointError
from llamascope_sdk.core.feature_stats import LABELS_FILE, STATS_FILE, FeatureStats, read_labels
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.loading.cards import sae_card
from llamascope_sdk.loading.formats import Plain, collapse_threshold
from llamascope_sdk.loading.formats.release_writer import write_release
from llamascope_sdk.loading.hub import Provenance
from llamascope_sdk.loading.registry import BASE_MODEL
from llamascope_sdk.loading.release import (
    CARD,
    CHECKPOINT,
    HYPERPARAMS,
    PER_FEATURE_THRESHOLD,
    check_folder,
    default_lm_config,
    expected_shapes,
    open_checkpoint,
    read_lm_config,
)

if TYPE_CHECKING:
    from llamascope_sdk.loading.sae import SAE


def build_raw(cls: type[SAE], hyperparams: Hyperparams | dict[str, Any],
              tensors: dict[str, torch.Tensor], **kw: Any) -> SAE:
    """``SAE.from_raw``: check the training-space tensors against hyperparams, then fold."""
    hp = hyperparams if isinstance(hyperparams, Hyperparams) else Hyperparams.from_dict(hyperparams)
    for name, shape in expected_shapes(hp).items():
        if name not in tensors:
            raise CorruptCheckpointError(f"missing tensor '{name}' (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise CorruptCheckpointError(f"tensor '{name}' has shape {list(tensors[name].shape)}, "
                                         f"expected {list(shape)}")
        if not tensors[name].is_floating_point():
            raise CorruptCheckpointError(f"tensor '{name}' has dtype {tensors[name].dtype}; "
                                         "allowed are floating-point tensors")
    sae = cls(hp, **kw)
    sae.file_dtype = tensors["encoder.weight"].dtype
    sae._fold_from(tensors.__getitem__)
    return sae


def build_plain(cls: type[SAE], plain: Plain, **kw: Any) -> SAE:
    """``SAE.from_plain``: the SAE of a foreign checkpoint's :class:`Plain` record, with its
    threshold (per feature where it differs) and the base model the source names."""
    sae = build_raw(cls, plain.hyperparams, plain.tensors, **kw)
    sae.file_dtype = plain.file_dtype
    if plain.model_name:
        sae.lm_config = default_lm_config(plain.model_name, sae.d_model)
    thr = plain.threshold
    if thr is not None:
        if plain.threshold_times_decoder_norm:
            thr = thr * sae.decoder_norm.double().cpu()
        if not bool(torch.isfinite(thr).all()):  # a feature that never fires
            big = torch.finfo(sae.dtype).max
            thr = torch.where(torch.isfinite(thr), thr, torch.full_like(thr, big))
        sae.set_threshold(collapse_threshold(thr))
    return sae


def read_release(cls: type[SAE], folder: Path, *, device: torch.device | str | None = None,
                 **kw: Any) -> SAE:
    """``SAE.from_folder``: a release folder with its card, lm_config, statistics and labels."""
    check_folder(folder)
    hp = Hyperparams.from_file(folder / HYPERPARAMS)
    dev = resolve_device(device)
    # Read straight onto the target device: no CPU detour for CUDA. The file's header
    # (names, shapes, dtypes) is checked against hyperparams.json before the SAE is built,
    # so a d_sae the file does not have fails here instead of allocating F x D weights.
    with open_checkpoint(folder / CHECKPOINT, hp, device=str(dev)) as fh:
        sae = cls(hp, device=dev, **kw)
        sae.file_dtype = SAFETENSORS[fh.get_slice("encoder.weight").get_dtype()]
        sae._fold_from(fh.get_tensor)
        if PER_FEATURE_THRESHOLD in set(fh.keys()):
            sae.set_threshold(fh.get_tensor(PER_FEATURE_THRESHOLD))
    sae.source = Provenance(path=str(folder))
    if (folder / CARD).is_file():
        sae.card = (folder / CARD).read_text(encoding="utf-8")
    sae.lm_config = read_lm_config(folder)
    if (folder / STATS_FILE).is_file():
        sae.stats = FeatureStats.load(folder / STATS_FILE)
    if (folder / LABELS_FILE).is_file():
        sae.labels = read_labels(folder / LABELS_FILE, sae.d_sae)
    return sae


def save_release(sae: SAE, folder: Path, *, lm_config: dict[str, Any] | None = None,
                 card: str | None = None) -> Path:
    """``SAE.save_pretrained``: the release folder, whole, with card, statistics and labels."""

    hp = sae.hyperparams
    try:
        same_dtype = parse_dtype(hp.dtype) == sae.file_dtype
    except (ValueError, TypeError):
        same_dtype = False
    if not same_dtype:
        hp = hp.model_copy(update={"dtype": str(sae.file_dtype)})
    lm = lm_config or sae.lm_config or default_lm_config(BASE_MODEL, sae.d_model)
    tensors = sae.raw_state_dict()
    if sae.per_feature_threshold:
        tensors[PER_FEATURE_THRESHOLD] = sae.threshold.detach().to("cpu", torch.float32)
    text = card if card is not None else (sae.card if sae.card is not None else sae_card(sae, lm))
    return write_release(folder, hp, tensors, lm, card=text, stats=sae.stats, labels=sae.labels)


def push(sae: SAE, repo_id: str, *, subfolder: str | None, token: str | None,
         revision: str | None, branch: str | None, create_pr: bool, private: bool | None,
         commit_message: str) -> Any:
    """``SAE.push_to_hub``: save to a temporary folder, upload it in one commit."""
    import tempfile

    from huggingface_hub import HfApi

    if branch is not None and revision is not None and branch != revision:
        raise ValueError(f"branch={branch!r} and revision={revision!r} disagree; give one")
    target = branch if branch is not None else revision
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if target is not None and not create_pr:
        api.create_branch(repo_id, branch=target, exist_ok=True)
    extra: dict[str, Any] = {"create_pr": True} if create_pr else {}
    with tempfile.TemporaryDirectory() as tmp:
        save_release(sae, Path(tmp) / "sae")
        return api.upload_folder(repo_id=repo_id, folder_path=str(Path(tmp) / "sae"),
                                 path_in_repo=subfolder or "", revision=target,
                                 commit_message=commit_message, **extra)
