"""Result tables built only from run records: mean ± std over seeds, best value per column in bold.

The pipeline is the usual one for result files: records → a long frame (one row per record ×
metric) → mean/std/count per (row, dataset, metric) → a wide :class:`ResultTable` → a renderer
(Markdown via tabulate, LaTeX with booktabs and HTML via pandas' Styler, CSV as tidy numbers).

Two views share that pipeline and differ only in what a row is:

* the main table (:func:`build_table`): one row per method (the published configuration,
  ``variant`` None), optionally followed by the paper's row ("CSP (paper)");
* the ablation table (:func:`build_ablation_table`): one row per variant of one method,
  the full method first.

A cell averages only records that are seeds of one configuration: same identity but for the seed
(``RunRecord.group_fingerprint``). Runs with changed config fields get their own row, labelled by
what was changed ("CSP (lr=5e-05)"); records that would still share a cell while differing in
anything else (weights, dataset version, protocol, ...) are split into rows tagged with their
fingerprint, and the table's ``notes`` name the differing fields. Backbones are never mixed
either: one table per backbone (:func:`split_by_backbone`) or the backbone in the row label.

Values are shown ×100 with one decimal. The std is the sample std (ddof=1) over seeds and is
shown only with ≥ 2 seeds; published rows show the std the paper reports, if any. Bold marks
every cell whose *displayed* mean equals the column's best, so displayed ties are all bold, and is
skipped in columns with fewer than two values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from czsl_bench.records import HIGHER_IS_BETTER, RunRecord

DEFAULT_METRICS = ("best_seen", "best_unseen", "best_hm", "auc")
METRIC_LABELS = {
    "best_seen": "S", "best_unseen": "U", "best_hm": "HM", "auc": "AUC",
    "attr_acc": "Attr", "obj_acc": "Obj", "hm_seen": "S@HM", "hm_unseen": "U@HM", "bias": "Bias",
}
# Display names and the order of the papers' tables; unknown names sort after these, alphabetically.
METHOD_LABELS = {
    "clip": "CLIP", "clip-zs": "CLIP", "coop": "CoOp", "csp": "CSP", "plid": "PLID",
    "troika": "Troika", "cluspro": "ClusPro", "lazsl": "LaZSL", "vpcmjl": "VP-CMJL", "cams": "CAMS",
}
DATASET_LABELS = {"mit-states": "MIT-States", "ut-zappos": "UT-Zappos", "cgqa": "C-GQA", "synthetic": "Synthetic"}
METHOD_ORDER = ("clip", "clip-zs", "coop", "csp", "plid", "troika", "cluspro", "vpcmjl", "cams")
DATASET_ORDER = ("mit-states", "ut-zappos", "cgqa", "synthetic")
FULL_VARIANT = "full"  # the ablation table's name for the method as published (variant None)
PAPER_SUFFIX = " (paper)"
REFERENCE_SUFFIX = " (reference)"
BACKBONE_MODES = ("tables", "column")
TABLE_FORMATS = ("markdown", "latex", "csv", "html")


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def _ordered(names: Iterable[str], canonical: Sequence[str], requested: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(names))
    if requested:
        return [n for n in requested if n in present]
    rank = {n: i for i, n in enumerate(canonical)}
    return sorted(present, key=lambda n: (rank.get(n, len(rank)), n))


@dataclass
class ResultTable:
    """A wide result table: ``mean``/``std``/``n`` share the index (row labels) and the columns
    (MultiIndex dataset label × metric label). Values are percentages (×100).

    ``rows`` keeps, per row label, the record key it came from: ``(kind, name)`` with kind
    ``"run"``, ``"paper"`` or ``"variant"``.
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    setting: str
    split: str
    metrics: tuple[str, ...]
    rows: dict[str, tuple[str, str]]
    title: str = ""
    notes: list[str] = field(default_factory=list)  # configurations kept apart, and why
    # (row, dataset label) -> (seeds present, seeds a sweep planned): cells of a sweep not yet complete
    partial: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.mean.empty

    def best_mask(self, decimals: int = 1) -> pd.DataFrame:
        """True where the displayed mean is the best of its column (ties all True)."""
        mask = pd.DataFrame(False, index=self.mean.index, columns=self.mean.columns)
        for col in self.mean.columns:
            values = self.mean[col].round(decimals)
            if values.notna().sum() < 2:
                continue
            metric = self._metric_of(col)
            best = values.max() if HIGHER_IS_BETTER.get(metric, True) else values.min()
            mask[col] = values == best
        return mask

    def _metric_of(self, col: tuple[str, str]) -> str:
        label = col[1]
        for name in self.metrics:
            if METRIC_LABELS.get(name, name) == label:
                return name
        return label


