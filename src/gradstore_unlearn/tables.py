"""Output for the command line and the HTTP server: plain-text tables (aligned columns) and strict JSON values.

No dependencies, so that the command line can use it without the server's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None and numpy scalars as Python numbers (JSON has no NaN).

    A report's losses are NaN or infinite where nothing was measured (no retain examples left, say); strict
    JSON parsers reject `NaN`, so the command line's `--json` and the server's responses say null instead.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return json_safe(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if value is None:
        return "-"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows) and rows
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths,
                                                                                                  strict=True)))

    out = [title] if title else []
    out += [line(list(headers)).rstrip(), "  ".join("-" * w for w in widths)]
    out += [line(r).rstrip() for r in cells]
    return "\n".join(out)


def format_pairs(pairs: Sequence[tuple[str, Any]], title: str | None = None) -> str:
    """A two-column key/value listing."""
    width = max((len(k) for k, _ in pairs), default=0)
    out = [title] if title else []
    out += [f"{k.ljust(width)}  {format_value(v)}" for k, v in pairs]
    return "\n".join(out)
