"""Report figures (matplotlib figures drawn without pyplot, `rafmedia.core.render`), returned as PNG bytes.

report.json stores undefined values (NaN) as null, and older files lack the newer keys: every figure accepts
None values, and the figures of optional parts (projection, segmentation, RCA) return None when their data
are absent, so the report leaves them out.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rafmedia.core.render import colormap, png, subplots
from rafmedia.evaluate.report_format import fairness_metrics


def _floats(values: Any) -> np.ndarray:
    """A float array with null (None) as NaN."""
    return np.array([np.nan if v is None else v for v in np.ravel(np.asarray(values, dtype=object))],
                    dtype=float).reshape(np.shape(values))


def lookup(mapping: Any, *keys: str) -> Any:
    """mapping[k1][k2]...; None where a key is missing or a level is null (older report.json files)."""
    for key in keys:
        if not isinstance(mapping, dict) or mapping.get(key) is None:
            return None
        mapping = mapping[key]
    return mapping


def interval_errors(values: list[float | None], intervals: list[list[float | None] | None]) -> np.ndarray:
    """(2, N) distances from each value down to its interval's low end and up to its high end, for `yerr`.

    A missing or undefined interval (or value) gives no bar (0); an interval that does not contain its value
    (possible with percentile bootstrap) is clipped to 0 on that side.
    """
    values_N = _floats(values)
    bounds_N2 = _floats([list(ci) if ci is not None and len(ci) == 2 else [None, None] for ci in intervals]).reshape(-1, 2)
    errors_2N = np.stack([values_N - bounds_N2[:, 0], bounds_N2[:, 1] - values_N])
    return np.clip(np.nan_to_num(errors_2N), 0.0, None)


def _bars(ax, labels: list[str], series: dict[str, list[float]], errors: dict[str, Any] | None = None,
          ylabel: str = "", ylim=(0, 1.05)) -> None:
    """Grouped bars; `errors[name]` is a symmetric (N,) error or an asymmetric (2, N) one (`interval_errors`)."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        # report.json stores undefined values (a one-class group's AUROC) as null: drawn as 0 with no error bar
        yerr = None if errors is None else np.clip(np.nan_to_num(_floats(errors[name])), 0.0, None)
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(_floats(values)), width, label=name, yerr=yerr, capsize=3)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)


def raf_figure(report: dict[str, Any]) -> bytes:
    encoders = report["encoders"]
    components = ["index", "performance", "robustness", "fairness"]
    fig, ax = subplots(figsize=(7, 3.2))
    _bars(ax, ["RAF index", "performance", "robustness", "fairness"],
          {name: [e["raf"][c] for c in components] for name, e in encoders.items()}, ylabel="score (0-1)")
    ax.legend(fontsize=8)
    ax.set_title("RAF index and components")
    return png(fig)


def probe_figure(report: dict[str, Any]) -> bytes:
    encoders = report["encoders"]
    targets = [t for t, p in next(iter(encoders.values()))["probes"].items() if "auroc" in p]  # not ordinal ones
    fig, ax = subplots(figsize=(7, 3.2))
    _bars(ax, targets, {n: [e["probes"][t]["auroc"]["mean"] for t in targets] for n, e in encoders.items()},
          {n: [e["probes"][t]["auroc"]["std"] for t in targets] for n, e in encoders.items()}, ylabel="AUROC")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.legend(fontsize=8)
    ax.set_title("Linear-probe AUROC on clean scans (mean +- std over replicates)")
    return png(fig)


