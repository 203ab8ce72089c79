"""Report values as text, shared by the HTML report (`report.py`) and the Markdown summary (`report_md.py`).

report.json stores undefined values as null: every formatter writes them as "n/a" (`core.render.format_value`).
"""
from __future__ import annotations

from typing import Any

from rafmedia.core.render import format_interval, format_value


def with_interval(values: dict[str, Any], key: str) -> str:
    """"value [low, high]" of `values[key]` and its interval `values[key + "_ci95"]`."""
    return f"{format_value(values.get(key))} {format_interval(values.get(f'{key}_ci95'))}"


def mean_std(value: Any) -> str:
    """"mean ± std" from a {"mean", "std"} summary; a bare number as itself."""
    if isinstance(value, dict):
        return f"{format_value(value.get('mean'))} ± {format_value(value.get('std'))}"
    return format_value(value)


def number(value: Any) -> Any:
    """A bare number, or the mean of a {"mean", ...} summary."""
    return value.get("mean") if isinstance(value, dict) else value


def p_value_text(value: Any) -> str:
    return f"p {format_value(value)}"


def share(value: Any) -> str:
    """A fraction ("0.1", 0.05) as a percentage; anything else as text."""
    try:
        return f"{float(value):.1%}".replace(".0%", "%")
    except (TypeError, ValueError):
        return format_value(value)


def ser_text(ser: dict[str, Any]) -> str:
    # JSON has no infinity: a perfect group's infinite SER arrives as null with the `infinite` flag
    return "infinite" if ser.get("infinite") else format_value(ser.get("value"))