# -- building ---------------------------------------------------------------------------------------


def records_frame(records: Iterable[RunRecord], split: str = "test",
                  metrics: Sequence[str] = DEFAULT_METRICS) -> pd.DataFrame:
    """Long frame: one row per record × metric with the value (and published std) in %."""
    rows = []
    for rec in records:
        values = rec.metrics.get(split, {})
        stds = rec.metrics_std.get(split, {})
        for metric in metrics:
            if metric not in values:
                continue
            std = stds.get(metric)
            rows.append({
                "method": rec.method, "variant": rec.variant, "dataset": rec.dataset,
                "setting": rec.setting, "seed": rec.seed, "source": rec.source, "metric": metric,
                "value": 100.0 * values[metric],
                "reported_std": math.nan if std is None else 100.0 * std,
                "reported_n": rec.n_seeds,
                "group": rec.group_fingerprint or "paper", "changed": changed_label(rec),
                "backbone": backbone_of(rec),
            })
    columns = ["method", "variant", "dataset", "setting", "seed", "source", "metric", "value",
               "reported_std", "reported_n", "group", "changed", "backbone"]
    return pd.DataFrame(rows, columns=columns)


def changed_label(rec: RunRecord) -> str:
    """``"lr=5e-05, template=..."``: the config fields a run changed from its recipe's defaults."""
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(rec.overrides.items()))


