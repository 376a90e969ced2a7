"""The sae-probes datasets (Kantamneni et al., ICML 2025), read from the installed package.

The ``sae-probes`` wheel ships its binary classification datasets as zstd-compressed CSVs
under ``sae_probes/data``; this module finds that folder with :func:`importlib.util.find_spec`
and never imports ``sae_probes`` itself (its ``__init__`` imports TransformerLens), so
``pip install --no-deps sae-probes`` is enough. The list of datasets is the package's own:
the rows of ``probing_datasets_MASTER.csv.zst`` whose data type is "Binary Classification",
named ``<number>_<tag>`` as sae-probes names them. Labels are encoded as sae-probes encodes
them (scikit-learn's ``LabelEncoder``: the sorted distinct targets get 0, 1).

Needs ``pandas`` and ``zstandard`` (the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from llamascope_sdk.base.errors import DataUnavailableError

#: What to install when the datasets or their readers are missing.
EXTRA_HINT = ("pip install 'llamascope-sdk[bench]' (scikit-learn, zstandard) and "
              "pip install --no-deps sae-probes==0.4.2 (the datasets)")
#: sae-probes reads at most this many rows of a dataset (``MAX_AMT`` of ``get_xy_traintest``).
MAX_ROWS = 5000


@dataclass(frozen=True)
class ProbeDataset:
    """One binary dataset: its sae-probes name, prompts and 0/1 labels (first MAX_ROWS rows)."""

    name: str
    prompts: tuple[str, ...]
    labels: np.ndarray  # [N] int64
    n_total: int  # rows in the file (sae-probes' DATASET_SIZES entry)


def data_dir() -> Path:
    """The installed ``sae_probes/data`` folder.

    Raises:
        DataUnavailableError: sae-probes is not installed.
    """
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"the sae-probes datasets are not installed; {EXTRA_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (folder / "probing_datasets_MASTER.csv.zst").is_file():
        raise DataUnavailableError(f"{folder} has no probing_datasets_MASTER.csv.zst; "
                                   f"reinstall sae-probes==0.4.2")
    return folder


def _read_csv(path: Path) -> Any:
    try:
        import pandas as pd
        import zstandard  # noqa: F401  (pandas needs it for compression="zstd")
    except ImportError as exc:
        raise DataUnavailableError(f"reading the sae-probes datasets needs pandas and "
                                   f"zstandard; {EXTRA_HINT}") from exc
    return pd.read_csv(path, compression="zstd")


@cache
def _master() -> dict[str, str]:
    """``{numbered name: file path relative to data/}`` for the binary datasets, in file order."""
    df = _read_csv(data_dir() / "probing_datasets_MASTER.csv.zst")
    binary = df[df["Data type"] == "Binary Classification"]
    out: dict[str, str] = {}
    for save in binary["Dataset save name"]:
        out[str(save).split("/")[-1].split(".")[0]] = str(save) + ".zst"
    return out


def dataset_names() -> list[str]:
    """Every binary dataset of sae-probes, as it names them (``5_hist_fig_ismale`` ...)."""
    return list(_master())


def check_names(names: list[str]) -> None:
    """One line naming the unknown datasets, before any model loads."""
    known = _master()
    bad = [n for n in names if n not in known]
    if bad:
        raise DataUnavailableError(f"unknown sae-probes dataset(s) {', '.join(bad[:5])}; "
                                   f"there are {len(known)}, e.g. {', '.join(list(known)[:3])}")


def encode_labels(targets: np.ndarray) -> np.ndarray:
    """sae-probes' label encoding: index of each target among the sorted distinct targets."""
    _, inverse = np.unique(targets, return_inverse=True)
    return inverse.astype(np.int64)


@cache
def load(name: str) -> ProbeDataset:
    """Read one dataset (prompts and labels of its first :data:`MAX_ROWS` rows)."""
    check_names([name])
    df = _read_csv(data_dir() / _master()[name])
    if "prompt" not in df.columns:
        raise DataUnavailableError(f"sae-probes dataset {name} has no 'prompt' column")
    labels = encode_labels(df["target"].to_numpy())
    n = min(len(df), MAX_ROWS)
    return ProbeDataset(name, tuple(str(p) for p in df["prompt"].tolist()[:n]),
                        labels[:n], len(df))


__all__ = ["EXTRA_HINT", "MAX_ROWS", "ProbeDataset", "check_names", "data_dir",
           "dataset_names", "encode_labels", "load"]
