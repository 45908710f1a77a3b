"""``czsl-bench ablate``: run the ablation grid a method declares, then table and plot it.

A thin layer over :func:`czsl_bench.ablation.run_ablation`: grid points with the same resolved
config train once (ClusPro's ``mu-0.99`` and ``k-5`` are the full method), finished runs are
skipped by fingerprint, and the table finds each point's records by config.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from czsl_bench.cli.executor import check_executor_options, executor_options, slurm_settings


def _split_seed(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    from czsl_bench import api

    try:
        return api.parse_seeds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("method", default="cluspro")
@click.option("--dataset", "-d", required=True, metavar="NAME", help="One dataset (e.g. synthetic, ut-zappos).")
@click.option("--seed", "-s", default="0,1,2", callback=_split_seed, metavar="SEEDS",
              show_default=True, help="Seeds: 0,1,2 or 0-4.")
@click.option("--only", default=None, metavar="NAME[,NAME...]", help="Run only these ablations.")
@click.option("--setting", type=click.Choice(["closed", "open", "both"]), default="closed", show_default=True)
@click.option("--backbone", metavar="ARCH", default=None, help="open_clip architecture (default: the dataset's).")
@click.option("--pretrained", metavar="TAG|PATH|none", default=None, help="Weights of --backbone.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value for every grid point (repeatable).")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the PNG (default: RESULTS_DIR/METHOD/DATASET/ablation-auc.png).")
@click.option("--format", "fmt", type=click.Choice(["markdown", "latex", "csv", "html"]), default="markdown",
              show_default=True, help="Format of the printed table.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the datasets.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Feature cache folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@executor_options
def ablate(method, dataset, seed, only, setting, backbone, pretrained, overrides, results_dir, plot_path,
           fmt, device, data_root, cache_dir, quiet, executor, **slurm):
    """Run METHOD's ablation grid on one dataset and seeds; print the table, write the plot.

    \b
    Examples:
      czsl-bench ablate cluspro --dataset synthetic --seed 0,1,2
      czsl-bench ablate cluspro --dataset ut-zappos --only full,base,no-pcl,no-pdl
      czsl-bench table --ablation cluspro --format latex     # the table again, from the records
      czsl-bench ablate cluspro --dataset ut-zappos --executor slurm --gpus 1   # one array task per point x seed
    """
    from czsl_bench.ablation import ablation_grid, run_ablation
    from czsl_bench.cli.progress import RichProgress
    from czsl_bench.config import ConfigError
    from czsl_bench.registry import RegistryError
    from czsl_bench.tables import render

    wanted = [n.strip() for n in only.split(",")] if only else None
    try:
        points = ablation_grid(method, dataset, list(overrides), wanted)
    except (RegistryError, ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    trained = [p for p in points if p.runs_as == p.name]
    check_executor_options(executor, slurm)
    if executor == "slurm":
        _submit(method, dataset, seed, setting, trained, overrides, results_dir, backbone, pretrained, device,
                data_root, cache_dir, slurm)
        return
    started = time.perf_counter()
    with RichProgress(enabled=not quiet) as progress:
        with progress.task("ablation runs", total=len(trained) * len(seed)) as overall:
            def report(point, outcome) -> None:
                spec = outcome.spec
                if outcome.error is not None:
                    progress.print(f"FAILED {point.name} seed{spec.seed}: {outcome.error}")
                else:
                    test = outcome.records[0].metrics.get("test", {})
                    state = "skipped (same fingerprint)" if outcome.skipped else f"{outcome.seconds:.1f} s"
                    progress.print(f"{point.name} seed{spec.seed}: AUC {100 * test.get('auc', float('nan')):.2f} "
                                   f"HM {100 * test.get('best_hm', float('nan')):.2f} [{state}]")
                overall.advance()

            result = run_ablation(method, dataset, seed, setting, wanted, list(overrides), results_dir,
                                  plot_path, backbone=backbone, pretrained=pretrained, device=device,
                                  data_root=data_root, cache_dir=cache_dir, progress=progress,
                                  on_outcome=report)
    shared = {p.name: p.runs_as for p in points if p.runs_as != p.name}
    for name, other in shared.items():
        click.echo(f"{name}: same configuration as {other} (one training, shown in both rows)", err=True)
    n = len(result.outcomes)
    click.echo(f"{n - result.failed}/{n} runs ok ({len(shared)} points share a run), "
               f"{time.perf_counter() - started:.1f} s", err=True)
    for table in result.tables.values():
        click.echo(render(table, fmt), nl=False)
    if result.plot is not None:
        click.echo(f"wrote {result.plot}", err=True)
    if result.failed:
        sys.exit(1)


def _submit(method, dataset, seed, setting, trained, overrides, results_dir, backbone, pretrained, device,
            data_root, cache_dir, slurm) -> None:
    """One array task per (distinct configuration, seed) still missing its record; the table and
    plot come afterwards from the records (`czsl-bench ablate` again skips every finished run)."""
    from czsl_bench import api
    from czsl_bench.cli.executor import slurm_config, submit_sweep

    cfg = slurm_config(**slurm_settings(slurm))
    base = dict(backbone=backbone, pretrained=pretrained, overrides=list(overrides), results_dir=results_dir,
                device=device, data_root=data_root, cache_dir=cache_dir)
    plans, loaded = [], {}
    for point in trained:
        specs, missing = api.plan(point.method, dataset, seed, setting, data_root)
        for name, how in missing.items():
            raise click.ClickException(f"dataset {name} is not on disk; {how}")
        try:
            planned = api.identify(specs, api.RunOptions(**base, ablation=point.ablation), loaded,
                                   world_size=cfg.nproc_per_task)  # [ddp] ddp<W> fingerprints
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        for plan in planned:
            plans.append((plan, point.ablation, point.name if point.name != point.method else point.method))
    submit_sweep(plans, api.RunOptions(**base), cfg, "ablate", slurm["dry_run"])
    click.echo(f"when it has ended: czsl-bench ablate {method} --dataset {dataset} --seed "
               f"{','.join(map(str, seed))}{''.join(f' --set {o}' for o in overrides)} --results-dir {results_dir}   (tables and plot; finished runs are skipped)",
               err=True)
