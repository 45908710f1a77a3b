"""``czsl-bench table``: result tables from run records (never trains or evaluates)."""

from __future__ import annotations

from pathlib import Path

import click

FORMATS = ("markdown", "latex", "csv", "html")


def _names(values: tuple[str, ...]) -> list[str] | None:
    """``--datasets a,b --datasets c`` → ``["a", "b", "c"]`` (None when not given)."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return out or None


@click.command("table")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True,
              help="Output format; markdown (tabulate), latex (booktabs, needs \\usepackage{booktabs}), "
                   "csv (tidy numbers: mean, std, n), html.")
@click.option("--setting", type=click.Choice(["closed", "open"]), default="closed", show_default=True)
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Which split's metrics to show.")
@click.option("--datasets", multiple=True, metavar="NAMES",
              help="Datasets to show, comma-separated or repeated (default: all with records), in this order.")
@click.option("--methods", multiple=True, metavar="NAMES",
              help="Methods to show, comma-separated or repeated (default: all with records), in this order.")
@click.option("--with-reported", is_flag=True,
              help="Add the papers' published rows (marked 'METHOD (paper)'; with --ablation 'VARIANT (paper)').")
@click.option("--ablation", metavar="METHOD",
              help="Ablation view: one row per variant of METHOD (records written with --ablation).")
@click.option("--with-reference", is_flag=True,
              help="Add the project's committed reference runs (RESULTS_DIR/reference) as 'METHOD (reference)' "
                   "rows beside this machine's runs.")
@click.option("--by-backbone", type=click.Choice(["tables", "column"]), default="tables", show_default=True,
              help="Records of different backbones are never averaged: one table per backbone, or the "
                   "backbone in each row label.")
@click.option("--results-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("results"),
              show_default=True, help="Where run records live (the committed reference runs: results/reference).")
@click.option("--reported-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where published rows live  [default: RESULTS_DIR/reported]")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the table to this file (atomically) instead of stdout.")
def table(fmt: str, setting: str, split: str, datasets: tuple[str, ...], methods: tuple[str, ...],
          with_reported: bool, ablation: str | None, with_reference: bool, by_backbone: str,
          results_dir: Path, reported_dir: Path | None, output: Path | None) -> None:
    """Print a result table: one row per method, S/U/HM/AUC per dataset, mean ± std over seeds.

    Values are percentages with one decimal; the std (over >= 2 seeds) follows the mean; the best
    value of each column is bold. Built only from the JSON records under RESULTS_DIR. A cell
    averages only seeds of one configuration; anything else is a separate row, with a note.

    \b
    Examples:
      czsl-bench table --with-reported
      czsl-bench table --format latex --setting open --datasets mit-states,ut-zappos > table.tex
      czsl-bench table --ablation cluspro --format latex
      czsl-bench table --results-dir results/reference        # the project's reference numbers
      czsl-bench table --with-reference                       # this machine's runs beside them
    """
    from czsl_bench.records import RESERVED_NAMES, atomic_write_text, load_records
    from czsl_bench.sweep import expected_seeds
    from czsl_bench.tables import build_table, render, split_by_backbone

    dataset_list, method_list = _names(datasets), _names(methods)
    if ablation and method_list:
        raise click.UsageError("--ablation METHOD already picks the method; drop --methods")

    def warn(path: Path, reason: str) -> None:
        click.echo(f"Warning: skipping {path}: {reason}", err=True)

    records = load_records(results_dir, exclude=RESERVED_NAMES, on_error=warn)
    # sweeps under results_dir say which seeds are still to come: those cells are marked partial
    expected = expected_seeds(results_dir)
    papers = []
    if with_reported:
        papers = [r for r in load_records(reported_dir or results_dir / "reported", on_error=warn)
                  if r.source == "paper"]
    reference = load_records(results_dir / "reference", on_error=warn) if with_reference else []

    tables = []
    if ablation:
        tables.append(_ablation_table(records + reference, papers, ablation, setting, split, dataset_list,
                                      with_reported))
    else:
        groups = (split_by_backbone(records + reference + papers) if by_backbone == "tables"
                  else {"": records + reference + papers})
        ref_ids = {id(r) for r in reference}
        for label, recs in groups.items():
            result = build_table([r for r in recs if id(r) not in ref_ids], setting, split=split,
                                 datasets=dataset_list, methods=method_list, with_reported=with_reported,
                                 reference=[r for r in recs if id(r) in ref_ids],
                                 backbone_in_label=None if by_backbone == "column" else False,
                                 expected=expected)
            if not result.empty and len(groups) > 1:
                result.title = f"backbone {label}: {result.title}"
            tables.append(result)
    tables = [t for t in tables if not t.empty]
    if not tables:
        message = _nothing_found(results_dir, setting, split, dataset_list, method_list, ablation)
        if expected:
            message += f"; a sweep under {results_dir}/.sweeps has cells to come (czsl-bench jobs)"
        raise click.ClickException(message)
    parts = []
    for result in tables:
        heading = f"{result.title}\n\n" if len(tables) > 1 and fmt == "markdown" else ""
        parts.append(heading + render(result, fmt))
        if fmt not in ("markdown", "latex"):
            for note in result.notes:
                click.echo(f"Note: {note}", err=True)
    text = "\n".join(parts)
    if output is not None:
        atomic_write_text(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def _ablation_table(records, papers, method, setting, split, datasets, with_reported):
    """Rows from the method's grid when its plugin loads (each point's records found by config),
    else from the records' variant labels."""
    from czsl_bench.ablation import ablation_grid, ablation_table
    from czsl_bench.tables import build_ablation_table

    names = sorted({r.dataset for r in records if datasets is None or r.dataset in datasets})
    try:
        points = {d: ablation_grid(method, d) for d in names}
    except Exception:  # a table is built from records alone; the plugin only maps configs to rows
        return build_ablation_table([r for r in records if r.method == method], method, setting, split=split,
                                    datasets=datasets, with_reported=with_reported, papers=papers)
    return ablation_table(records + papers, method, points, setting, split=split, datasets=datasets,
                          with_reported=with_reported)


def _nothing_found(results_dir: Path, setting: str, split: str, datasets: list[str] | None,
                   methods: list[str] | None, ablation: str | None) -> str:
    what = f"{setting}-world records with {split} metrics"
    if ablation:
        what = f"{setting}-world records of {ablation} (any variant) with {split} metrics"
    filters = []
    if datasets:
        filters.append(f"datasets {','.join(datasets)}")
    if methods:
        filters.append(f"methods {','.join(methods)}")
    where = f" for {' and '.join(filters)}" if filters else ""
    return (
        f"no {what}{where} under {results_dir}/ (looked for {results_dir}/<method>/<dataset>/<backbone>/{setting}/"
        f"seed<k>.json); produce some with `czsl-bench run METHOD --dataset NAME --setting {setting}`"
        + ", or add --with-reported to show the published numbers"
    )
