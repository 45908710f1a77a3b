"""Plots built only from run records (matplotlib, Agg backend, PNG written atomically).

:func:`ablation_sweep_figure` draws one panel per hyperparameter sweep a method declares
(``Method.ablation_sweeps()``, e.g. ClusPro's EMA momentum mu and prototypes per primitive K):
the metric's mean over seeds against the swept value, with error bars of one sample standard
deviation (ddof = 1; none with a single seed) and the number of seeds under each point. A
method's ``base`` variant (no clustering), when present, is drawn as a dashed reference line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from czsl_bench.atomic import atomic_file
from czsl_bench.records import RunRecord

FULL_VARIANT = "full"


def _values(records: Iterable[RunRecord], method: str, dataset: str, variant: str, metric: str,
            setting: str, split: str) -> list[float]:
    """``records`` are RunRecords (named by their variant label) or ``(point name, record)``
    pairs from the ablation API (a record may serve several points)."""
    out: dict[int, float] = {}
    for item in records:
        if not isinstance(item, tuple) and item.method != method:
            continue  # plain records: only ``method``'s (pairs may name an equivalent method's)
        name, r = item if isinstance(item, tuple) else (item.variant or FULL_VARIANT, item)
        if (r.dataset, r.setting, r.source, name) != (dataset, setting, "run", variant):
            continue
        value = r.metrics.get(split, {}).get(metric)
        if value is not None and r.seed is not None:
            out.setdefault(r.seed, float(value))  # one value per seed
    return list(out.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def ablation_sweep_figure(
    records: Iterable[RunRecord],
    method: str,
    dataset: str,
    sweeps: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    metric: str = "auc",
    setting: str = "closed",
    split: str = "test",
    reference: str | None = "base",
) -> Path:
    """Write a PNG with one panel per sweep: ``sweeps`` maps a panel title (e.g. ``"EMA momentum
    mu"``) to ``{variant name: swept value}``. Values are shown x100 (metrics are fractions).
    Points are evenly spaced and labelled with their value, so mu = 0.99 and 0.999 stay apart.
    Returns the path; raises ``ValueError`` when no record matches any sweep."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = list(records)
    panels = []
    for title, variants in sweeps.items():
        xs, means, stds, counts = [], [], [], []
        for variant, x in sorted(variants.items(), key=lambda kv: kv[1]):
            vals = _values(records, method, dataset, variant, metric, setting, split)
            if not vals:
                continue
            m, s = _mean_std(vals)
            xs.append(x)
            means.append(100 * m)
            stds.append(100 * s)
            counts.append(len(vals))
        panels.append((title, xs, means, stds, counts))
    if not any(p[1] for p in panels):
        raise ValueError(
            f"no {setting}-world {split} records of {method} on {dataset} for the sweeps "
            f"{', '.join(sweeps)}; run `czsl-bench ablate {method} --dataset {dataset}` first"
        )
    ref = None
    if reference:
        vals = _values(records, method, dataset, reference, metric, setting, split)
        if vals:
            ref = tuple(100 * v for v in _mean_std(vals)) + (len(vals),)

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, xs, means, stds, counts) in zip(axes[0], panels):
        pos = list(range(len(xs)))
        ax.errorbar(pos, means, yerr=stds, marker="o", capsize=4, color="tab:blue", label=method)
        for p, m, n in zip(pos, means, counts):
            ax.annotate(f"n={n}", (p, m), textcoords="offset points", xytext=(0, -14), ha="center",
                        fontsize=7, color="0.4")
        if ref is not None:
            ax.axhline(ref[0], ls="--", color="0.5", lw=1, label=f"{reference} (n={ref[2]})")
            if ref[1] > 0:
                ax.axhspan(ref[0] - ref[1], ref[0] + ref[1], color="0.5", alpha=0.12, lw=0)
        if not xs:
            ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xticks(pos, [f"{x:g}" for x in xs])
        ax.set_xlabel(title)
        ax.set_ylabel(f"{metric.upper() if metric == 'auc' else metric} ({split}, x100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{method} on {dataset}: mean ± std over seeds", fontsize=10)
    fig.tight_layout()

    target = Path(path)
    try:
        with atomic_file(target) as handle:
            fig.savefig(handle, dpi=130, format="png")
    finally:
        plt.close(fig)
    return target
