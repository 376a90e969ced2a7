"""What is known about an SAE's features: statistics (how often each fires, how large it
usually is) and human labels.

They are what relative steering strengths (``Steer(relative=True)``) and mean ablation
(``Ablate(mode="mean")``) are expressed in. An SAE carries its own in ``sae.stats``: loaded with
it from ``feature_stats.safetensors`` beside the checkpoint when the file exists, otherwise
``None`` until they are measured (feature mining, ``llamascope inspect``) or set explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.base.errors import CorruptCheckpointError

STATS_FILE = "feature_stats.safetensors"
LABELS_FILE = "feature_labels.json"
_TENSORS = ("mean", "typical", "frequency")


@dataclass
class FeatureStats:
    """Statistics over N non-special tokens of text (BOS/EOS/pad excluded), each [F] fp32:

    * ``typical[i]``: mean of the NON-ZERO activations of feature i (its usual size when it
      fires; 0 if it never fired). ``Steer(relative=True)`` uses alpha_i = strength * typical[i].
    * ``mean[i]``: mean activation over all N tokens, zeros included (for mean ablation).
    * ``frequency[i]``: fraction of the N tokens on which feature i fired.
    """

    mean: torch.Tensor  # [F]
    typical: torch.Tensor  # [F]
    frequency: torch.Tensor  # [F]
    n_tokens: int

    @property
    def d_sae(self) -> int:
        return int(self.typical.shape[-1])

    def check(self, d_sae: int, name: str = "sae") -> FeatureStats:
        """Raise unless these statistics cover ``d_sae`` features with finite values."""
        for key in _TENSORS:
            t = getattr(self, key)
            if t.ndim != 1 or t.shape[0] != d_sae:
                raise ValueError(f"{name}: feature stats '{key}' has shape {list(t.shape)}, "
                                 f"expected [{d_sae}] (one value per feature)")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: feature stats '{key}' holds NaN or inf")
        return self

    def save(self, path: str | Path) -> Path:
        """Write ``feature_stats.safetensors`` (``path`` is the file or its folder), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        tensors = {k: getattr(self, k).detach().float().cpu() for k in _TENSORS}
        atomic_save_safetensors(tensors, path, metadata={"n_tokens": str(self.n_tokens),
                                                         "format_version": "1"})
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a file written by :meth:`save` (``path`` is the file or its folder).

        Raises:
            CorruptCheckpointError: the file is not a feature-stats file or holds NaN/inf.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                names = set(fh.keys())  # safe_open supports keys(), not "in"
                missing = [k for k in _TENSORS if k not in names]
                if missing:
                    raise CorruptCheckpointError(f"{path}: missing tensors {missing}; a feature "
                                                 f"stats file holds {list(_TENSORS)}")
                t = {k: fh.get_tensor(k).float() for k in _TENSORS}
        except SafetensorError as exc:
            raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
        n = int(meta.get("n_tokens", 0))
        stats = cls(n_tokens=n, **t)
        try:
            return stats.check(stats.d_sae, str(path))
        except ValueError as exc:
            raise CorruptCheckpointError(str(exc)) from None

    @classmethod
    def from_sums(cls, total: torch.Tensor, fired: torch.Tensor, n_tokens: int) -> FeatureStats:
        """From per-feature activation sums and firing counts over ``n_tokens`` tokens."""
        if n_tokens <= 0:
            raise ValueError("feature stats need at least one non-special token")
        total, fired = total.double(), fired.double()
        return cls(mean=(total / n_tokens).float(),
                   typical=torch.where(fired > 0, total / fired.clamp(min=1), 0).float(),
                   frequency=(fired / n_tokens).float(), n_tokens=int(n_tokens))



def read_labels(path: str | Path, d_sae: int) -> dict[int, str]:
    """``{"4154": "Shakespeare style", ...}`` -> ``{4154: "Shakespeare style"}``, checked.

    Raises:
        CorruptCheckpointError: not a JSON object of feature index -> text, or an index out of
            range.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        labels = {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path}: expected a JSON object of feature index -> label "
                                     f"({exc})") from None
    bad = [i for i in labels if not 0 <= i < d_sae]
    if bad:
        raise CorruptCheckpointError(f"{path}: feature index {bad[0]} is out of range 0..{d_sae - 1}")
    return labels


def write_labels(path: str | Path, labels: dict[int, str]) -> None:
    """Write labels as ``feature_labels.json`` (sorted by index), atomically."""
    text = json.dumps({str(i): labels[i] for i in sorted(labels)}, indent=1, ensure_ascii=False)
    atomic_write_text(path, text + "\n")
