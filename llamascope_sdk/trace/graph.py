"""The attribution graph: its nodes, its edge matrix, and its files (safetensors + JSON).

Node order (the index every other module of :mod:`llamascope_sdk.trace` uses), as in
circuit-tracer's ``Graph``::

    [selected features (sorted by layer, position, feature)]   n_features
    [error nodes: layer 0 positions 0..T-1, layer 1, ...]     n_layers * T
    [token-embedding nodes: positions 0..T-1]                   T
    [logit nodes: the targets, most probable first]            n_logits

Edges are stored as the rectangular matrix ``edges_RC`` ([rows, columns], target x source):
rows are the nodes that can be targets (the selected features, then the logits), columns
the nodes that can be sources (the selected features, the error nodes, the tokens). Error and
token nodes have no inputs and logits no outputs, so circuit-tracer's square
``adjacency_matrix`` is this matrix with zero rows and columns added
(:meth:`Graph.adjacency_matrix`); the square is never needed to prune or export, which keeps
the memory at rows x columns instead of nodes^2.

Files (:meth:`Graph.save` / :meth:`Graph.load`): ``graph.safetensors`` holds every tensor,
``graph.json`` everything else (prompt, token strings, model and transcoder names, format
version). No pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.base.errors import CorruptCheckpointError

#: Written into graph.json; a reader refuses other versions.
GRAPH_FORMAT = "llamascope-attribution-graph/1"
TENSOR_FILE = "graph.safetensors"
META_FILE = "graph.json"


@dataclass
class Graph:
    """An attribution graph of one prompt (see the module docstring for the node order).

    Attributes:
        prompt: the text attributed ("" when token ids were given).
        input_tokens_T: the token ids, BOS included.
        token_strings: one readable string per position.
        n_layers: decoder layers of the model.
        active_features_A3: every active transcoder feature as (layer, position, feature).
        activations_A: their activations (model units, the transcoder's output scale).
        selected_A: indices into ``active_features_A3`` of the features that are nodes.
        logit_tokens_K: token ids of the logit targets.
        logit_probs_K: their probabilities under the model.
        logit_strings: their strings.
        edges_RC: direct effects, rows = [selected features, logits], columns =
            [selected features, error nodes, tokens]; ``edges_RC[t, s]`` is the effect of
            source ``s`` on target ``t``'s input.
        transcoder_layers: layers that have a transcoder (the others are error nodes only).
        model_name: the model's name or path.
        transcoder_names: one name per transcoder, in layer order.
        info: anything else worth keeping (settings, timings), JSON-serialisable.
    """

    prompt: str
    input_tokens_T: torch.Tensor
    token_strings: list[str]
    n_layers: int
    active_features_A3: torch.Tensor
    activations_A: torch.Tensor
    selected_A: torch.Tensor
    logit_tokens_K: torch.Tensor
    logit_probs_K: torch.Tensor
    logit_strings: list[str]
    edges_RC: torch.Tensor
    transcoder_layers: list[int]
    model_name: str = ""
    transcoder_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ sizes and offsets
    @property
    def n_pos(self) -> int:
        return int(self.input_tokens_T.numel())

    @property
    def n_features(self) -> int:
        """Feature nodes (the selected features)."""
        return int(self.selected_A.numel())

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens_K.numel())

    @property
    def error_offset(self) -> int:
        return self.n_features

    @property
    def token_offset(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_offset(self) -> int:
        return self.token_offset + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_offset + self.n_logits

    @property
    def features_F3(self) -> torch.Tensor:
        """(layer, position, feature) of each feature node."""
        return self.active_features_A3[self.selected_A]

    @property
    def feature_activations_F(self) -> torch.Tensor:
        return self.activations_A[self.selected_A]

    def row_nodes(self) -> torch.Tensor:
        """Node index of each row of ``edges_RC``."""
        feats = torch.arange(self.n_features)
        logits = torch.arange(self.logit_offset, self.n_nodes)
        return torch.cat([feats, logits])

    def adjacency_matrix(self) -> torch.Tensor:
        """circuit-tracer's square [n_nodes, n_nodes] matrix (target x source). Costs
        n_nodes^2 floats: for comparisons on small graphs, not needed otherwise."""
        adj = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.edges_RC.dtype)
        adj[self.row_nodes(), : self.logit_offset] = self.edges_RC
        return adj

    def node_kind(self, node: int) -> str:
        """'feature', 'error', 'token' or 'logit'."""
        if node < self.error_offset:
            return "feature"
        if node < self.token_offset:
            return "error"
        if node < self.logit_offset:
            return "token"
        return "logit"

    def describe_node(self, node: int) -> str:
        """A short readable name, e.g. ``L3 F17 @5 'cat'`` or ``logit ' Paris' (p=0.41)``."""
        kind = self.node_kind(node)
        if kind == "feature":
            layer, pos, feat = (int(v) for v in self.features_F3[node])
            return f"L{layer} F{feat} @{pos} {self.token_strings[pos]!r}"
        if kind == "error":
            layer, pos = divmod(node - self.error_offset, self.n_pos)
            return f"L{layer} error @{pos} {self.token_strings[pos]!r}"
        if kind == "token":
            pos = node - self.token_offset
            return f"token @{pos} {self.token_strings[pos]!r}"
        k = node - self.logit_offset
        return f"logit {self.logit_strings[k]!r} (p={float(self.logit_probs_K[k]):.3f})"

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "input_tokens": self.input_tokens_T.to(torch.int64).cpu(),
            "active_features": self.active_features_A3.to(torch.int64).cpu(),
            "activations": self.activations_A.cpu(),
            "selected": self.selected_A.to(torch.int64).cpu(),
            "logit_tokens": self.logit_tokens_K.to(torch.int64).cpu(),
            "logit_probs": self.logit_probs_K.float().cpu(),
            "edges": self.edges_RC.cpu(),
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "format": GRAPH_FORMAT, "prompt": self.prompt, "token_strings": self.token_strings,
            "n_layers": self.n_layers, "logit_strings": self.logit_strings,
            "transcoder_layers": self.transcoder_layers, "model_name": self.model_name,
            "transcoder_names": self.transcoder_names, "info": self.info,
        }

    def write(self, folder: Path) -> None:
        """Write graph.safetensors and graph.json into ``folder`` (which exists). Use
        :func:`llamascope_sdk.trace.files.save_graph` for a whole output folder."""
        atomic_save_safetensors(self.tensors(), folder / TENSOR_FILE,
                                metadata={"format": GRAPH_FORMAT})
        atomic_write_text(folder / META_FILE,
                          json.dumps(self.metadata(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Graph:
        """Read a graph written by :meth:`write` (safetensors + JSON; no pickle).

        Raises:
            CorruptCheckpointError: a missing file, another format, or inconsistent shapes.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            t = load_file(str(folder / TENSOR_FILE))
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{folder}: not a readable attribution graph ({e})") from e
        if meta.get("format") != GRAPH_FORMAT:
            raise CorruptCheckpointError(
                f"{folder / META_FILE}: format {meta.get('format')!r}, expected {GRAPH_FORMAT!r}")
        g = cls(prompt=meta["prompt"], input_tokens_T=t["input_tokens"],
                token_strings=list(meta["token_strings"]), n_layers=int(meta["n_layers"]),
                active_features_A3=t["active_features"], activations_A=t["activations"],
                selected_A=t["selected"], logit_tokens_K=t["logit_tokens"],
                logit_probs_K=t["logit_probs"], logit_strings=list(meta["logit_strings"]),
                edges_RC=t["edges"], transcoder_layers=list(meta["transcoder_layers"]),
                model_name=meta.get("model_name", ""),
                transcoder_names=list(meta.get("transcoder_names", [])),
                info=dict(meta.get("info", {})))
        g.check()
        return g

    def check(self) -> Graph:
        """Raise CorruptCheckpointError unless every shape agrees with the node order."""
        want = (self.n_features + self.n_logits, self.logit_offset)
        problems = []
        if tuple(self.edges_RC.shape) != want:
            problems.append(f"edges {list(self.edges_RC.shape)} != {list(want)}")
        if self.active_features_A3.ndim != 2 or self.active_features_A3.shape[-1] != 3:
            problems.append(f"active_features {list(self.active_features_A3.shape)} != [A, 3]")
        if self.activations_A.shape[0] != self.active_features_A3.shape[0]:
            problems.append("one activation per active feature is needed")
        if len(self.token_strings) != self.n_pos or len(self.logit_strings) != self.n_logits:
            problems.append("token or logit strings do not match the tokens")
        if self.logit_probs_K.shape != self.logit_tokens_K.shape:
            problems.append("one probability per logit target is needed")
        if problems:
            raise CorruptCheckpointError("inconsistent attribution graph: " + "; ".join(problems))
        return self
