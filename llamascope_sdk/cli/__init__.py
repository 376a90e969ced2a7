"""The ``llamascope`` command line: a thin skin over the library, one module per area.

``app`` (the typer application, shared options and error reporting) lives in
:mod:`.app`; each module below registers its commands on it when imported.
"""

from __future__ import annotations

from llamascope_sdk.cli import (  # noqa: F401  (register their commands)
    catalog,
    convert,
    eval_steer,
    evaluate,
    explain,
    generate,
    inspect,
    read,
    serve,
)
from llamascope_sdk.cli.app import app, main

__all__ = ["app", "main"]
