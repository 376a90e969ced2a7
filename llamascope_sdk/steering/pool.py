"""The SAE pool: SAEs loaded on first use and evicted least-recently-used within a byte budget.

All 256 Llama Scope SAEs are ~687 GB in fp32; a process that serves or explores many of them
keeps only those it used last. :class:`SaePool` (one per device; the CLI and ``llamascope
serve`` share it) gives out SAEs by any name :meth:`SAE.from_pretrained` accepts:

* loaded on first use; a request for an SAE already loaded is a hit and makes it the most
  recently used;
* before a load, least-recently-used SAEs are evicted until the new one fits the budget
  together with what the load itself needs while it runs (sizes read from hyperparams.json and
  the checkpoint's header before any weight is read), so the budget holds at the peak;
* an SAE held with :meth:`acquire` (a running batch uses it) is never evicted until
  :meth:`release`; when only held SAEs are left, the load is refused with
  :class:`~llamascope_sdk.base.errors.PoolBusyError` (try again later) instead of going over;
* concurrent first requests for one SAE load it once: the others wait for that load;
* :meth:`steer_edit` builds a steer from the features' decoder rows alone (the release
  module's reader, the fold's normalisation, Steer's checks and strength rule), so adding a
  feature of an SAE that is not loaded costs a few rows, not the SAE, and gives the vector and
  the errors a loaded SAE gives.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.devices import resolve_device
from llamascope_sdk.base.dtypes import SAFETENSORS, parse_dtype
from llamascope_sdk.base.errors import InputError, PoolBusyError, SaeBudgetError
from llamascope_sdk.core.feature_stats import LABELS_FILE, STATS_FILE, FeatureStats, read_labels
from llamascope_sdk.core.fold import unit_decoder_rows
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.core.sites import parse_hook_point
from llamascope_sdk.loading.demo import resolve_alias
from llamascope_sdk.loading.locate import locate
from llamascope_sdk.loading.registry import claims, resolve
from llamascope_sdk.loading.release import (
    CHECKPOINT,
    HYPERPARAMS,
    open_checkpoint,
    read_decoder_rows,
)
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.conditions import Condition
from llamascope_sdk.steering.generation import describe, describe_steer, feature_names
from llamascope_sdk.steering.interventions import (
    Positions,
    Steer,
    Values,
    edit_indices,
    missing_stats,
    steer_coefficients,
)
from llamascope_sdk.steering.row_edits import VectorEdit

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"8GB"`` -> 8e9, ``"512MiB"`` -> 512 * 2**20, an int as is.

    Raises:
        InputError: not a positive size with one of the units B, KB, MB, GB, TB, KiB..TiB.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise InputError(f"memory size {text!r} is not understood; give a number with a unit "
                             "such as 512MB, 8GB or 16GiB")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise InputError(f"memory size must be positive, got {text!r}")
    return n


def sae_bytes(sae: SAE) -> int:
    """Bytes the SAE's tensors hold."""
    return sum(t.nbytes for t in [*sae.parameters(), *sae.buffers()])


def estimate_bytes(hp: Hyperparams, dtype: torch.dtype) -> int:
    """Bytes an SAE with these hyperparams will hold in ``dtype`` (see :func:`sae_bytes`)."""
    f, d = hp.d_sae, hp.d_model
    size = torch.empty((), dtype=dtype).element_size()
    return (2 * f * d + f + d + 1) * size + 4 * f


def load_overhead(folder: Path, hp: Hyperparams) -> int:
    """Bytes a load of the release folder needs on top of the SAE itself, while it runs: the
    checkpoint's pages mapped while read plus one raw tensor copied out of them (measured:
    three raw [F, D] tensors at most)."""

    with open_checkpoint(folder / CHECKPOINT, hp) as fh:
        file_dtype = SAFETENSORS[fh.get_slice("decoder.weight").get_dtype()]
    return 3 * hp.d_sae * hp.d_model * torch.empty((), dtype=file_dtype).element_size()


