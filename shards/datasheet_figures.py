"""Figures (matplotlib, Agg) and the Markdown / HTML pages of a datasheet, drawn from its JSON only.

The HTML and PNG helpers (`rafmedia.core.render`) are those of the RAF report, so both pages look and behave
alike.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from rafmedia.core.render import flag, html_image, html_note, html_page, html_table, markdown_table, png, subplots

RARE_COLOUR, COMMON_COLOUR = "#c0392b", "#4c72b0"


# ---- figures ----------------------------------------------------------------------------------------
def categories_figure(sheet: dict[str, Any]) -> bytes:
    """One bar panel per attribute; rare categories in red."""
    attributes = sheet["attributes"]
    columns = min(3, len(attributes))
    rows = -(-len(attributes) // columns)
    fig, axes = subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for ax, attribute in zip(axes.ravel(), attributes):
        counts = sheet["subgroups"]["counts"][attribute]
        rare = set(sheet["subgroups"]["rare"][attribute])
        ax.bar(list(counts), [c["count"] for c in counts.values()],
               color=[RARE_COLOUR if value in rare else COMMON_COLOUR for value in counts])
        ax.set_title(attribute, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(attributes):]:
        ax.axis("off")
    fig.suptitle(f"subjects per category (red: below {sheet['rare_below']:.0%} of subjects)", fontsize=10)
    fig.tight_layout()
    return png(fig)


def intersection_figure(table: dict[str, Any]) -> bytes:
    """A count heatmap of one pair of attributes (e.g. site x scanner); empty cells stand out in white."""
    first, second = table["attributes"]
    rows = sorted({c["values"][first] for c in table["cells"]})
    columns = sorted({c["values"][second] for c in table["cells"]})
    grid = np.zeros((len(rows), len(columns)))
    for cell in table["cells"]:
        grid[rows.index(cell["values"][first]), columns.index(cell["values"][second])] = cell["count"]
    fig, ax = subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.5 * len(rows)))
    ax.imshow(np.where(grid == 0, np.nan, grid), cmap="Blues", aspect="auto", vmin=0, vmax=max(grid.max(), 1) * 1.6)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=30, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(second)
    ax.set_ylabel(first)
    ax.set_title(f"{first} x {second}", fontsize=10)
    return png(fig)


def geometry_figure(sheet: dict[str, Any]) -> bytes:
    """Histograms of the shape (top) and voxel spacing (bottom) along each axis."""
    fig, axes = subplots(2, 3, figsize=(10, 4.4))
    for row, kind in enumerate(("shape", "spacing")):
        for axis in range(3):
            ax = axes[row, axis]
            entry = sheet["geometry"].get(f"{kind}_{axis}")
            if entry is None:
                ax.axis("off")
                continue
            values, counts = list(entry["values"]), list(entry["values"].values())
            if len(values) <= 12:  # a few distinct sizes: one bar each
                ax.bar(values, counts, color=COMMON_COLOUR)
            else:  # many (e.g. resampled-from-native spacings): a histogram of the values
                ax.hist(np.repeat(np.asarray(values, dtype=float), counts), bins=20, color=COMMON_COLOUR)
            ax.set_title(f"{kind} axis {axis}" + (" (mm)" if kind == "spacing" else " (voxels)"), fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    return png(fig)


def intensity_figure(sheet: dict[str, Any]) -> bytes:
    """Overlaid normalised histograms of sub-sampled voxel intensities, one line per group."""
    intensity = sheet["intensity"]
    edges = np.asarray(intensity["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = subplots(figsize=(7, 3.4))
    for group, entry in intensity["groups"].items():
        ax.plot(centers, entry["density"], drawstyle="steps-mid", lw=1.4,
                label=f"{group} (n={entry['num_subjects']}, std {entry['std']:.3g})")
    ax.set_xlabel(f"{intensity['channel']} intensity")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(f"voxel intensities per {intensity['group_by'] or 'cohort'} (every {intensity['stride']}th voxel "
                 "per axis)", fontsize=10)
    return png(fig)


def quality_figure(sheet: dict[str, Any]) -> bytes:
    """Prevalence of each quality flag and share of missing values per metadata column."""
    flags = sheet["quality"]["flags"]
    missing = sheet["missing"]["per_column"]
    fig, axes = subplots(1, 2, figsize=(10, 0.6 + 0.32 * max(len(flags), len(missing), 3)))
    axes[0].barh(list(flags), [f["fraction"] for f in flags.values()], color=RARE_COLOUR)
    axes[0].set_title("quality flags (share of subjects)", fontsize=10)
    axes[0].set_xlim(0, 1)
    axes[1].barh(list(missing), [m["fraction"] for m in missing.values()], color="#8c8c8c")
    axes[1].set_title("missing metadata (share of subjects)", fontsize=10)
    axes[1].set_xlim(0, 1)
    for ax, entries in zip(axes, (flags, missing)):
        for position, entry in enumerate(entries.values()):  # the count on every bar, so a zero reads as zero
            ax.text(entry["fraction"] + 0.01, position, str(entry["count"]), va="center", fontsize=8)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return png(fig)


def all_figures(sheet: dict[str, Any]) -> dict[str, bytes]:
    """Figure name -> PNG bytes, for the figures this datasheet has data for."""
    figures = {}
    if sheet["attributes"]:
        figures["categories"] = categories_figure(sheet)
    pairs = [t for t in sheet["intersections"] if len(t["attributes"]) == 2]
    preferred = [t for t in pairs if set(t["attributes"]) == {"site", "scanner"}]
    for table in (preferred or pairs)[:1]:  # site x scanner when both exist, else the first pair
        figures["intersection"] = intersection_figure(table)
    if sheet["geometry"]:
        figures["geometry"] = geometry_figure(sheet)
    if sheet["intensity"] is not None:
        figures["intensity"] = intensity_figure(sheet)
    figures["quality"] = quality_figure(sheet)
    return figures


# ---- tables shared by both pages ----------------------------------------------------------------------
def _tables(sheet: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]], str]]:
    """(heading, header, rows, note) for every table of the datasheet."""
    n = sheet["num_subjects"]
    subgroups = sheet["subgroups"]
    tables = [("Counts per subgroup", ["attribute", "value", "subjects", "share", "rare"],
               [[a, v, c["count"], c["fraction"], "RARE" if v in subgroups["rare"][a] else ""]
                for a, values in subgroups["counts"].items() for v, c in values.items()],
               f"Rare: below {sheet['rare_below']:.1%} of the {n} subjects.")]
    for table in sheet["intersections"]:
        names = table["attributes"]
        note = (f"{len(table['empty'])} empty and {len(table['rare'])} rare cells." if len(names) == 2
                else "Observed combinations only.")
        tables.append((f"Intersection {' x '.join(names)}", [*names, "subjects", "share"],
                       [[*c["values"].values(), c["count"], c["fraction"]] for c in table["cells"]], note))
    if sheet["numeric"]:
        tables.append(("Numeric metadata", ["column", "subjects", "min", "median", "mean", "max"],
                       [[c, s["count"], s["min"], s["median"], s["mean"], s["max"]]
                        for c, s in sheet["numeric"].items()], ""))
    missing = sheet["missing"]
    tables.append(("Missing metadata", ["column", "missing", "share"],
                   [[c, m["count"], m["fraction"]] for c, m in missing["per_column"].items()],
                   f"{missing['num_subjects_with_missing']} of {n} subjects miss at least one value."))
    quality = sheet["quality"]
    tables.append(("Quality flags", ["flag", "subjects", "share", "rule"],
                   [[f, q["count"], q["fraction"], q["rule"]] for f, q in quality["flags"].items()],
                   f"{quality['num_flagged']} of {n} subjects carry at least one flag."))
    tables.append(("Shape and spacing", ["axis", "min", "median", "max", "values (value: subjects)"],
                   [[k, g["min"], g["median"], g["max"], ", ".join(f"{v}: {c}" for v, c in g["values"].items())]
                    for k, g in sheet["geometry"].items()], ""))
    if sheet["intensity"] is not None:
        intensity = sheet["intensity"]
        tables.append((f"Voxel intensities per {intensity['group_by'] or 'cohort'}",
                       ["group", "subjects", "voxels", "mean", "std", "p01", "median", "p99"],
                       [[g, e["num_subjects"], e["num_voxels"], e["mean"], e["std"], e["p01"], e["median"], e["p99"]]
                        for g, e in intensity["groups"].items()],
                       f"Every {intensity['stride']}th voxel along each axis of channel '{intensity['channel']}'."
                       + (f" {intensity['num_without_channel']} subjects without that channel are left out."
                          if intensity.get("num_without_channel") else "")))
    return tables


def _rare_summary(sheet: dict[str, Any]) -> list[str]:
    return [f"{attribute} = {value}" for attribute, values in sheet["subgroups"]["rare"].items() for value in values]


# ---- pages -------------------------------------------------------------------------------------------------
def render_markdown(sheet: dict[str, Any], figure_names: list[str]) -> str:
    rare = _rare_summary(sheet)
    lines = [f"# Datasheet: {sheet['title']}", "", f"{sheet['num_subjects']} subjects; attributes: "
             f"{', '.join(sheet['attributes']) or 'none'}.", "",
             f"**Rare categories** (below {sheet['rare_below']:.1%}): {', '.join(rare) if rare else 'none'}.", ""]
    for heading, header, rows, note in _tables(sheet):
        lines += [f"## {heading}", "", *markdown_table(header, rows)]
        lines += [note, ""] if note else []
    lines += ["## Figures", ""] + [f"![{name}](figures/{name}.png)" for name in figure_names] + [""]
    return "\n".join(lines)


def render_html(sheet: dict[str, Any], figures: dict[str, bytes]) -> str:
    rare = _rare_summary(sheet)
    parts = [f"<h1>Datasheet: {html.escape(sheet['title'])}</h1>",
             f"<p>{sheet['num_subjects']} subjects; attributes: "
             f"{html.escape(', '.join(sheet['attributes']) or 'none')}. "
             "Every number is in datasheet.json next to this file.</p>",
             f"<p><b>Rare categories</b> (below {sheet['rare_below']:.1%}): "
             + (", ".join(flag(r) for r in rare) if rare else "none") + "</p>"]
    placed = {"Counts per subgroup": ["categories"], "Intersection": ["intersection"], "Quality flags": ["quality"],
              "Shape and spacing": ["geometry"], "Voxel intensities": ["intensity"]}
    shown: set[str] = set()
    for heading, header, rows, note in _tables(sheet):
        parts += [f"<h2>{html.escape(heading)}</h2>", html_table(header, rows)]  # every cell escaped once
        if note:
            parts.append(html_note(note))
        for prefix, names in placed.items():
            for name in names:
                if heading.startswith(prefix) and name in figures and name not in shown:
                    parts.append(html_image(figures[name], name))
                    shown.add(name)
    return html_page(f"datasheet: {sheet['title']}", parts)
