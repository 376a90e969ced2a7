"""The SAE module: the released Llama Scope inference math, folded once at load.

Spec section 3.2, for raw input x (hook_point_in) and raw output y (hook_point_out), with
file tensors W_e, b_e, W_d (columns d_i), b_d and s_in = sqrt(D)/n_in, s_out = sqrt(D)/n_out::

    h   = W_e (s_in x) + b_e                    # training-space pre-activation
    a_i = ||d_i|| h_i / s_out                   # folded pre-activation (model units)
    f_i = a_i * 1[a_i > theta]                  # JumpReLU, strict, one scalar theta
    y^  = sum_i f_i d_i/||d_i|| + b_d / s_out

Folding turns this into one affine encoder and a unit-norm decoder::

    W_enc[i] = W_e[i] ||d_i|| s_in / s_out,  b_enc[i] = b_e[i] ||d_i|| / s_out
    W_dec[i] = d_i / ||d_i||,                b_dec    = b_d / s_out

so a feature's value is the length of its contribution to y in model units. Weights are
stored feature-major (``W_dec`` is [F, D]) so that the decoder can gather only the rows of
features that fire.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llamascope_sdk.base.dtypes import parse_dtype
from llamascope_sdk.base.errors import DtypeOverflowError, FeatureIndexError, InputError
from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.core.fold import dtype_name, fold_into, unfold
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.loading import sae_files
from llamascope_sdk.loading.formats import Plain, read_foreign
from llamascope_sdk.loading.hub import Provenance
from llamascope_sdk.loading.locate import locate
from llamascope_sdk.loading.registry import SaeRef

#: Above this fraction of non-zero activations a dense decode beats gathering rows.
_DENSE_DECODE_DENSITY = 0.05


Gate = Literal["reference", "saelens"]
GATES: tuple[str, ...] = ("reference", "saelens")


class SAE(nn.Module):
    """A Llama Scope sparse autoencoder or transcoder, with folded inference weights.

    Build one with :meth:`from_pretrained` (a release name, Hub id or local folder) or
    :meth:`from_raw` (training-space tensors). Works on plain tensors with no model.

    Attributes:
        hyperparams: the parsed hyperparams.json.
        ref: the registry entry, when loaded by a Llama Scope name.
        source: provenance (repo, resolved commit, file sha256).
    """

    W_enc: nn.Parameter  # [F, D]
    b_enc: nn.Parameter  # [F]
    W_dec: nn.Parameter  # [F, D], unit rows
    b_dec: nn.Parameter  # [D]
    threshold: torch.Tensor  # [] scalar (every release) or [F] per feature (imports), folded space
    decoder_norm: torch.Tensor  # [F] fp32, ||d_i|| of the raw file, kept to unfold on save

    def __init__(self, hyperparams: Hyperparams, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, gate: Gate = "reference") -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}: allowed are {', '.join(GATES)}")
        self.hyperparams = hyperparams
        self.gate: Gate = gate
        dt = parse_dtype(dtype)
        f, d = hyperparams.d_sae, hyperparams.d_model
        kw: dict[str, Any] = {"device": device, "dtype": dt}
        self.W_enc = nn.Parameter(torch.empty(f, d, **kw), requires_grad=False)
        self.b_enc = nn.Parameter(torch.empty(f, **kw), requires_grad=False)
        self.W_dec = nn.Parameter(torch.empty(f, d, **kw), requires_grad=False)
        self.b_dec = nn.Parameter(torch.zeros(d, **kw), requires_grad=False)
        self.register_buffer("threshold", torch.tensor(hyperparams.jump_relu_threshold, **kw))
        if not bool(torch.isfinite(self.threshold)):

            raise DtypeOverflowError(
                f"jump_relu_threshold={hyperparams.jump_relu_threshold:.6g} overflows "
                f"{dtype_name(self.threshold.dtype)}; load in float32")
        self.register_buffer("decoder_norm", torch.ones(f, device=device, dtype=torch.float32))
        self.ref: SaeRef | None = None
        self.source = Provenance()
        #: The name given at load (see :class:`~llamascope_sdk.loading.locate.Located`); None: derived.
        self._name: str | None = None
        self._stats: FeatureStats | None = None
        #: Human labels of features (index -> label), from feature_labels.json beside the
        #: checkpoint when it exists; shown in CLI captions and feature pages.
        self.labels: dict[int, str] = {}
        #: lm_config.json of the release folder (the base model under ``model_name``), kept
        #: as read so that saving writes it back unchanged; None when the folder has none.
        self.lm_config: dict[str, Any] | None = None
        #: README.md (model card) of the folder it was loaded from, written back by
        #: save_pretrained; None when the folder had none (a card is then rendered).
        self.card: str | None = None
        self.file_dtype = parse_dtype(hyperparams.dtype) if hyperparams.dtype else torch.bfloat16

    # ------------------------------------------------------------------ shape facts
    @property
    def d_model(self) -> int:
        return self.hyperparams.d_model

    @property
    def d_sae(self) -> int:
        return self.hyperparams.d_sae

    @property
    def is_transcoder(self) -> bool:
        return self.hyperparams.is_transcoder

    @property
    def stats(self) -> FeatureStats | None:
        """Per-feature statistics (typical activation, frequency, mean) for relative steering
        and mean ablation: loaded from feature_stats.safetensors beside the checkpoint, else
        None until measured (``llamascope inspect``, :func:`measure_feature_stats`) or set.
        Setting checks that they cover ``d_sae`` features with finite values."""
        return self._stats

    @stats.setter
    def stats(self, value: FeatureStats | None) -> None:
        self._stats = None if value is None else value.check(self.d_sae, self.name)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def name(self) -> str:
        if self.ref is not None:
            return self.ref.name
        if self._name is not None:
            return self._name
        return self.source.subfolder or (Path(self.source.path).name if self.source.path else "sae")

    def __repr__(self) -> str:
        kind = "transcoder" if self.is_transcoder else "SAE"
        return (f"SAE({self.name!r}, {kind}, d_model={self.d_model}, d_sae={self.d_sae}, "
                f"act_fn={self.hyperparams.act_fn!r}, threshold={self._threshold_text()}, "
                f"dtype={self.dtype}, device={self.device})")

    def _threshold_text(self) -> str:
        if self.threshold.ndim == 0:
            return f"{float(self.threshold):.6g}"
        return f"per-feature [{float(self.threshold.min()):.6g}..{float(self.threshold.max()):.6g}]"

    @property
    def per_feature_threshold(self) -> bool:
        """True when the JumpReLU threshold is one value per feature ([F]) rather than the
        releases' single scalar; imports of SAELens/Llamascopium checkpoints can need this."""
        return self.threshold.ndim == 1

    @torch.no_grad()
    def set_threshold(self, threshold: torch.Tensor | float) -> None:
        """Set the JumpReLU threshold (folded space): a scalar, or one value per feature.

        A per-feature threshold whose values are all equal is stored as a scalar, and the
        scalar is mirrored into ``hyperparams.jump_relu_threshold``.
        """
        t = torch.as_tensor(threshold, dtype=torch.float64).detach().cpu()
        if t.ndim == 1 and t.numel() == self.d_sae and t.numel() and bool((t == t[0]).all()):
            t = t[0]
        if t.ndim == 1 and t.shape != (self.d_sae,):
            raise ValueError(f"a per-feature threshold needs {self.d_sae} values, got {list(t.shape)}")
        if t.ndim > 1 or not bool(torch.isfinite(t).all()):
            raise ValueError("threshold must be a finite scalar or a finite [d_sae] vector")
        if t.ndim == 0:
            self.hyperparams = self.hyperparams.model_copy(update={"jump_relu_threshold": float(t)})
        self.threshold = t.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ math
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{self.name}: input has last dimension {x.shape[-1]}, expected "
                             f"d_model={self.d_model}")
        return x.to(device=self.device, dtype=self.dtype)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Folded pre-activations a = ||d_i|| h_i / s_out, shape [..., F]."""
        return F.linear(self._input(x), self.W_enc, self.b_enc)

    def gate_threshold(self, features: torch.Tensor | None = None) -> torch.Tensor:
        """The JumpReLU threshold on folded pre-activations: the scalar theta for the
        reference gate; theta * ||d_i|| * s_in / s_out per feature for ``gate="saelens"``,
        which is SAELens's uniform ``h_i > theta * s_in`` written in the folded space."""
        t = self.threshold
        if t.ndim == 1 and features is not None:
            t = t[features]
        if self.gate == "reference":
            return t
        hp = self.hyperparams
        norms = self.decoder_norm if features is None else self.decoder_norm[features]
        return (t.float() * norms * (hp.scale_in / hp.scale_out)).to(self.dtype)

    def activation(self, a: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The checkpoint's activation function on folded pre-activations [..., F] (or
        [..., n] of the listed ``features``)."""
        act = self.hyperparams.act_fn
        if act == "jumprelu":
            return a * (a > self.gate_threshold(features))  # strict '>' as in the reference
        if act == "relu":
            return F.relu(a)
        k = self.hyperparams.top_k
        return self.encode_topk_from_pre(a, k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations f [..., F] in model units (the length of each contribution).

        Example:
            >>> f = sae.encode(resid)          # resid: [batch, seq, d_model]
            >>> (f > 0).sum(-1).float().mean() # mean L0
        """
        return self.activation(self.pre_acts(x))

    def encode_topk_from_pre(self, a: torch.Tensor, k: int) -> torch.Tensor:
        # Ranking by ReLU(h_i)*||d_i|| equals ranking by ReLU(a_i): s_out is one positive constant.
        key = F.relu(a)
        if not self.hyperparams.sparsity_include_decoder_norm:
            key = key / self.decoder_norm.to(key.dtype)
        idx = key.topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(a).scatter_(-1, idx, F.relu(a).gather(-1, idx))

    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The training-time Top-K view: keep the k features with the largest ReLU(h)*||d_i||.

        Values are in model units like :meth:`encode`; ``k`` defaults to the training K.
        """
        k = self.hyperparams.top_k if k is None else k
        if not 0 < k <= self.d_sae:
            raise ValueError(f"k must be in 1..{self.d_sae}, got {k}")
        return self.encode_topk_from_pre(self.pre_acts(x), k)

    def check_features(self, features: torch.Tensor | list[int] | int) -> torch.Tensor:
        """Validate feature indices and return them as a long tensor on the SAE's device.

        Accepted: an int, a flat list/tuple/range of ints, or a 0-/1-D integer tensor or array
        (any int dtype; numpy ints count as ints). Refused, never truncated or coerced: bools,
        floats (also 3.0), nested lists, tensors of more than one dimension.

        Raises:
            InputError: an index that is not an integer, or not a flat collection of them.
            FeatureIndexError: an index outside 0..d_sae-1.
        """
        import numpy as np


        need = ("feature indices must be integers: an int, a flat list of ints or a 1-D "
                "integer tensor")
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(features) if features.dtype != np.bool_ else features.tolist()
        if isinstance(features, torch.Tensor):
            if features.dtype == torch.bool or features.is_floating_point() or features.is_complex():
                kind = str(features.dtype).removeprefix("torch.")
                raise InputError(f"{self.name}: got a {kind} tensor; {need}")
            if features.ndim > 1:
                raise InputError(f"{self.name}: got a tensor of shape {list(features.shape)}; {need}")
            idx = features.detach().reshape(-1).to(torch.long)
        else:
            single = not isinstance(features, (list, tuple, range))
            items: list[Any] = [features] if single else list(features)  # type: ignore[arg-type]
            for i, item in enumerate(items):
                if isinstance(item, torch.Tensor) and item.ndim == 0 and not (
                        item.dtype == torch.bool or item.is_floating_point() or item.is_complex()):
                    continue
                if isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
                    continue
                where = "" if single else f" at position {i}"
                if isinstance(item, (list, tuple, range, torch.Tensor, np.ndarray)):
                    raise InputError(f"{self.name}: nested feature list ({item!r}{where}); {need}")
                raise InputError(f"{self.name}: feature index {item!r} ({type(item).__name__})"
                                 f"{where} is not an integer; {need}")
            idx = torch.tensor([int(i) for i in items], dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_sae):
            bad = [int(i) for i in idx if not 0 <= int(i) < self.d_sae]
            raise FeatureIndexError(f"{self.name}: feature index {bad[0]} is out of range; "
                                    f"allowed are 0..{self.d_sae - 1}")
        return idx.to(self.device)

    def encode_features(self, x: torch.Tensor, features: torch.Tensor | list[int]) -> torch.Tensor:
        """Activations [..., n] of the listed features only: touches n encoder rows, not F."""
        idx = self.check_features(features)
        a = F.linear(self._input(x), self.W_enc[idx], self.b_enc[idx])
        if self.hyperparams.act_fn == "topk":
            raise ValueError("encode_features needs a threshold SAE (jumprelu/relu); a Top-K "
                             "SAE's activations depend on all features")
        return self.activation(a, idx)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., D] from activations [..., F]; gathers only non-zero features."""
        if f.shape[-1] != self.d_sae:
            raise ValueError(f"{self.name}: activations have last dimension {f.shape[-1]}, "
                             f"expected d_sae={self.d_sae}")
        f = f.to(device=self.device, dtype=self.dtype)
        lead = f.shape[:-1]
        f2 = f.reshape(-1, self.d_sae)
        rows, cols = f2.nonzero(as_tuple=True)
        if rows.numel() > _DENSE_DECODE_DENSITY * f2.numel():
            out = f2 @ self.W_dec
        else:
            offsets = torch.searchsorted(rows, torch.arange(f2.shape[0], device=rows.device))
            out = F.embedding_bag(cols, self.W_dec, offsets, mode="sum",
                                  per_sample_weights=f2[rows, cols])
        return (out + self.b_dec).reshape(*lead, self.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x^ = decode(encode(x)), in the SAE's dtype."""
        return self.decode(self.encode(x))

    reconstruct = forward

    # ------------------------------------------------------------------ folding
    def _fold_from(self, get: Any) -> None:
        """Fill the inference weights from the raw release tensors (see :mod:`.fold`)."""
        fold_into(self, get)

    @classmethod
    def from_raw(cls, hyperparams: Hyperparams | dict[str, Any], tensors: dict[str, torch.Tensor],
                 *, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, gate: Gate = "reference") -> SAE:
        """Build from training-space tensors (the content of checkpoints/final.safetensors).

        Raises:
            CorruptCheckpointError: a tensor missing, of the wrong shape or not floating-point.
        """
        return sae_files.build_raw(cls, hyperparams, tensors, device=device, dtype=dtype, gate=gate)

    @classmethod
    def from_plain(cls, plain: Plain, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | str | None = None, gate: Gate = "reference") -> SAE:
        """Build from a foreign checkpoint read by :mod:`llamascope_sdk.loading.formats` (a SAELens,
        Llamascopium or sparsify folder, see :func:`~llamascope_sdk.loading.formats.read_foreign`)."""
        return sae_files.build_plain(cls, plain, device=device, dtype=dtype, gate=gate)

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, gate: Gate = "reference") -> SAE:
        """Load a local folder in the release layout (hyperparams.json + checkpoints/)."""
        return sae_files.read_release(cls, Path(folder), device=device, dtype=dtype, gate=gate)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, cache_dir: str | None = None,
                        token: str | bool | None = None, force_download: bool = False,
                        local_files_only: bool = False, gate: Gate = "reference",
                        verify: bool | None = None, fmt: str | None = None,
                        **options: Any) -> SAE:
        """Load an SAE by Llama Scope name, local folder or Hub id, in any supported format.

        Args:
            name_or_path: ``"L12M-128k"`` and every spelling :func:`resolve` accepts,
                ``"demo"`` (the bundled SmolLM2 SAE), a local folder, or a Hub ``org/repo``
                or ``org/repo:subfolder``; folders in the release layout, SAELens,
                Llamascopium or sparsify (see :func:`llamascope_sdk.loading.locate.locate`).
            revision: branch, tag or commit to pin; the resolved commit is kept in ``source``.
            device, dtype: where and in which dtype the folded weights live (default CPU, fp32).
            gate: ``"reference"`` (default): the authors' gate ``||d_i|| h_i / s_out > theta``
                (lm_saes ``from_pretrained``, spec 3.2). ``"saelens"``: SAELens's gate
                ``h_i > theta * s_in``, which ignores the decoder norms (spec 3.4); it exists
                to reproduce SAELens/Neuronpedia numbers. Feature values and reconstructions
                stay in model units either way; only which features fire differs.
            cache_dir, token, force_download, local_files_only: as in ``huggingface_hub``;
                HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN are honoured.
            verify: check every downloaded file against the hash the Hub announced (default
                True; False, or LLAMASCOPE_VERIFY=0, only for a mirror that rewrites ETags).
            fmt: the folder's format, when detection should be skipped.
            options: for foreign formats, the reader's options: ``hook_point``,
                ``rmsnorm_gain`` (sparsify), ``norm_scaling_factor`` (SAELens).

        Raises:
            UnknownSaeError, SaeNotFoundError, DownloadError, CorruptCheckpointError,
            HyperparamsError: each with a message that says what was wrong.

        Example:
            >>> sae = SAE.from_pretrained("L12M-128k", revision="main", dtype="bfloat16")
        """

        got = locate(name_or_path, fmt=fmt, revision=revision, cache_dir=cache_dir, token=token,
                     force_download=force_download, local_files_only=local_files_only,
                     verify=verify)
        if got.format == "release":
            sae = cls.from_folder(got.folder, device=device, dtype=dtype, gate=gate)
        else:
            sae = cls.from_plain(read_foreign(got.folder, got.format, **options), device=device,
                                 dtype=dtype, gate=gate)
        sae.ref, sae.source, sae._name = got.ref, got.source, got.name
        return sae

    # ------------------------------------------------------------------ saving
    def raw_state_dict(self) -> dict[str, torch.Tensor]:
        """The training-space tensors of the release file, unfolded, in the file's dtype."""
        return unfold(self)

    def save_pretrained(self, folder: str | Path, *, lm_config: dict[str, Any] | None = None,
                        card: str | None = None) -> Path:
        """Write the release layout (hyperparams.json, lm_config.json, checkpoints/), atomically.

        Saving is lossless: the checkpoint holds the unfolded training-space tensors (so
        ``SAE.from_pretrained(folder)`` gives back the same encode), hyperparams.json keeps
        every field it was read with (unknown ones too, same keys and order; ``dtype`` is only
        rewritten when the tensors' dtype differs from what it says), lm_config.json is
        written back as read, and the model card (README.md), feature statistics and labels
        are kept. Without a card one is rendered: the registry card for a Llama Scope
        release, else a short card from hyperparams/lm_config. A per-feature threshold is
        stored as the extra tensor ``threshold`` [F] of the checkpoint.

        Args:
            folder: the folder to write (created, or its files replaced).
            lm_config: overrides the lm_config.json that was loaded.
            card: overrides the README.md that was loaded.
        """
        return sae_files.save_release(self, Path(folder), lm_config=lm_config, card=card)

    def push_to_hub(self, repo_id: str, *, subfolder: str | None = None, token: str | None = None,
                    revision: str | None = None, branch: str | None = None,
                    create_pr: bool = False, private: bool | None = None,
                    commit_message: str = "Upload SAE with llamascope-sdk") -> Any:
        """Save to a temporary folder and upload it in one commit (huggingface_hub conventions).

        Args:
            repo_id: the model repository (created if missing).
            subfolder: path inside the repository (default: its root).
            token: a Hub token (default: the logged-in one).
            revision, branch: the branch to commit to (``branch`` is an alias); it is created
                from the default branch when it does not exist yet.
            create_pr: open a pull request instead of committing to the branch.
            private: visibility when the repository is created.
            commit_message: the commit's title.

        Returns:
            The ``huggingface_hub.CommitInfo`` of the upload (``.commit_url``, ``.oid``,
            ``.pr_url`` when ``create_pr``).
        """
        return sae_files.push(self, repo_id, subfolder=subfolder, token=token, revision=revision,
                              branch=branch, create_pr=create_pr, private=private,
                              commit_message=commit_message)
