"""``czsl-bench run``: run methods on datasets over seeds, evaluate, write run records.

Thin layer over :mod:`czsl_bench.api`: parses options, draws rich progress bars on stderr,
prints one summary line per run on stdout and sets the exit code (0 all runs succeeded or were
skipped, 1 a run failed, 2 usage error). torch is imported only inside the command body.
"""

from __future__ import annotations

import os
import sys
import time

import click

from czsl_bench.cli.params import FINITE_FLOAT
from czsl_bench.cli.executor import check_executor_options, executor_options, slurm_settings


def _workers(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    if value == "auto":
        return None
    try:
        workers = int(value)
    except ValueError:
        workers = -1
    if workers < 0:
        raise click.BadParameter(f"{value!r} is not a worker count; pass 0, 1, 2, ... or auto", ctx=ctx, param=param)
    return workers


def _split_seed(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    from czsl_bench.api import parse_seeds

    try:
        return parse_seeds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command(context_settings={"show_default": True})
@click.argument("methods", metavar="METHOD[,METHOD...]")
@click.option("--dataset", "-d", required=True, metavar="NAME[,NAME...]|all",
              help="Dataset(s) to run on; `all` = every dataset present on disk.")
@click.option("--seed", "-s", default="0", callback=_split_seed, metavar="SEEDS",
              help="Seeds: 0,1,2 or a range 0-4.")
@click.option("--setting", type=click.Choice(["closed", "open", "both"]), default="closed",
              help="Evaluation setting; `both` trains once and writes one record per setting.")
@click.option("--backbone", metavar="ARCH", default=None,
              help="open_clip architecture [default: the dataset's; ViT-L-14-quickgelu for real data].")
@click.option("--pretrained", metavar="TAG|PATH|none", default=None,
              help="Weights: an open_clip tag, a checkpoint path, or none (random).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a method config field (repeatable), e.g. --set lr=1e-4.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML/JSON/TOML file of method config values (below --set).")
@click.option("--ablation", default=None, metavar="NAME", help="Run a named ablation of the method.")
@click.option("--results-dir", type=click.Path(file_okay=False), default="results",
              help="Where run records are written.")
@click.option("--skip-existing", is_flag=True, help="Skip runs whose record already exists.")
@click.option("--resume", is_flag=True, help="Continue training from the last epoch checkpoint.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--deterministic", is_flag=True, help="Deterministic torch kernels (slower on GPU).")
@click.option("--threshold", type=FINITE_FLOAT, default=None,
              help="Open world: use this feasibility threshold instead of searching it on val.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Dataset root (default: $CZSL_DATA/<name> or the dataset's cache).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Feature cache folder.")
@click.option("--workers", default="auto", callback=_workers, metavar="N|auto",
              help="DataLoader worker processes for decoding and batching images (0 = the main "
                   "process); auto fits the machine's cores (docs/methods.md, 'Input pipeline').")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@executor_options
def run(methods, dataset, seed, setting, backbone, pretrained, overrides, config_file, ablation,
        results_dir, skip_existing, resume, device, deterministic, threshold, data_root, cache_dir,
        workers, quiet, executor, **slurm):
    """Run METHOD(s) on datasets and seeds; write one record per run and setting.

    \b
    Examples:
      czsl-bench run clip,coop,csp --dataset synthetic --seed 0,1,2
      czsl-bench run csp --dataset mit-states --setting both --set lr=5e-5
      czsl-bench run csp --dataset all --skip-existing
      czsl-bench run clip,csp --dataset all --seed 0-4 --executor slurm --partition gpu --gpus 1 --time 2:00:00
    """
    from czsl_bench import api
    from czsl_bench.config import ConfigError
    from czsl_bench.registry import RegistryError

    from czsl_bench.image_data import pipeline_choice

    try:
        pipeline_choice()  # a misspelt CZSL_INPUT_PIPELINE is a usage error, not a failed run
        specs, missing = api.plan(methods, dataset, seed, setting, data_root)
        # every config of the grid resolved up front: a bad --set, config file or ablation is a
        # usage error before anything trains
        api.resolve_grid(specs, list(overrides), ablation, config_file)
    except (RegistryError, ConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    check_executor_options(executor, slurm)
    for name, how in missing.items():
        click.echo(f"skipping dataset {name}: not on disk; {how}", err=True)

    opts = api.RunOptions(backbone=backbone, pretrained=pretrained, overrides=list(overrides),
                          config_file=config_file, ablation=ablation, results_dir=results_dir,
                          skip_existing=skip_existing, resume=resume, device=device,
                          deterministic=deterministic, threshold=threshold, data_root=data_root,
                          cache_dir=cache_dir, num_workers=workers)
    if executor == "slurm":
        from czsl_bench.cli.executor import slurm_config, submit_sweep

        cfg = slurm_config(**slurm_settings(slurm))
        try:
            plans = api.identify(specs, opts, world_size=cfg.nproc_per_task)  # [ddp] ddp<W> fingerprints
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        submit_sweep([(p, ablation, p.spec.method) for p in plans], opts, cfg, "run", slurm["dry_run"])
        return

    from czsl_bench.cli.progress import RichProgress

    failed = 0
    started = time.perf_counter()
    # [ddp] under torchrun the other ranks train silently; rank 0 reports (docs/distributed.md)
    silent = os.environ.get("RANK", "0").strip() not in ("", "0")
    with RichProgress(enabled=not (quiet or silent)) as progress:
        opts.progress = progress
        with progress.task("runs", total=len(specs)) as overall:
            for spec in specs:
                overall.update(description=f"run {spec.describe()}")
                outcome = api.execute(spec, opts)
                if not silent:
                    progress.print(_summary(outcome))
                failed += outcome.error is not None
                overall.advance()
    elapsed = time.perf_counter() - started
    done = len(specs) - failed
    if not silent:
        click.echo(f"{done}/{len(specs)} runs ok, {failed} failed, {elapsed:.1f} s; records in {results_dir}",
                   err=True)
    if failed:
        sys.exit(1)


def _summary(outcome) -> str:
    spec = outcome.spec
    if outcome.error is not None:
        return f"FAILED {spec.describe()}: {outcome.error}"
    parts = []
    for record in outcome.records:
        test = record.metrics.get("test", {})
        parts.append(f"{record.setting}: AUC {100 * test.get('auc', float('nan')):.2f} "
                     f"HM {100 * test.get('best_hm', float('nan')):.2f} "
                     f"S {100 * test.get('best_seen', float('nan')):.2f} "
                     f"U {100 * test.get('best_unseen', float('nan')):.2f}")
    if outcome.skipped:
        fps = ", ".join(f"{r.fingerprint[:8]} at {getattr(r, 'source_path', '?')}" for r in outcome.records)
        state = f"skipped: same fingerprint {fps}"
    else:
        state = f"{outcome.seconds:.1f} s"
    return f"{spec.method} {spec.dataset} seed{spec.seed}: {'; '.join(parts)} [{state}]"
