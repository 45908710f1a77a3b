"""``czsl-bench ablate``: run the ablation grid a method declares, then table and plot it.

The grid is ``Method.ablations()`` (name -> config overrides). Ablations whose resolved config is
identical to an earlier one (for ClusPro: ``mu-0.99`` and ``k-5`` are the full method) are run
once; the alias gets a copy of the record with its own variant name and a note saying so, so the
table and the plot show every grid point without training the same configuration twice.
Finished runs are skipped (``--skip-existing`` semantics, always on).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click


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
def ablate(method, dataset, seed, only, setting, backbone, pretrained, overrides, results_dir, plot_path,
           fmt, device, data_root, cache_dir, quiet):
    """Run METHOD's ablation grid on one dataset and seeds; print the table, write the plot.

    \b
    Examples:
      czsl-bench ablate cluspro --dataset synthetic --seed 0,1,2
      czsl-bench ablate cluspro --dataset ut-zappos --only full,base,no-pcl,no-pdl
      czsl-bench table --ablation cluspro --format latex     # the table again, from the records
    """
    from czsl_bench import api
    from czsl_bench.config import ConfigError, config_to_dict, parse_overrides
    from czsl_bench.registry import METHODS, RegistryError

    try:
        cls = METHODS.get(method)
        grid = cls.ablations()
        if not grid:
            raise click.UsageError(f"method {method!r} declares no ablations; nothing to run")
        names = list(grid)
        if only:
            wanted = [n.strip() for n in only.split(",") if n.strip()]
            unknown = [n for n in wanted if n not in grid]
            if unknown:
                raise click.BadParameter(f"unknown ablation(s) {', '.join(unknown)}; {method} has "
                                         f"{', '.join(names)}", param_hint="--only")
            names = [n for n in names if n in wanted]
        parse_overrides(list(overrides), cls.Config)
        specs, missing = api.plan(method, dataset, seed, setting, data_root)
        # one training per distinct resolved config; later duplicates become aliases
        runs: dict[str, str] = {}  # ablation -> the ablation whose run it reuses (itself if none)
        by_config: dict[str, str] = {}
        keys: dict[str, str] = {}
        for name in names:
            cfg = api.resolve_method_config(cls, dataset, list(overrides), name)
            keys[name] = repr(sorted(config_to_dict(cfg).items()))
            runs[name] = by_config.setdefault(keys[name], name)
        # records of other runs with the identical config: the plain method (variant None) and
        # methods the plugin declares equivalent to an ablation (ClusPro: base = cluspro-base)
        existing: dict[str, tuple[str, str | None]] = {}
        plain_key = repr(sorted(config_to_dict(api.resolve_method_config(cls, dataset, list(overrides))).items()))
        equivalents = getattr(cls, "ablation_equivalents", lambda: {})()
        for name in names:
            if keys[name] == plain_key:
                existing[name] = (method, None)
            elif name in equivalents:
                other = METHODS.get(equivalents[name])
                other_cfg = api.resolve_method_config(other, dataset, list(overrides))
                if repr(sorted(config_to_dict(other_cfg).items())) == keys[name]:
                    existing[name] = (equivalents[name], None)
    except (RegistryError, ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    for name, how in missing.items():
        raise click.ClickException(f"dataset {name} is not on disk; {how}")

    from czsl_bench.cli.progress import RichProgress
    from czsl_bench.records import is_finished, read_record, record_path, write_record

    todo = [n for n in names if runs[n] == n]
    failed = 0
    started = time.perf_counter()
    with RichProgress(enabled=not quiet) as progress:
        with progress.task("ablation runs", total=len(todo) * len(specs)) as overall:
            for name in todo:
                opts = api.RunOptions(backbone=backbone, pretrained=pretrained, overrides=list(overrides),
                                      ablation=name, results_dir=results_dir, skip_existing=True,
                                      device=device, data_root=data_root, cache_dir=cache_dir,
                                      progress=progress)
                for spec in specs:
                    overall.update(description=f"{name}: {spec.describe()}")
                    if name in existing and _copy_existing(existing[name], method, name, dataset, spec,
                                                           results_dir):
                        progress.print(f"{name} seed{spec.seed}: same configuration as "
                                       f"{existing[name][0]} (plain run); record copied")
                        overall.advance()
                        continue
                    outcome = api.execute(spec, opts)
                    state = "skipped (exists)" if outcome.skipped else f"{outcome.seconds:.1f} s"
                    if outcome.error is not None:
                        failed += 1
                        progress.print(f"FAILED {name} seed{spec.seed}: {outcome.error}")
                    else:
                        test = outcome.records[0].metrics.get("test", {})
                        progress.print(f"{name} seed{spec.seed}: AUC {100 * test.get('auc', float('nan')):.2f} "
                                       f"HM {100 * test.get('best_hm', float('nan')):.2f} [{state}]")
                    overall.advance()
    # aliases: copy the record of the identical configuration under the alias' name
    for name in names:
        source = runs[name]
        if source == name:
            continue
        for spec in specs:
            for s in spec.settings:
                src = record_path(results_dir, method, dataset, s, spec.seed, source)
                dst = record_path(results_dir, method, dataset, s, spec.seed, name)
                if is_finished(src) and not is_finished(dst):
                    rec = read_record(src)
                    note = f"identical configuration to ablation {source!r}: record copied, not re-run"
                    write_record(dataclasses.replace(rec, variant=name, notes=note), results_dir)
    click.echo(f"{len(todo) * len(specs) - failed}/{len(todo) * len(specs)} runs ok "
               f"({len(names) - len(todo)} aliases), {time.perf_counter() - started:.1f} s", err=True)

    _print_table_and_plot(cls, method, dataset, setting, results_dir, plot_path, fmt, names)
    if failed:
        sys.exit(1)


def _copy_existing(source: tuple[str, str | None], method: str, name: str, dataset: str, spec,
                   results_dir: Path) -> bool:
    """Copy finished records of an identical configuration (another method or the plain run)
    to the ablation's path; True when every setting of ``spec`` is now covered."""
    from czsl_bench.records import is_finished, read_record, record_path, write_record

    src_method, src_variant = source
    done = True
    for s in spec.settings:
        dst = record_path(results_dir, method, dataset, s, spec.seed, name)
        if is_finished(dst):
            continue
        src = record_path(results_dir, src_method, dataset, s, spec.seed, src_variant)
        if not is_finished(src):
            done = False
            continue
        rec = read_record(src)
        note = (f"identical configuration to {src_method}"
                + (f" ablation {src_variant!r}" if src_variant else "") + ": record copied, not re-run")
        write_record(dataclasses.replace(rec, method=method, variant=name, notes=note), results_dir)
    return done


def _print_table_and_plot(cls, method: str, dataset: str, setting: str, results_dir: Path,
                          plot_path: Path | None, fmt: str, names: list[str]) -> None:
    from czsl_bench.plots import ablation_sweep_figure
    from czsl_bench.records import load_records
    from czsl_bench.tables import build_ablation_table, render

    records = [r for r in load_records(results_dir, exclude=("reported",), on_error=lambda p, why: None)
               if r.method == method and r.dataset == dataset]
    settings = ("closed", "open") if setting == "both" else (setting,)
    for s in settings:
        table = build_ablation_table(records, method, s, datasets=[dataset], variant_order=list(cls.ablations()))
        if not table.empty:
            click.echo(render(table, fmt), nl=False)
    sweeps = getattr(cls, "ablation_sweeps", lambda: {})()
    if sweeps:
        target = plot_path or results_dir / method / dataset / "ablation-auc.png"
        try:
            path = ablation_sweep_figure(records, method, dataset, sweeps, target, setting=settings[0])
        except ValueError as exc:
            click.echo(f"no plot: {exc}", err=True)
        else:
            click.echo(f"wrote {path}", err=True)