def degradation_figure(report: dict[str, Any]) -> bytes:
    encoders = report["encoders"]
    alterations = [k for k in next(iter(encoders.values()))["robustness"] if k != "clean"]
    fig, axes = subplots(2, max(1, len(alterations)), figsize=(4.2 * max(1, len(alterations)), 6), squeeze=False)
    for column, name in enumerate(alterations):
        for encoder, entry in encoders.items():
            record = entry["robustness"][name]
            severities = [0] + record["severity"]
            axes[0, column].plot(severities, _floats([entry["robustness"]["clean"]["auroc"]] + record["auroc"]), "o-",
                                 label=encoder)
            axes[1, column].plot(severities, _floats([1.0] + record["cosine"]), "o-", label=encoder)
        axes[0, column].set_title(f"{name}: probe AUROC")
        axes[1, column].set_title(f"{name}: embedding cosine to clean")
        axes[1, column].set_xlabel("severity (0 = clean)")
        axes[0, column].axhline(0.5, color="grey", lw=1, ls="--")
        for row in range(2):
            axes[row, column].grid(alpha=0.3)
    if alterations:
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def _spread(values: list[float | None]) -> float:
    """Std over replicates of the defined values (report.json stores an undefined one, a one-class group's AUROC,
    as null); 0 when fewer than two are defined."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.std(finite)) if len(finite) > 1 else 0.0


def group_bars(report: dict[str, Any], attribute: str, metric: str) -> tuple[dict, dict, str]:
    """(values, errors, what they are) of one metric per group and encoder, for `_bars`.

    When any group has a bootstrap interval on the first replicate (`first_replicate.ci95`), the bars are the
    first replicate's values with those percentile intervals as asymmetric error bars (the interval belongs to
    that value, not to the mean over replicates); otherwise the mean over replicates +- their std.
    """
    encoders = report["encoders"]
    groups = list(next(iter(encoders.values()))["fairness"][attribute]["groups"])
    by_encoder = {n: [e["fairness"][attribute]["groups"].get(g, {}) for g in groups] for n, e in encoders.items()}
    intervals = {n: [lookup(g, "first_replicate", "ci95", metric) for g in rows] for n, rows in by_encoder.items()}
    if np.isfinite(_floats([v for rows in intervals.values() for ci in rows if ci for v in ci])).any():
        values = {n: [lookup(g, "first_replicate", metric) for g in rows] for n, rows in by_encoder.items()}
        errors = {n: interval_errors(values[n], intervals[n]) for n in by_encoder}
        return values, errors, "replicate 0, bootstrap 95% CI"
    values = {n: [g.get(metric) for g in rows] for n, rows in by_encoder.items()}
    errors = {n: [_spread(g.get(f"{metric}_per_replicate") or []) for g in rows] for n, rows in by_encoder.items()}
    return values, errors, "mean +- std over replicates"


def group_figure(report: dict[str, Any], attribute: str) -> bytes:
    """One panel per group metric of the grouping (accuracy, AUROC, ... as the evaluation listed them)."""
    result = next(iter(report["encoders"].values()))["fairness"][attribute]
    groups, metrics = list(result["groups"]), fairness_metrics(result)
    fig, axes = subplots(1, len(metrics), figsize=(5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values, errors, what = group_bars(report, attribute, metric)
        _bars(ax, groups, values, errors, ylabel=metric)
        ax.set_title(f"{metric} by {attribute} ({what})", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def frechet_figure(report: dict[str, Any], attribute: str) -> bytes:
    encoders = report["encoders"]
    fig, axes = subplots(1, len(encoders), figsize=(4 * len(encoders), 3.4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], encoders.items()):
        frechet = entry["latent"][attribute]["frechet"]
        image = ax.imshow(_floats(frechet["matrix"]), cmap="magma")
        ax.set_xticks(range(len(frechet["groups"])), frechet["groups"], rotation=45)
        ax.set_yticks(range(len(frechet["groups"])), frechet["groups"])
        ax.set_title(f"{name}\nFrechet distance by {attribute}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return png(fig)


# ---- optional parts: each returns None when report.json lacks its data ------------------------------------------
MAX_LEGEND_GROUPS = 12  # a numeric attribute with more distinct values (ages) is coloured on a continuous scale


def _is_continuous(labels: list[Any]) -> bool:
    present = [v for v in labels if v is not None and v != ""]
    return (len(set(present)) > MAX_LEGEND_GROUPS
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present))


def _scatter_groups(fig, ax, x_N: np.ndarray, y_N: np.ndarray, labels: list[Any], attribute: str) -> None:
    """Points coloured by group (legend), or by value on a colour bar for a many-valued numeric attribute."""
    if _is_continuous(labels):
        points = ax.scatter(x_N, y_N, c=_floats(labels), cmap="viridis", s=14)
        fig.colorbar(points, ax=ax, fraction=0.046, label=attribute)
        return
    names = np.array(["(missing)" if v is None or v == "" else str(v) for v in labels])
    colours = colormap("tab10" if len(set(names)) <= 10 else "tab20")
    for index, group in enumerate(sorted(set(names))):
        member = names == group
        ax.scatter(x_N[member], y_N[member], s=14, color=colours(index % colours.N), label=f"{group} ({member.sum()})")
    ax.legend(fontsize=7, title=attribute, title_fontsize=7, markerscale=0.8)


def projection_figure(report: dict[str, Any], attribute: str) -> bytes | None:
    """PCA of each encoder's clean embeddings (`latent.projection`), one panel per encoder, points coloured by
    `attribute` (`cohort.subjects`, in manifest order like the points). None when either is absent; an
    encoder whose projection does not have one point per subject is left out."""
    labels = lookup(report, "cohort", "subjects", attribute)
    if labels is None:
        return None
    panels = [(name, _floats(projection["x"]), _floats(projection["y"]))
              for name, entry in report["encoders"].items()
              if (projection := lookup(entry, "latent", "projection")) is not None
              and len(projection.get("x") or []) == len(projection.get("y") or []) == len(labels)]
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (name, x_N, y_N) in zip(axes[0], panels):
        _scatter_groups(fig, ax, x_N, y_N, labels, attribute)
        ax.set_title(f"{name}\nPCA of clean embeddings, by {attribute}", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.tight_layout()
    return png(fig)


def segmentation_group_figure(report: dict[str, Any], attribute: str) -> bytes | None:
    """Mean Dice per group of `attribute` for every encoder with segmentation results, with the groups' bootstrap
    95% intervals as error bars; None when no encoder has them."""
    fairness = {name: dice for name, entry in report["encoders"].items()
                if (dice := lookup(entry, "segmentation", "fairness", attribute, "dice", "groups"))}
    if not fairness:
        return None
    groups = list(dict.fromkeys(g for by_group in fairness.values() for g in by_group))
    values = {n: [lookup(by_group, g, "value") for g in groups] for n, by_group in fairness.items()}
    errors = {n: interval_errors(values[n], [lookup(by_group, g, "ci95") for g in groups])
              for n, by_group in fairness.items()}
    fig, ax = subplots(figsize=(max(5.0, 1.2 * len(groups) + 2), 3.2))
    _bars(ax, groups, values, errors, ylabel="Dice")
    ax.set_title(f"Dice by {attribute} (mean over subjects, bootstrap 95% CI)", fontsize=9)
    ax.legend(fontsize=8)
    return png(fig)


def rca_figure(report: dict[str, Any]) -> bytes | None:
    """Reverse-classification-accuracy check: estimated against true per-case Dice, one panel per encoder with
    RCA results, Pearson r in the title; None when no encoder has them."""
    panels = []
    for name, entry in report["encoders"].items():
        rca = lookup(entry, "segmentation", "rca")
        true_N = _floats(lookup(rca, "true_dice") or []).ravel()
        estimated_N = _floats(lookup(rca, "estimated_dice") or []).ravel()
        if len(true_N) and len(true_N) == len(estimated_N):
            panels.append((name, true_N, estimated_N, rca.get("pearson")))
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
    for ax, (name, true_N, estimated_N, pearson) in zip(axes[0], panels):
        ax.scatter(true_N, estimated_N, s=14)
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("true Dice")
        ax.set_ylabel("estimated Dice (RCA)")
        r = "n/a" if pearson is None or not np.isfinite(pearson) else f"{pearson:.2f}"
        ax.set_title(f"{name}\nRCA: r = {r}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def adaptor_figure(report: dict[str, Any]) -> bytes | None:
    """AUROC against the label budget, one line per applicable adaptor with its 95% interval over seeds as error
    bars, one panel per encoder with an adaptor block; None when no encoder has one."""
    panels = [(name, block) for name, entry in report["encoders"].items()
              if isinstance(block := entry.get("adaptors"), dict) and block.get("budgets")]
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (name, block) in zip(axes[0], panels):
        budgets = block["budgets"]
        x = _floats([float(budget) for budget in budgets])
        for adaptor, result in (block.get("results") or {}).items():
            if not result.get("applicable", True):
                continue
            values = [lookup(result, "budgets", budget, "auroc", "mean") for budget in budgets]
            errors = interval_errors(values, [lookup(result, "budgets", budget, "auroc", "ci95") for budget in budgets])
            ax.errorbar(x, _floats(values), yerr=errors, marker="o", capsize=3, label=adaptor)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{float(budget):.0%}" for budget in budgets])
        ax.axhline(0.5, color="grey", lw=1, ls="--")
        ax.set_ylim(0, 1.05)
        ax.minorticks_off()
        ax.set_xlabel("labelled share of the training split")
        ax.set_title(f"{name}\nAUROC by label budget (95% CI over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("AUROC")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def summary_figure(report: dict[str, Any]) -> bytes:
    """One picture of the report (RAF components, degradation, per-site accuracy) for the README."""
    encoders = report["encoders"]
    first = next(iter(encoders.values()))
    alteration = next((k for k in first["robustness"] if k != "clean"), None)  # None: evaluated without alterations
    attribute = "site" if "site" in first["fairness"] else next(iter(first["fairness"]))
    groups = list(first["fairness"][attribute]["groups"])
    fig, axes = subplots(1, 3, figsize=(15, 3.6))
    _bars(axes[0], ["RAF", "perf.", "robust.", "fair."],
          {n: [e["raf"][c] for c in ("index", "performance", "robustness", "fairness")] for n, e in encoders.items()})
    axes[0].set_title("RAF index and components")
    axes[0].legend(fontsize=8)
    for name, entry in encoders.items() if alteration else ():
        record = entry["robustness"][alteration]
        axes[1].plot([0] + record["severity"], _floats([entry["robustness"]["clean"]["auroc"]] + record["auroc"]), "o-",
                     label=name)
    axes[1].set_title(f"{alteration}: probe AUROC vs severity" if alteration else "no alterations evaluated")
    axes[1].grid(alpha=0.3)
    _bars(axes[2], groups, {n: [e["fairness"][attribute]["groups"][g]["accuracy"] for g in groups] for n, e in encoders.items()})
    axes[2].set_title(f"probe accuracy by {attribute}")
    fig.tight_layout()
    return png(fig)
