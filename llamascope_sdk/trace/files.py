"""The output folder of ``llamascope trace``: what it holds, and when it may be replaced.

::

    graph.safetensors   every tensor of the graph (edges, features, activations, tokens)
    graph.json          the rest (prompt, strings, names, settings) and the format mark
    viewer.json         the pruned graph in circuit-tracer's / Neuronpedia's viewer schema
    graph.html          the offline view (one self-contained file)
    paths.txt           the strongest paths into the top logit, as printed

The folder is written whole in one step (:func:`~llamascope_sdk.base.atomic.write_folder`).
It replaces only a new or empty folder or an earlier trace output holding nothing but these
files (its graph.json carries the format mark); anything else is refused before any model
loads, and nothing in it is touched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import atomic_write_text, check_replaceable, write_folder
from llamascope_sdk.base.errors import FolderNotOwnedError
from llamascope_sdk.store.files import check_output_folder
from llamascope_sdk.trace.graph import GRAPH_FORMAT, META_FILE, TENSOR_FILE, Graph

VIEWER_FILE = "viewer.json"
HTML_FILE = "graph.html"
PATHS_FILE = "paths.txt"
OWN_FILES = (TENSOR_FILE, META_FILE, VIEWER_FILE, HTML_FILE, PATHS_FILE)


def replaceable_trace(folder: Path) -> None:
    """Accept an earlier trace output holding only its own files; raise otherwise."""
    entries = sorted(p.name for p in folder.iterdir())
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        own = isinstance(meta, dict) and meta.get("format") == GRAPH_FORMAT
    except (OSError, ValueError):
        own = False
    if not own:
        raise FolderNotOwnedError(
            f"{folder} is not the output of llamascope trace ({len(entries)} entries, e.g. "
            f"{', '.join(entries[:3])}): only an empty folder or an earlier trace is replaced",
            hint="choose a new or empty folder for --out")
    foreign = [e for e in entries if e not in OWN_FILES]
    if foreign:
        raise FolderNotOwnedError(
            f"{folder} is a trace output but also holds files it did not write "
            f"({', '.join(foreign[:3])}); replacing it would delete them",
            hint="move those files out, or choose another --out")


def check_trace_target(folder: str | Path) -> Path:
    """Check, before any work, that a trace may be written at ``folder``.

    Raises:
        FolderNotOwnedError: a folder the SDK did not write (nothing in it is touched).
        OutputPathError: a file, or a place that cannot be written.
    """
    return check_output_folder(check_replaceable(folder, replaceable_trace))


def save_trace(folder: str | Path, graph: Graph, *, viewer: dict[str, Any] | None = None,
               page: str | None = None, paths: str | None = None) -> Path:
    """Write the graph (and, when given, the viewer JSON, the HTML view and the paths text)
    as one folder, atomically; returns the folder."""
    def write(tmp: Path) -> None:
        graph.write(tmp)
        extra: list[tuple[str, Callable[[], str]]] = []
        if viewer is not None:
            extra.append((VIEWER_FILE, lambda: json.dumps(viewer, ensure_ascii=False) + "\n"))
        if page is not None:
            extra.append((HTML_FILE, lambda: page))
        if paths is not None:
            extra.append((PATHS_FILE, lambda: paths))
        for name, text in extra:
            atomic_write_text(tmp / name, text())

    return write_folder(folder, write, replaceable=replaceable_trace)
