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
@click.option("--results-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("results"),
              show_default=True, help="Where run records live.")
@click.option("--reported-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where published rows live  [default: RESULTS_DIR/reported]")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the table to this file (atomically) instead of stdout.")
def table(fmt: str, setting: str, split: str, datasets: tuple[str, ...], methods: tuple[str, ...],
          with_reported: bool, ablation: str | None, results_dir: Path, reported_dir: Path | None,
          output: Path | None) -> None:
    """Print a result table: one row per method, S/U/HM/AUC per dataset, mean ± std over seeds.

    Values are percentages with one decimal; the std (over >= 2 seeds) follows the mean; the best
    value of each column is bold. Built only from the JSON records under RESULTS_DIR.

    \b
    Examples:
      czsl-bench table --with-reported
      czsl-bench table --format latex --setting open --datasets mit-states,ut-zappos > table.tex
      czsl-bench table --ablation cluspro --format latex
    """
    from czsl_bench.records import atomic_write_text, load_records
    from czsl_bench.tables import build_ablation_table, build_table, render

    dataset_list, method_list = _names(datasets), _names(methods)
    if ablation and method_list:
        raise click.UsageError("--ablation METHOD already picks the method; drop --methods")

    def warn(path: Path, reason: str) -> None:
        click.echo(f"Warning: skipping {path}: {reason}", err=True)

    records = load_records(results_dir, exclude=("reported",), on_error=warn)
    if with_reported:
        records += [r for r in load_records(reported_dir or results_dir / "reported", on_error=warn)
                    if r.source == "paper"]

    if ablation:
        variant_order = _ablation_order(ablation)
        result = build_ablation_table(records, ablation, setting, split=split, datasets=dataset_list,
                                      variant_order=variant_order, with_reported=with_reported)
    else:
        result = build_table(records, setting, split=split, datasets=dataset_list, methods=method_list,
                             with_reported=with_reported)
    if result.empty:
        raise click.ClickException(_nothing_found(results_dir, setting, split, dataset_list, method_list, ablation))
    text = render(result, fmt)
    if output is not None:
        atomic_write_text(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def _ablation_order(method: str) -> list[str] | None:
    """The order of the method's declared ablations, when the method plugin loads; else by name."""
    try:
        from czsl_bench.registry import METHODS

        return list(METHODS.get(method).ablations())
    except Exception:  # a table is built from records alone; the plugin is only a hint for order
        return None


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
        f"no {what}{where} under {results_dir}/ (looked for {results_dir}/<method>/<dataset>/{setting}/"
        f"seed<k>.json); produce some with `czsl-bench run METHOD --dataset NAME --setting {setting}`"
        + ", or add --with-reported to show the published numbers"
    )