def _short(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def backbone_of(rec: RunRecord) -> str:
    """``arch-tag`` of the backbone a record ran on ("" for published rows that do not say)."""
    from czsl_bench.identity import backbone_label

    if rec.source == "paper" and not rec.backbone:
        return ""
    return backbone_label(rec.backbone or {})


def split_by_backbone(records: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Run records per backbone label (published rows join every table)."""
    runs = [r for r in records if r.source != "paper"]
    papers = [r for r in records if r.source == "paper"]
    out: dict[str, list[RunRecord]] = {}
    for rec in runs:
        out.setdefault(backbone_of(rec), []).append(rec)
    return {label: recs + papers for label, recs in sorted(out.items())} or ({"": papers} if papers else {})


def _dedupe(records: Iterable[RunRecord]) -> list[RunRecord]:
    """One record per key (a run's fingerprint). Two files holding the same run: the one at its
    canonical path wins (else the newer), and the warning names both files."""
    by_key: dict[tuple, RunRecord] = {}
    for rec in records:
        old = by_key.get(rec.key)
        if old is None:
            by_key[rec.key] = rec
            continue
        keep = _preferred(old, rec)
        drop = rec if keep is old else old
        warnings.warn(f"two records of {rec.describe()}: {_where(keep)} and {_where(drop)}; "
                      f"using {_where(keep)}", stacklevel=3)
        by_key[rec.key] = keep
    return list(by_key.values())


def _where(rec: RunRecord) -> str:
    return str(getattr(rec, "source_path", None) or "(in memory)")


def _preferred(a: RunRecord, b: RunRecord) -> RunRecord:
    def canonical(rec: RunRecord) -> bool:
        path = getattr(rec, "source_path", None)
        return path is not None and Path(path).name == f"seed{rec.seed}.json"

    if canonical(a) != canonical(b):
        return a if canonical(a) else b
    return b if (b.created or "") >= (a.created or "") else a


def _separate_configurations(long: pd.DataFrame, what: str) -> list[str]:
    """Give every configuration its own row: where one row label would hold records of several
    identities (beyond the seed) in one dataset column, tag each with its group fingerprint and
    return notes naming the differing fields."""
    from czsl_bench.identity import differing_fields

    notes: list[str] = []
    runs = long[long["source"] == "run"]
    for (row, dataset), cell in runs.groupby(["row", "dataset"], sort=False):
        groups = list(dict.fromkeys(cell["group"]))
        if len(groups) < 2:
            continue
        idents = [long.attrs["identities"][g] for g in groups]
        fields = differing_fields(idents)
        for g in groups:
            tagged = (long["row"] == row) & (long["group"] == g)
            long.loc[tagged, "row"] = f"{row} [{g[:8]}]"
        notes.append(f"{row} on {dataset_label(dataset)}: {len(groups)} {what} differ in "
                     f"{', '.join(fields) or 'their fingerprint'}; shown as separate rows "
                     f"{', '.join('[' + g[:8] + ']' for g in groups)}, never averaged")
    return notes


def _identities(records: Iterable[RunRecord]) -> dict[str, dict]:
    out = {}
    for rec in records:
        if rec.source == "run" and rec.identity:
            out[rec.group_fingerprint] = rec.run_identity.without_seed()
    return out


def _aggregate(long: pd.DataFrame, row_col: str) -> pd.DataFrame:
    """mean / std / n per (row, dataset, metric); published rows keep their own std and n."""
    grouped = long.groupby([row_col, "dataset", "metric"], sort=False, dropna=False)
    out = grouped.agg(
        mean=("value", "mean"),
        std=("value", lambda v: v.std(ddof=1) if len(v) >= 2 else math.nan),
        n=("value", "size"),
        reported_std=("reported_std", "first"),
        reported_n=("reported_n", "first"),
        source=("source", "first"),
    ).reset_index()
    out["n"] = out["n"].astype(float)
    out["reported_n"] = pd.to_numeric(out["reported_n"], errors="coerce").astype(float)
    paper = out["source"] == "paper"
    out.loc[paper, "std"] = out.loc[paper, "reported_std"]
    out.loc[paper, "n"] = out.loc[paper, "reported_n"]
    return out


def _assemble(agg: pd.DataFrame, row_order: list[str], dataset_order: list[str],
              metrics: Sequence[str], setting: str, split: str, rows: dict[str, tuple[str, str]],
              title: str, row_title: str = "Method") -> ResultTable:
    columns = pd.MultiIndex.from_tuples(
        [(dataset_label(d), METRIC_LABELS.get(m, m)) for d in dataset_order for m in metrics],
        names=[row_title, None],
    )
    frames = {}
    for stat in ("mean", "std", "n"):
        frame = pd.DataFrame(math.nan, index=pd.Index(row_order), columns=columns, dtype=float)
        for rec in agg.itertuples(index=False):
            key = (dataset_label(rec.dataset), METRIC_LABELS.get(rec.metric, rec.metric))
            if rec.row in frame.index and key in frame.columns:
                value = getattr(rec, stat)
                frame.loc[rec.row, key] = math.nan if value is None else float(value)
        frames[stat] = frame
    return ResultTable(frames["mean"], frames["std"], frames["n"], setting, split, tuple(metrics), rows, title)


def build_table(
    records: Iterable[RunRecord],
    setting: str = "closed",
    *,
    split: str = "test",
    datasets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    with_reported: bool = False,
    reference: Iterable[RunRecord] = (),
    backbone_in_label: bool | None = None,
    expected: dict[str, set[int]] | None = None,
) -> ResultTable:
    """The main table: one row per method configuration (runs of the recipe defaults are the
    plain "CSP" row; runs with changed fields get "CSP (lr=5e-05)"), columns per dataset × metric.
    With ``with_reported`` a paper row follows each method ("CSP (paper)"); ``reference`` records
    (the project's committed runs) follow as "CSP (reference)".

    ``backbone_in_label`` appends the backbone to every row label (default: only when the
    records span several backbones, so they are never averaged together). Ablation runs
    (``variant`` set) are left out; see :func:`build_ablation_table`. ``expected`` maps group
    fingerprints to the seeds a sweep planned (czsl_bench.sweep.expected_seeds): a cell holding
    fewer of them is marked partial, ``(k/n)`` after its value.
    """
    def wanted(r: RunRecord) -> bool:
        return (r.setting == setting and r.variant is None
                and (not datasets or r.dataset in datasets) and (not methods or r.method in methods))

    runs = [r for r in _dedupe(records) if wanted(r) and (r.source == "run" or (with_reported and r.source == "paper"))]
    refs = [r for r in _dedupe(reference) if wanted(r) and r.source == "run"]
    long = records_frame(runs, split, metrics)
    ref_long = records_frame(refs, split, metrics)
    ref_long["source"] = "reference"
    long = pd.concat([long, ref_long], ignore_index=True) if not ref_long.empty else long
    if long.empty:
        return _assemble(long.assign(row=[]), [], [], metrics, setting, split, {}, "")
    long.attrs["identities"] = {**_identities(runs), **_identities(refs)}
    run_backbones = set(long.loc[long["source"] != "paper", "backbone"])
    with_backbone = len(run_backbones) > 1 if backbone_in_label is None else backbone_in_label
    suffix = {"run": "", "paper": PAPER_SUFFIX, "reference": REFERENCE_SUFFIX}

    def label(method: str, changed: str, backbone: str, source: str) -> str:
        text = method_label(method)
        if changed:
            text += f" ({changed})"
        if with_backbone and backbone and source != "paper":
            text += f" · {backbone}"
        return text + suffix[source]

    long["row"] = [label(m, c, b, s) for m, c, b, s in zip(long["method"], long["changed"], long["backbone"], long["source"])]
    notes = _separate_configurations(long, "configurations")
    # run rows of one method first (plain, then changed configs), then its reference and paper rows
    method_order = _ordered(long["method"], METHOD_ORDER, methods)
    source_rank = {"run": 0, "reference": 1, "paper": 2}
    order = (long.assign(_m=long["method"].map({m: i for i, m in enumerate(method_order)}),
                         _s=long["source"].map(source_rank), _c=long["changed"] != "")
             .sort_values(["_m", "_c", "_s", "backbone", "row"], kind="stable"))
    rows: dict[str, tuple[str, str]] = {}
    for row, method, source in zip(order["row"], order["method"], order["source"]):
        rows.setdefault(row, ("run" if source == "reference" else source, method))
    dataset_order = _ordered(long["dataset"], DATASET_ORDER, datasets)
    agg = _aggregate(long, "row")
    title = f"{setting} world, {split} split"
    table = _assemble(agg, list(rows), dataset_order, metrics, setting, split, rows, title)
    table.notes = notes
    if expected:
        table.partial = _partial_cells(long, expected)
        if table.partial:
            table.notes.append("(k/n): k of the n seeds a sweep planned are recorded; the others are still "
                               "queued, running or failed (czsl-bench jobs)")
    return table


def _partial_cells(long: pd.DataFrame, expected: dict[str, set[int]]) -> dict[tuple[str, str], tuple[int, int]]:
    out = {}
    runs = long[long["source"] == "run"]
    for (row, dataset), cell in runs.groupby(["row", "dataset"], sort=False):
        present = {int(s) for s in cell["seed"].dropna()}
        wanted = set().union(*(expected.get(g, set()) for g in set(cell["group"])))
        if wanted - present:
            out[(row, dataset_label(dataset))] = (len(present), len(present | wanted))
    return out


def build_ablation_table(
    records: Iterable[RunRecord | tuple[str, RunRecord]],
    method: str,
    setting: str = "closed",
    *,
    split: str = "test",
    datasets: Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    variant_order: Sequence[str] | None = None,
    with_reported: bool = False,
    papers: Iterable[RunRecord] = (),
) -> ResultTable:
    """The ablation view: one row per variant of ``method`` (the full method first, named
    ``"full"``), columns per dataset × metric, mean ± std over seeds.

    ``records`` are ``(point name, record)`` pairs from :mod:`czsl_bench.ablation` (which finds
    each grid point's records by config, so one record may serve several points), or plain
    records named by their variant label. ``variant_order`` fixes the row order. With
    ``with_reported`` the paper's row of a variant (published ablation records in ``papers`` or
    ``records``, and the main published row for ``full``) follows it ("k-1 (paper)").
    """
    labelled: list[tuple[str, RunRecord]] = []
    for item in records:
        if not isinstance(item, tuple) and item.method != method:
            continue  # plain records: only ``method``'s (pairs may name an equivalent method's)
        name, rec = item if isinstance(item, tuple) else (item.variant or FULL_VARIANT, item)
        labelled.append((name, rec))
    labelled += [(r.variant or FULL_VARIANT, r) for r in papers]
    seen: set[tuple] = set()
    selected: list[tuple[str, RunRecord]] = []
    for name, rec in labelled:
        if (rec.setting != setting or (datasets and rec.dataset not in datasets)
                or (rec.source == "paper" and (not with_reported or rec.method != method))):
            continue
        if (name, rec.key) in seen:
            continue
        seen.add((name, rec.key))
        selected.append((name, rec))
    frames = []
    for name, rec in selected:
        frame = records_frame([rec], split, metrics)
        frame["variant_name"] = name
        frames.append(frame)
    long = pd.concat(frames, ignore_index=True) if frames else records_frame([], split, metrics)
    if long.empty:
        return _assemble(long.assign(row=[]), [], [], metrics, setting, split, {}, "", row_title="Variant")
    long.attrs["identities"] = _identities([rec for _, rec in selected])
    long["row"] = [v + (PAPER_SUFFIX if src == "paper" else "") for v, src in zip(long["variant_name"], long["source"])]
    notes = _separate_configurations(long, "configurations")
    present = list(dict.fromkeys(long["variant_name"]))
    variants = [FULL_VARIANT] if FULL_VARIANT in present else []
    rest = [v for v in present if v != FULL_VARIANT]
    if variant_order:
        rank = {v: i for i, v in enumerate(variant_order)}
        rest.sort(key=lambda v: (rank.get(v, len(rank)), v))
    else:
        rest.sort()
    variants += rest
    rows: dict[str, tuple[str, str]] = {}
    for variant in variants:
        for row in dict.fromkeys(long.loc[(long["variant_name"] == variant) & (long["source"] == "run"), "row"]):
            rows[row] = ("variant", variant)
        if ((long["variant_name"] == variant) & (long["source"] == "paper")).any():
            rows[variant + PAPER_SUFFIX] = ("paper", variant)
    dataset_order = _ordered(long["dataset"], DATASET_ORDER, datasets)
    agg = _aggregate(long, "row")
    title = f"{method_label(method)} ablations, {setting} world, {split} split"
    table = _assemble(agg, list(rows), dataset_order, metrics, setting, split, rows, title, row_title="Variant")
    table.notes = notes
    return table


# -- rendering --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CellStyle:
    pm: str
    missing: str


_STYLES = {
    "markdown": _CellStyle(pm=" ± ", missing="–"),
    "latex": _CellStyle(pm=r" $\pm$ ", missing="--"),
    "html": _CellStyle(pm=" ± ", missing="–"),
}


def _cell(mean: float, std: float, style: _CellStyle, decimals: int) -> str:
    if mean is None or math.isnan(mean):
        return style.missing
    text = f"{mean:.{decimals}f}"
    if std is not None and not math.isnan(std):
        text += f"{style.pm}{std:.{decimals}f}"
    return text


def _cells(table: ResultTable, fmt: str, decimals: int) -> pd.DataFrame:
    style = _STYLES[fmt]
    out = pd.DataFrame("", index=table.mean.index, columns=table.mean.columns, dtype=object)
    for col in table.mean.columns:
        for row in table.mean.index:
            text = _cell(table.mean.loc[row, col], table.std.loc[row, col], style, decimals)
            if (row, col[0]) in table.partial and text != style.missing:
                text += " ({}/{})".format(*table.partial[(row, col[0])])
            out.loc[row, col] = text
    return out


def to_markdown(table: ResultTable, decimals: int = 1) -> str:
    """GitHub Markdown (tabulate); headers "MIT-States S", best per column in ``**bold**``."""
    from tabulate import tabulate

    cells = _cells(table, "markdown", decimals)
    best = table.best_mask(decimals)
    headers = [table.mean.columns.names[0] or ""] + [f"{d} {m}" for d, m in table.mean.columns]
    body = []
    for row in cells.index:
        body.append([row] + [
            f"**{cells.loc[row, col]}**" if best.loc[row, col] else cells.loc[row, col]
            for col in cells.columns
        ])
    text = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=("left",) + ("right",) * len(cells.columns)) + "\n"
    return text + "".join(f"\nNote: {note}\n" for note in table.notes)


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                       ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"),
                       ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
        text = text.replace(char, repl)
    return text


def to_latex(table: ResultTable, decimals: int = 1) -> str:
    """A booktabs ``tabular`` (pandas Styler): dataset groups as ``\\multicolumn`` headers with
    ``\\cmidrule`` under each, best per column in ``\\textbf{}``. Needs ``\\usepackage{booktabs}``."""
    cells = _cells(table, "latex", decimals)
    best = table.best_mask(decimals)
    cells.index = [_latex_escape(str(i)) for i in cells.index]
    best.index = cells.index
    top = [_latex_escape(str(d)) for d in cells.columns.get_level_values(0)]
    cells.columns = pd.MultiIndex.from_arrays(
        [top, list(cells.columns.get_level_values(1))],
        names=[table.mean.columns.names[0], None],
    )
    best.columns = cells.columns
    styler = cells.style.apply(
        lambda frame: best.map(lambda is_best: "textbf:--rwrap;" if is_best else ""), axis=None
    )
    n_cols = len(cells.columns)
    latex = styler.to_latex(hrules=True, column_format="l" + "c" * n_cols, multicol_align="c")
    return _add_cmidrules(latex, cells.columns) + "".join(f"% Note: {note}\n" for note in table.notes)


def _add_cmidrules(latex: str, columns: pd.MultiIndex) -> str:
    """Insert ``\\cmidrule(lr){a-b}`` under each dataset header (booktabs grouping)."""
    spans, start = [], 2
    for _, group in _runs(list(columns.get_level_values(0))):
        spans.append((start, start + group - 1))
        start += group
    rules = " ".join(f"\\cmidrule(lr){{{a}-{b}}}" for a, b in spans)
    lines = latex.splitlines()
    if spans and "\\toprule" in lines:
        header = lines.index("\\toprule") + 1  # the dataset header line
        lines.insert(header + 1, rules)
    return "\n".join(lines) + "\n"


def _runs(values: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for value in values:
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1] + 1)
        else:
            out.append((value, 1))
    return out


def to_html(table: ResultTable, decimals: int = 1) -> str:
    """An HTML ``<table>`` (pandas Styler) with the best per column in bold; stable ids."""
    cells = _cells(table, "html", decimals)
    best = table.best_mask(decimals)
    styler = cells.style.apply(
        lambda frame: best.map(lambda is_best: "font-weight: bold" if is_best else ""), axis=None
    ).set_uuid("czsl")
    if table.title:
        styler = styler.set_caption(table.title)
    return styler.to_html()


def to_csv(table: ResultTable) -> str:
    """Tidy CSV, one line per row × dataset × metric: mean and std in %, unrounded, and n seeds."""
    kind = table.mean.columns.names[0] or "row"
    lines = []
    for row in table.mean.index:
        source, name = table.rows.get(row, ("run", row))
        for col in table.mean.columns:
            mean = table.mean.loc[row, col]
            if math.isnan(mean):
                continue
            std = table.std.loc[row, col]
            n = table.n.loc[row, col]
            lines.append({
                kind.lower(): row, "name": name, "source": "run" if source == "variant" else source,
                "dataset": col[0], "metric": col[1], "setting": table.setting, "split": table.split,
                "mean": round(float(mean), 6), "std": None if math.isnan(std) else round(float(std), 6),
                "n": None if math.isnan(n) else int(n),
            })
    columns = [kind.lower(), "name", "source", "dataset", "metric", "setting", "split", "mean", "std", "n"]
    frame = pd.DataFrame(lines, columns=columns)
    frame["n"] = frame["n"].astype("Int64")
    return frame.to_csv(index=False, lineterminator="\n")


def render(table: ResultTable, fmt: str, decimals: int = 1) -> str:
    """Render ``table`` as ``markdown``, ``latex``, ``csv`` or ``html``."""
    if fmt == "markdown":
        return to_markdown(table, decimals)
    if fmt == "latex":
        return to_latex(table, decimals)
    if fmt == "html":
        return to_html(table, decimals)
    if fmt == "csv":
        return to_csv(table)
    raise ValueError(f"unknown table format {fmt!r}; use one of {', '.join(TABLE_FORMATS)}")