class SaePool:
    """SAEs by name within a byte budget on one device; see the module docstring.

    Attributes:
        hits, misses: requests served from memory / that needed a load.
        evicted: keys of evicted SAEs, in eviction order.
    """

    def __init__(self, budget: int | str = "8GB", *, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None,
                 loader: Callable[[str], SAE] | None = None) -> None:
        self.budget = parse_bytes(budget)
        self.device = resolve_device(device)
        self.dtype = parse_dtype(dtype)
        self._loader = loader or (lambda name: SAE.from_pretrained(
            name, device=self.device, dtype=self.dtype))
        self._cond = threading.Condition()
        self._saes: OrderedDict[str, SAE] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._loading: dict[str, int] = {}  # key -> bytes reserved for the load
        self.hits = 0
        self.misses = 0
        self.evicted: list[str] = []

    # ------------------------------------------------------------------ names
    def key(self, name: str) -> str:
        """One key per SAE, whatever the spelling: a folder's resolved path, else the
        registry's canonical name.

        Raises:
            UnknownSaeError: neither a folder nor one of the Llama Scope names.
        """
        path = Path(resolve_alias(str(name))).expanduser()
        if path.is_dir():
            return str(path.resolve())

        if claims(str(name)):  # a Llama Scope spelling: resolve says what is wrong with it
            return resolve(str(name)).name
        return locate(str(name)).name  # a Hub repository (folder) in any format

    def _folder(self, name: str) -> tuple[Path, str] | None:
        """The release-layout folder of ``name`` (:func:`~llamascope_sdk.loading.locate.locate`
        downloads a Hub name) and the name the loaded SAE would have, or None for a folder in
        another format."""
        path = Path(resolve_alias(str(name))).expanduser()
        if path.is_dir():
            return (path, path.name) if (path / HYPERPARAMS).is_file() else None

        found = locate(str(name))
        return (found.folder, found.name) if found.format == "release" else None

    def fetch(self, name: str) -> str:
        """Resolve ``name`` and bring its files to this machine (a Hub name is downloaded)
        without loading it; its key. The step of a load that fails when the SAE is not
        available, apart from the steps that fail on what it holds."""
        k = self.key(name)
        with self._cond:
            if k in self._saes:
                return k
        locate(resolve_alias(str(name)))  # a folder's format checked; a Hub name's files here
        return k

    # ------------------------------------------------------------------ state
    @property
    def used(self) -> int:
        """Bytes held by loaded SAEs plus those reserved for loads in progress."""
        return sum(self._sizes.values()) + sum(self._loading.values())

    def loaded(self) -> list[str]:
        """Keys of the loaded SAEs, least recently used first."""
        with self._cond:
            return list(self._saes)

    # ------------------------------------------------------------------ getting
    def get(self, name: str) -> SAE:
        """The SAE for ``name``, loaded if needed (it may be evicted later: hold it with
        :meth:`acquire` while a batch uses it)."""
        return self._get(name, hold=False)

    def acquire(self, name: str) -> SAE:
        """:meth:`get` and hold: the SAE is not evicted until as many :meth:`release` calls."""
        return self._get(name, hold=True)

    def release(self, name_or_sae: str | SAE) -> None:
        with self._cond:
            k = self._key_of(name_or_sae)
            if self._held.get(k, 0) <= 0:
                raise ValueError(f"release: {k} is not held")
            self._held[k] -= 1
            self._cond.notify_all()

    def _key_of(self, name_or_sae: str | SAE) -> str:
        if isinstance(name_or_sae, SAE):
            for k, s in self._saes.items():
                if s is name_or_sae:
                    return k
            raise ValueError(f"release: {name_or_sae.name} is not in this pool")
        return self.key(name_or_sae)

    def _get(self, name: str, *, hold: bool) -> SAE:
        k = self.key(name)
        with self._cond:
            while k in self._loading:  # someone else is loading it: wait for that load
                self._cond.wait()
            if k in self._saes:
                self.hits += 1
                self._saes.move_to_end(k)
                if hold:
                    self._held[k] = self._held.get(k, 0) + 1
                return self._saes[k]
            self.misses += 1
            self._loading[k] = 0
        try:
            folder = self._folder_if_local(name)
            if folder is not None:
                hp = Hyperparams.from_file(folder / HYPERPARAMS)
                need = estimate_bytes(hp, self.dtype)
                with self._cond:
                    self._make_room(need + load_overhead(folder, hp), k)
                    self._loading[k] = need
            sae = self._loader(name)
            size = sae_bytes(sae)
            with self._cond:
                self._loading[k] = 0
                self._make_room(size, k)
                self._saes[k] = sae
                self._sizes[k] = size
                if hold:
                    self._held[k] = self._held.get(k, 0) + 1
                return sae
        finally:
            with self._cond:
                self._loading.pop(k, None)
                self._cond.notify_all()

    def _folder_if_local(self, name: str) -> Path | None:
        path = Path(resolve_alias(str(name))).expanduser()
        return path if path.is_dir() and (path / HYPERPARAMS).is_file() else None

    def _make_room(self, need: int, key: str) -> None:
        """Evict least-recently-used SAEs that nobody holds until ``need`` more bytes fit.
        Called with the lock held."""
        if need > self.budget:
            err = SaeBudgetError(f"{key} needs {need / 1e6:.0f} MB, more than the whole SAE "
                                 f"memory budget of {self.budget / 1e6:.0f} MB",
                                 hint="raise the budget (--sae-memory) or use a smaller dtype")
            err.need = need  # type: ignore[attr-defined]  # bytes: a server says so, no key
            raise err
        while self.used + need > self.budget:
            victim = next((v for v in self._saes if self._held.get(v, 0) <= 0), None)
            if victim is None:
                err = PoolBusyError(
                    f"the SAE memory budget ({self.budget / 1e6:.0f} MB) is taken by SAEs in use "
                    f"({', '.join(self._saes) or 'loads in progress'}); {key} does not fit now",
                    hint="try again when the running requests finish")
                err.need = need  # type: ignore[attr-defined]
                raise err
            del self._saes[victim]
            del self._sizes[victim]
            self._held.pop(victim, None)
            self.evicted.append(victim)

    # ------------------------------------------------------------------ steering cheaply
    def steer_edit(self, name: str, features: Any, strength: Values, *, relative: bool = False,
                   positions: Positions = "all",
                   when: Condition | None = None) -> tuple[Steer | VectorEdit, str]:
        """A steer of ``features`` of SAE ``name`` and the line that describes it
        (:func:`~llamascope_sdk.steering.generation.describe`).

        When the SAE is loaded this is a plain :class:`Steer`. Otherwise only the features'
        decoder rows are read (:func:`~llamascope_sdk.loading.release.read_decoder_rows`) and
        made unit rows as a load folds them (:func:`~llamascope_sdk.core.fold.unit_decoder_rows`),
        with Steer's checks and strength rule (:func:`~.interventions.edit_indices`,
        :func:`~.interventions.steer_coefficients`), giving a
        :class:`~llamascope_sdk.steering.row_edits.VectorEdit` with the same vector, and the
        same error for the same bad input.
        """
        k = self.key(name)
        with self._cond:
            sae = self._saes.get(k)
            if sae is not None:
                self.hits += 1
                self._saes.move_to_end(k)
        found = None if sae is not None else self._folder(name)
        if sae is not None or found is None:
            sae = sae if sae is not None else self.get(name)
            iv = Steer(sae, features, strength, positions=positions, relative=relative, when=when)
            return iv, describe(iv)
        return self._rows_steer(*found, k, features, strength, relative, positions, when)

    def _rows_steer(self, folder: Path, name: str, key: str, features: Any, strength: Values,
                    relative: bool, positions: Positions,
                    when: Condition | None) -> tuple[VectorEdit, str]:
        hp = Hyperparams.from_file(folder / HYPERPARAMS)
        idx = edit_indices("Steer", name, hp.d_sae, features, positions)

        def typical() -> torch.Tensor:
            if not (folder / STATS_FILE).is_file():
                raise missing_stats(name, folder)
            return FeatureStats.load(folder / STATS_FILE).typical

        alpha = steer_coefficients(name, idx, strength, relative, typical)
        rows = unit_decoder_rows(read_decoder_rows(folder, hp, idx.tolist()), self.dtype)
        vector = alpha.to(self.device).to(self.dtype) @ rows.to(self.device)
        labels = read_labels(folder / LABELS_FILE, hp.d_sae) if (folder / LABELS_FILE).is_file() else {}
        norm = hp.dataset_average_activation_norm
        where = f"positions={positions}" if isinstance(positions, str) else "chosen positions"
        text = describe_steer(feature_names(idx.tolist(), labels), [float(a) for a in alpha],
                              torch.as_tensor(strength).reshape(-1).tolist() if relative else None,
                              norm.out if norm is not None else None, where)
        edit = VectorEdit(vector, parse_hook_point(hp.hook_point_out), positions, group=key,
                          when=when)
        return edit, text


def held_names(pool: SaePool, names: Sequence[str]) -> list[SAE]:
    """:meth:`SaePool.acquire` each name; on a failure release those already held."""
    got: list[SAE] = []
    try:
        for n in names:
            got.append(pool.acquire(n))
    except BaseException:
        for s in got:
            pool.release(s)
        raise
    return got
