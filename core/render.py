"""Rendering helpers shared by every page rafmedia writes (the RAF report, cohort datasheets, alteration previews).

HTML: one style sheet, tables whose cells are escaped exactly once (`Markup` marks HTML that is already safe),
figures embedded as base64 PNG so a page can be mailed or opened offline. Numbers: `format_value` writes None and
NaN as "n/a". Figures: matplotlib `Figure` objects drawn without pyplot, so no global backend is chosen and
nothing is set at import time.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

UNDEFINED = "n/a"

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.6em 0 1.4em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.flag{color:#b00;font-weight:600}
.ok{color:#070;font-weight:600}img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:3px}
.note{color:#555;font-size:0.92em}"""


class Markup(str):
    """HTML that is already safe: `html_table` puts it in as it is (every other cell is escaped once)."""


# ---- numbers as text ------------------------------------------------------------------------------------------
def format_value(value: Any, digits: int = 3) -> str:
    """A number with `digits` decimals, "n/a" for None or NaN, anything else as str (not escaped)."""
    if value is None:
        return UNDEFINED
    if isinstance(value, float):
        return f"{value:.{digits}f}" if np.isfinite(value) else UNDEFINED
    return str(value)


def format_interval(ci: Any) -> str:
    """"[low, high]" of a two-element interval; "[n/a, n/a]" for anything else."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return f"[{UNDEFINED}, {UNDEFINED}]"
    return f"[{format_value(ci[0])}, {format_value(ci[1])}]"


# ---- HTML pieces --------------------------------------------------------------------------------------------------
def html_cell(value: Any) -> str:
    return value if isinstance(value, Markup) else html.escape(format_value(value))


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """Cells that are `Markup` go in as they are; every other cell is formatted (`format_value`) and escaped once."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div style='overflow-x:auto'><table><tr>{head}</tr>{body}</table></div>"  # wide tables scroll alone


def html_image(png_bytes: bytes | None, alt: str) -> str:
    """An embedded PNG (base64), or nothing for a figure that was not drawn."""
    if png_bytes is None:
        return ""
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png_bytes).decode()}"></p>'


def html_note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def flag(text: str) -> Markup:
    """Text shown in red: a warning inside a table cell."""
    return Markup(f"<span class='flag'>{html.escape(text)}</span>")


def bold(text: str) -> Markup:
    return Markup(f"<b>{html.escape(text)}</b>")


def html_page(title: str, body: list[str]) -> str:
    """A whole self-contained page with the shared style sheet."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>{STYLE}</style></head><body>", *body, "</body></html>"])


# ---- Markdown -------------------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The lines of a Markdown table (then a blank line); cells formatted with `format_value`, '|' escaped."""
    def cell(value: Any) -> str:
        return format_value(value).replace("|", "\\|")

    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(cell(c) for c in row) + " |" for row in rows], ""]


# ---- figures --------------------------------------------------------------------------------------------------------
def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True,
             **options: Any) -> tuple[Figure, Any]:
    """A figure and its axes, as `pyplot.subplots` returns them, but owned by nobody: no pyplot state to close."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, squeeze=squeeze, **options)


def colormap(name: str):
    """A registered matplotlib colour map by name (e.g. "tab10")."""
    return matplotlib.colormaps[name]


def png(figure: Figure, *, dpi: int = 110, tight: bool = True) -> bytes:
    """The figure as PNG bytes (`tight`: cropped to what is drawn)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buffer.getvalue()
