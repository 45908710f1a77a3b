"""The ``--executor local|slurm`` options shared by ``run``, ``ablate`` and ``jobs resubmit``,
and the submission of a sweep (the Slurm path; local runs stay in the commands themselves)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

SLURM_FIELDS = ("partition", "time", "gpus", "cpus", "mem", "max_parallel", "nproc_per_task", "sbatch")


def _time(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from czsl_bench.slurm import SlurmError, parse_time

    try:
        return parse_time(value)
    except SlurmError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def slurm_options(func: Any) -> Any:
    """The Slurm resources of each task; each also settable in ``--slurm-config FILE``."""
    options = [
        click.option("--slurm-config", "slurm_config_file", type=click.Path(dir_okay=False), default=None,
                     help="YAML/JSON/TOML file of Slurm settings (partition, time, gpus, cpus, mem, "
                          "max_parallel, account, qos, sbatch, setup, ...); options below win."),
        click.option("--partition", "-p", default=None, help="Slurm partition of the tasks."),
        click.option("--time", "time_limit", default=None, callback=_time, metavar="MIN|HH:MM:SS",
                     help="Time limit of each task [default: 60 min]."),
        click.option("--gpus", type=int, default=None, help="GPUs per task [default: 0]."),
        click.option("--cpus", type=int, default=None, help="CPUs per task (per rank) [default: 4]."),
        click.option("--nproc-per-task", type=int, default=None, metavar="W",
                     help="Train each cell with DDP on W processes (W Slurm tasks on one node, one GPU "
                          "each with --gpus W) [default: 1]; docs/distributed.md."),
        click.option("--mem", default=None, metavar="16G", help="Memory per task (sbatch syntax)."),
        click.option("--max-parallel", type=int, default=None, metavar="N",
                     help="At most N tasks of the array run at once [default: all]."),
        click.option("--sbatch", "sbatch_options", multiple=True, metavar="--OPT[=VALUE]",
                     help="Extra sbatch option (repeatable), e.g. --sbatch=--exclude=node3."),
        click.option("--dry-run", is_flag=True, help="Print the cells and the sbatch script; submit nothing."),
        click.option("--no-probe", is_flag=True,
                     help="Skip the probe job that checks the nodes see the results folder."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def executor_options(func: Any) -> Any:
    func = slurm_options(func)
    return click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                        help="local: run here, one cell after another; slurm: one Slurm array task per cell "
                             "still missing its record (docs/cluster.md).")(func)


def slurm_config(slurm_config_file: str | None, partition: str | None, time_limit: int | None,
                 gpus: int | None, cpus: int | None, mem: str | None, max_parallel: int | None,
                 sbatch_options: tuple[str, ...], no_probe: bool = False, base: dict | None = None,
                 nproc_per_task: int | None = None) -> Any:
    """The :class:`~czsl_bench.slurm.SlurmConfig`: defaults (or ``base``, a sweep's) < file < options."""
    from czsl_bench.slurm import SlurmError, load_config

    try:
        cfg = load_config(slurm_config_file, base=base, partition=partition, time=time_limit, gpus=gpus,
                          cpus=cpus, mem=mem, max_parallel=max_parallel, nproc_per_task=nproc_per_task,
                          sbatch=list(sbatch_options) or None)
    except SlurmError as exc:
        raise click.UsageError(str(exc)) from None
    if no_probe:
        cfg.probe = False
    return cfg


def slurm_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The :func:`slurm_config` arguments among a command's keyword options."""
    names = ("slurm_config_file", "partition", "time_limit", "gpus", "cpus", "mem", "max_parallel",
             "sbatch_options", "no_probe", "nproc_per_task")
    return {name: options[name] for name in names}


def check_executor_options(executor: str, options: dict[str, Any]) -> None:
    """Slurm options given to the local executor are a usage error, not silently ignored."""
    if executor == "slurm":
        return
    given = [f"--{name.replace('_options', '').replace('_limit', '').replace('_file', '').replace('_', '-')}"
             for name, value in options.items() if value not in (None, False, ())]
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply to --executor slurm; add it or drop them")


def submit_sweep(plans: list[tuple[Any, str | None, str]], opts: Any, cfg: Any, kind: str,
                 dry_run: bool) -> None:
    """Plan a sweep of ``plans`` (``(CellPlan, ablation, label)``), check the cluster, submit the
    cells still missing a record as one array, and say how to follow it."""
    from czsl_bench import slurm
    from czsl_bench.sweep import new_sweep

    command = [Path(sys.argv[0]).name if sys.argv else "czsl-bench", *sys.argv[1:]]
    sweep = new_sweep(opts.results_dir, plans, opts, cfg.to_dict(), command, kind)
    busy = queued_elsewhere(opts.results_dir)
    todo, done, queued = [], 0, 0
    for (plan, _, _), cell in zip(plans, sweep.cells):
        if plan.done:
            done += 1
        elif tuple(sorted(cell.fingerprints.values())) in busy:
            queued += 1
        else:
            todo.append(cell.index)
    click.echo(f"sweep {sweep.id}: {len(sweep.cells)} cells, {done} with records already"
               + (f", {queued} queued by another sweep" if queued else "") + f", {len(todo)} to submit", err=True)
    if dry_run:
        for index in todo:
            cell = sweep.cells[index]
            fps = ", ".join(f"{s} {fp[:8]}" for s, fp in cell.fingerprints.items())
            ranks = f", DDP on {cfg.nproc_per_task} processes" if cfg.nproc_per_task > 1 else ""
            click.echo(f"task {todo.index(index)}: {cell.describe()} ({fps}{ranks}) -> {next(iter(cell.records.values()))}")
        if todo:
            click.echo(slurm.preview(sweep, todo, cfg), nl=False)
        click.echo("dry run: nothing submitted", err=True)
        return
    if not todo:
        click.echo("nothing to submit: every cell has its record (or is queued)", err=True)
        return
    try:
        slurm.check_cluster(cfg)
        if cfg.probe:
            answer = slurm.probe(opts.results_dir, cfg)
            click.echo(f"probe: node {answer.get('node')} sees {Path(opts.results_dir).resolve()}", err=True)
        sub = slurm.submit(sweep, todo, cfg, command)
    except slurm.SlurmError as exc:
        raise click.ClickException(str(exc)) from None
    array = sub.jobs[0].split("_")[0]
    click.echo(f"submitted job {array}: {len(todo)} task(s), at most {cfg.max_parallel or len(todo)} at once"
               + (f", {cfg.nproc_per_task} DDP ranks each" if cfg.nproc_per_task > 1 else "")
               + (f", partition {cfg.partition}" if cfg.partition else ""), err=True)
    click.echo(f"follow it: czsl-bench jobs --results-dir {opts.results_dir} --sweep {sweep.id}")


def queued_elsewhere(results_dir: str | Path) -> set[tuple[str, ...]]:
    """Fingerprints of the cells other sweeps have in the queue: submitting them again would give
    one record two writers."""
    from czsl_bench.slurm import sweep_queue
    from czsl_bench.sweep import SweepError, Sweep, list_sweeps

    busy: set[tuple[str, ...]] = set()
    for folder in list_sweeps(results_dir):
        try:
            other = Sweep.load(folder)
        except SweepError:
            continue
        queue = sweep_queue(other) if other.submissions else None
        if not queue:
            continue
        for cell in other.cells:
            job, _ = other.current_job(cell.index)
            if job in queue:
                busy.add(tuple(sorted(cell.fingerprints.values())))
    return busy
