"""The table of the 256 Llama Scope checkpoints, and every spelling that names one.

Everything here is data derived from four facts (32 layers, 4 positions, 2 widths, the
repository naming scheme), never per-checkpoint code. ``resolve`` turns any accepted
spelling into an :class:`SaeRef`; ``list_saes`` lists and filters the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamascope_sdk.base.errors import UnknownSaeError, closest
from llamascope_sdk.core.sites import POSITIONS as SITE_POSITIONS
from llamascope_sdk.core.sites import Site, position_sites

N_LAYERS = 32
D_MODEL = 4096
POSITIONS: tuple[str, ...] = tuple(SITE_POSITIONS)  # R, A, M, TC
EXPANSIONS: tuple[int, ...] = (8, 32)
BASE_MODEL = "meta-llama/Llama-3.1-8B"

#: Hub organisations, in the order they are tried. The release moved from ``fnlp`` to
#: ``OpenMOSS-Team``; the new name is tried first and the old one is the fallback.
ORGS: tuple[str, ...] = ("OpenMOSS-Team", "fnlp")
#: Folder spellings inside each repository, in the order they are tried: current
#: revisions use the first, revisions before the "Rename folders" commit the second.
FOLDER_TEMPLATES: tuple[str, ...] = ("Llama3_1-8B-Base-L{layer}{pos}-{exp}x", "Llama3_1Base-L{layer}{pos}-{exp}x")

_POSITION_WORDS = {"R": "residual stream after block", "A": "attention output", "M": "MLP output",
                   "TC": "transcoder: normalised MLP input -> MLP output"}
_NEURONPEDIA_POS = {"R": "res", "A": "att", "M": "mlp"}
_WIDTH_WORDS = {"8x": 8, "32k": 8, "32x": 32, "128k": 32, "131k": 32}


@dataclass(frozen=True)
class SaeRef:
    """One released checkpoint: where it lives and where it hooks.

    ``hook_point_in``/``hook_point_out`` are the TransformerLens names written in the
    checkpoint's hyperparams.json; ``hf_in``/``hf_out`` say the same in transformers terms.
    """

    layer: int
    position: str
    expansion: int

    @property
    def name(self) -> str:
        return f"L{self.layer}{self.position}-{self.expansion}x"

    @property
    def d_sae(self) -> int:
        return D_MODEL * self.expansion

    @property
    def width(self) -> str:
        """The width as the paper says it ("32K" / "128K")."""
        return "32K" if self.expansion == 8 else "128K"

    @property
    def is_transcoder(self) -> bool:
        return self.position == "TC"

    def repo_id(self, org: str = ORGS[0]) -> str:
        return f"{org}/Llama3_1-8B-Base-LX{self.position}-{self.expansion}x"

    def subfolder(self, template: str = FOLDER_TEMPLATES[0]) -> str:
        return template.format(layer=self.layer, pos=self.position, exp=self.expansion)

    @property
    def sites(self) -> tuple[Site, Site]:
        """(input site, output site), from the hook-point table in :mod:`llamascope_sdk.core.sites`."""
        return position_sites(self.layer, self.position)

    @property
    def hook_point_in(self) -> str:
        return self.sites[0].hook_point

    @property
    def hook_point_out(self) -> str:
        return self.sites[1].hook_point

    @property
    def hf_in(self) -> str:
        return self.sites[0].describe()

    @property
    def hf_out(self) -> str:
        return self.sites[1].describe()

    @property
    def neuronpedia_id(self) -> str | None:
        """Neuronpedia source id; Neuronpedia hosts no Llama Scope transcoders."""
        if self.position == "TC":
            return None
        width = "32k" if self.expansion == 8 else "131k"
        return f"llama3.1-8b/{self.layer}-llamascope-{_NEURONPEDIA_POS[self.position]}-{width}"

    @property
    def neuronpedia_url(self) -> str | None:
        np_id = self.neuronpedia_id
        return None if np_id is None else f"https://www.neuronpedia.org/{np_id}"

    @property
    def saelens_id(self) -> tuple[str, str] | None:
        """(release, sae_id) in SAELens, which registers R/A/M but no transcoders."""
        if self.position == "TC":
            return None
        p = self.position.lower()
        return f"llama_scope_lx{p}_{self.expansion}x", f"l{self.layer}{p}_{self.expansion}x"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "layer": self.layer, "position": self.position,
            "expansion": self.expansion, "d_sae": self.d_sae, "repo_id": self.repo_id(),
            "subfolder": self.subfolder(), "hook_point_in": self.hook_point_in,
            "hook_point_out": self.hook_point_out, "hf_in": self.hf_in, "hf_out": self.hf_out,
            "neuronpedia_id": self.neuronpedia_id,
        }


ALL_SAES: tuple[SaeRef, ...] = tuple(
    SaeRef(layer, pos, exp) for exp in EXPANSIONS for pos in POSITIONS for layer in range(N_LAYERS)
)


def list_saes(
    layer: int | None = None, position: str | None = None, width: str | int | None = None
) -> list[SaeRef]:
    """All released checkpoints, optionally filtered.

    Args:
        layer: keep one layer (0-31).
        position: keep one position: "R", "A", "M" or "TC" (case-insensitive).
        width: keep one width: 8 / "8x" / "32k" or 32 / "32x" / "128k" / "131k".

    Returns:
        The matching :class:`SaeRef` entries, ordered by width, position, layer.

    Raises:
        UnknownSaeError: a filter value that no checkpoint can have.
    """
    exp = None if width is None else _parse_width(str(width))
    pos = None if position is None else _parse_position(position)
    if layer is not None:
        _check_layer(layer)
    return [r for r in ALL_SAES
            if (layer is None or r.layer == layer) and (pos is None or r.position == pos)
            and (exp is None or r.expansion == exp)]


def _parse_width(text: str) -> int:
    t = text.strip().lower()
    if t.isdigit() and int(t) in EXPANSIONS:
        return int(t)
    if t in _WIDTH_WORDS:
        return _WIDTH_WORDS[t]
    raise UnknownSaeError(f"unknown width {text!r}: allowed are 8x (also '32k') and 32x (also '128k', '131k')")


def _parse_position(text: str) -> str:
    t = text.strip().upper()
    if t not in POSITIONS:
        raise UnknownSaeError(
            f"unknown position {text!r}: allowed are R (residual), A (attention out), "
            "M (MLP out) and TC (transcoder)")
    return t


def _check_layer(layer: int) -> None:
    if not 0 <= layer < N_LAYERS:
        raise UnknownSaeError(
            f"layer {layer} is out of range: Llama Scope covers layers 0-{N_LAYERS - 1} of Llama-3.1-8B")


_SHORT = re.compile(r"^l(\d+)(tc|r|a|m|[a-z])[-_](\w+?)(?:-(?:topk|jumprelu))?$", re.I)
_NEURONPEDIA = re.compile(r"^llama3\.1-8b/(\d+)-llamascope-(\w+)-(\w+)$", re.I)
_FOLDER = re.compile(r"^llama3_1(?:-8b-base|base)-l(\d+)(\w+?)-(\w+)$", re.I)
_REPO = re.compile(r"^(?:(fnlp|openmoss-team)/)?llama3_1-8b-base-lx(tc|r|a|m)-(8|32)x$", re.I)
_NP_POS = {"res": "R", "att": "A", "mlp": "M"}


def _ref(layer: str, pos: str, width: str) -> SaeRef:
    p = _parse_position(pos)
    e = _parse_width(width)
    _check_layer(int(layer))
    return SaeRef(int(layer), p, e)


def _match_repo(repo: str) -> tuple[int, str] | None:
    m = _REPO.match(repo)
    return None if m is None else (int(m.group(3)), m.group(2).upper())


def resolve(name: str) -> SaeRef:
    """Turn any accepted spelling of a checkpoint into its :class:`SaeRef`.

    Accepted (case-insensitive): ``L12M-32x``, ``L12M-8x``, ``L12M-128k``, ``L12M-131k``,
    ``L12M-32k``; SAELens ids ``l12m_32x``; Neuronpedia ids
    ``llama3.1-8b/12-llamascope-mlp-131k`` (``-res-``, ``-att-``); the Hugging Face forms
    ``fnlp/Llama3_1-8B-Base-L12M-32x``, ``OpenMOSS-Team/Llama3_1-8B-Base-L12M-32x`` and
    ``repo_id:subfolder`` (either folder spelling).

    Raises:
        UnknownSaeError: the name matches no checkpoint; the message lists the closest names.
    """
    text = name.strip()
    if ":" in text:  # repo_id:subfolder
        repo, _, folder = text.partition(":")
        folder = folder.strip("/").split("/")[-1]
        got = _match_repo(repo.strip())
        m = _FOLDER.match(folder)
        if got is None or m is None:
            raise UnknownSaeError(
                f"{name!r} is not a Llama Scope 'repo_id:subfolder': expected e.g. "
                "'OpenMOSS-Team/Llama3_1-8B-Base-LXM-32x:Llama3_1-8B-Base-L12M-32x'")
        ref = _ref(m.group(1), m.group(2), m.group(3))
        if (ref.expansion, ref.position) != got:
            raise UnknownSaeError(f"{name!r}: folder {folder!r} does not belong in repository {repo!r}")
        return ref
    if "/" in text and not text.lower().startswith("llama3.1-8b/"):
        org, _, rest = text.partition("/")
        if org.lower() in {o.lower() for o in ORGS} and (m := _FOLDER.match(rest)):
            return _ref(m.group(1), m.group(2), m.group(3))
    for pattern in (_SHORT, _FOLDER):
        if m := pattern.match(text):
            return _ref(m.group(1), m.group(2), m.group(3))
    if m := _NEURONPEDIA.match(text):
        pos = _NP_POS.get(m.group(2).lower())
        if pos is None:
            raise UnknownSaeError(
                f"{name!r}: Neuronpedia position {m.group(2)!r} is not one of res, att, mlp "
                "(Neuronpedia hosts no Llama Scope transcoders)")
        return _ref(m.group(1), pos, m.group(3))
    suggestions = closest([r.name for r in ALL_SAES], text)
    raise UnknownSaeError(
        f"unknown Llama Scope SAE {name!r}. Names look like 'L12M-32x' (layer 0-31, position "
        "R/A/M/TC, width 8x or 32x)" + (f"; closest: {', '.join(suggestions)}" if suggestions else ""))


def claims(name: str) -> bool:
    """Whether ``name`` is spelled like a Llama Scope name (short, SAELens, Neuronpedia or
    Hugging Face form), so that :func:`resolve` should read it (and say what is wrong with
    it); any other text is not a Llama Scope name (a local folder or another Hub repository)."""
    text = name.strip()
    if ":" in text:
        return _match_repo(text.partition(":")[0].strip()) is not None
    if "/" in text and not text.lower().startswith("llama3.1-8b/"):
        org, _, rest = text.partition("/")
        return _REPO.match(text) is not None or (
            org.lower() in {o.lower() for o in ORGS} and _FOLDER.match(rest) is not None)
    return any(p.match(text) for p in (_SHORT, _FOLDER, _NEURONPEDIA))
