"""JSON that every reader accepts: non-finite floats (NaN, inf) become ``null``.

Python's ``json`` writes NaN as the bare word ``NaN``, which is not JSON; results files (eval
reports, bench outputs) go through :func:`json_safe` first so that a metric that could not be
computed reads as ``null`` everywhere.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["json_safe"]


def json_safe(v: Any) -> Any:
    """``v`` with every non-finite float replaced by None (through dicts, lists and tuples;
    dict keys become strings)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    return v
