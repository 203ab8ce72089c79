"""Report figures (matplotlib, Agg backend), returned as PNG bytes."""
from __future__ import annotations

import io
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _bars(ax, labels: list[str], series: dict[str, list[float]], errors: dict[str, list[float]] | None = None,
          ylabel: str = "", ylim=(0, 1.05)) -> None:
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        # report.json stores undefined values (a one-class group's AUROC) as null: drawn as 0 with no error bar
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(np.asarray(values, dtype=float)), width, label=name,
               yerr=None if errors is None else np.nan_to_num(np.asarray(errors[name], dtype=float)), capsize=3)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)


def raf_figure(report: dict[str, Any]) -> bytes:
    plt = _pyplot()
    encoders = report["encoders"]
    components = ["index", "performance", "robustness", "fairness"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _bars(ax, ["RAF index", "performance", "robustness", "fairness"],
          {name: [e["raf"][c] for c in components] for name, e in encoders.items()}, ylabel="score (0-1)")
    ax.legend(fontsize=8)
    ax.set_title("RAF index and components")
    return _png(fig)


def probe_figure(report: dict[str, Any]) -> bytes:
    plt = _pyplot()
    encoders = report["encoders"]
    targets = list(next(iter(encoders.values()))["probes"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _bars(ax, targets, {n: [e["probes"][t]["auroc"]["mean"] for t in targets] for n, e in encoders.items()},
          {n: [e["probes"][t]["auroc"]["std"] for t in targets] for n, e in encoders.items()}, ylabel="AUROC")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.legend(fontsize=8)
    ax.set_title("Linear-probe AUROC on clean scans (mean +- std over replicates)")
    return _png(fig)


def degradation_figure(report: dict[str, Any]) -> bytes:
    plt = _pyplot()
    encoders = report["encoders"]
    alterations = [k for k in next(iter(encoders.values()))["robustness"] if k != "clean"]
    fig, axes = plt.subplots(2, max(1, len(alterations)), figsize=(4.2 * max(1, len(alterations)), 6), squeeze=False)
    for column, name in enumerate(alterations):
        for encoder, entry in encoders.items():
            record = entry["robustness"][name]
            severities = [0] + record["severity"]
            axes[0, column].plot(severities, [entry["robustness"]["clean"]["auroc"]] + record["auroc"], "o-", label=encoder)
            axes[1, column].plot(severities, [1.0] + record["cosine"], "o-", label=encoder)
        axes[0, column].set_title(f"{name}: probe AUROC")
        axes[1, column].set_title(f"{name}: embedding cosine to clean")
        axes[1, column].set_xlabel("severity (0 = clean)")
        axes[0, column].axhline(0.5, color="grey", lw=1, ls="--")
        for row in range(2):
            axes[row, column].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _spread(values: list[float | None]) -> float:
    """Std over replicates of the defined values (report.json stores an undefined one, a one-class group's AUROC,
    as null); 0 when fewer than two are defined."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.std(finite)) if len(finite) > 1 else 0.0


def group_figure(report: dict[str, Any], attribute: str) -> bytes:
    plt = _pyplot()
    encoders = report["encoders"]
    groups = list(next(iter(encoders.values()))["fairness"][attribute]["groups"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, metric in zip(axes, ("accuracy", "auroc")):
        values = {n: [e["fairness"][attribute]["groups"][g][metric] for g in groups] for n, e in encoders.items()}
        errors = {n: [_spread(e["fairness"][attribute]["groups"][g][f"{metric}_per_replicate"]) for g in groups]
                  for n, e in encoders.items()}
        _bars(ax, groups, values, errors, ylabel=metric)
        ax.set_title(f"{metric} by {attribute} (mean +- std over replicates)")
    axes[0].legend(fontsize=8)
    return _png(fig)


def frechet_figure(report: dict[str, Any], attribute: str) -> bytes:
    plt = _pyplot()
    encoders = report["encoders"]
    fig, axes = plt.subplots(1, len(encoders), figsize=(4 * len(encoders), 3.4), squeeze=False)
    for ax, (name, entry) in zip(axes[0], encoders.items()):
        frechet = entry["latent"][attribute]["frechet"]
        image = ax.imshow(np.array(frechet["matrix"]), cmap="magma")
        ax.set_xticks(range(len(frechet["groups"])), frechet["groups"], rotation=45)
        ax.set_yticks(range(len(frechet["groups"])), frechet["groups"])
        ax.set_title(f"{name}\nFrechet distance by {attribute}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _png(fig)


def summary_figure(report: dict[str, Any]) -> bytes:
    """One picture of the report (RAF components, degradation, per-site accuracy) for the README."""
    plt = _pyplot()
    encoders = report["encoders"]
    first = next(iter(encoders.values()))
    alteration = next(k for k in first["robustness"] if k != "clean")
    attribute = "site" if "site" in first["fairness"] else next(iter(first["fairness"]))
    groups = list(first["fairness"][attribute]["groups"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    _bars(axes[0], ["RAF", "perf.", "robust.", "fair."],
          {n: [e["raf"][c] for c in ("index", "performance", "robustness", "fairness")] for n, e in encoders.items()})
    axes[0].set_title("RAF index and components")
    axes[0].legend(fontsize=8)
    for name, entry in encoders.items():
        record = entry["robustness"][alteration]
        axes[1].plot([0] + record["severity"], [entry["robustness"]["clean"]["auroc"]] + record["auroc"], "o-", label=name)
    axes[1].set_title(f"{alteration}: probe AUROC vs severity")
    axes[1].grid(alpha=0.3)
    _bars(axes[2], groups, {n: [e["fairness"][attribute]["groups"][g]["accuracy"] for g in groups] for n, e in encoders.items()})
    axes[2].set_title(f"probe accuracy by {attribute}")
    fig.tight_layout()
    return _png(fig)
