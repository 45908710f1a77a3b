"""``czsl-bench jobs``: the tasks of a sweep (state, runtime, log, error) and ``jobs resubmit``.

A thin layer over :mod:`czsl_bench.sweep` (states from records, the queue and the tasks' status
files) and :mod:`czsl_bench.slurm` (squeue, submitting).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from czsl_bench.cli.executor import slurm_options, slurm_settings

_STATE_ORDER = ("failed", "lost", "missing", "unknown", "running", "pending", "done")


def _results_dir(func):
    return click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
                        show_default=True, help="Where the records and RESULTS_DIR/.sweeps live.")(func)


def _sweep_option(func):
    return click.option("--sweep", "sweep_name", default=None, metavar="ID",
                        help="Sweep id (or a unique prefix, or its folder) [default: the newest].")(func)


@click.group("jobs", invoke_without_command=True)
@_results_dir
@_sweep_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task instead of the table.")
@click.option("--wait", is_flag=True, help="Wait until every task has ended (done, failed, lost or missing).")
@click.option("--timeout", type=float, default=24 * 3600.0, show_default=True, help="Seconds --wait waits at most.")
@click.pass_context
def jobs(ctx: click.Context, results_dir: Path, sweep_name: str | None, as_json: bool, wait: bool,
         timeout: float) -> None:
    """The tasks of a sweep: state, runtime, log path and the error of failed ones.

    Exit 1 when a task failed, was lost or is missing (`czsl-bench jobs resubmit` reruns those).

    \b
    Examples:
      czsl-bench jobs                          # the newest sweep under results/
      czsl-bench jobs --sweep 20261124 --wait  # block until it has ended
      czsl-bench jobs resubmit                 # rerun its failed or missing cells only
    """
    if ctx.invoked_subcommand is not None:
        return
    from czsl_bench import slurm
    from czsl_bench.sweep import cell_states, find_sweep

    sweep = find_sweep(results_dir, sweep_name)
    queue = slurm.sweep_queue(sweep)
    if wait:
        states = slurm.wait(sweep, timeout)
        queue = slurm.sweep_queue(sweep)
    states = cell_states(sweep, queue)
    if as_json:
        for state in states:
            click.echo(json.dumps(state.to_dict()))
    else:
        click.echo(_render(sweep, states, queue is not None))
    if any(s.state in ("failed", "lost", "missing") for s in states):
        sys.exit(1)


def _render(sweep, states, have_queue: bool) -> str:
    from tabulate import tabulate

    rows = []
    for s in states:
        when = _duration(s.seconds) if s.seconds is not None else ""
        state = s.state + (f" ({s.reason})" if s.reason else "") + (f", requeued {s.restarts}x" if s.restarts else "")
        rows.append([s.cell.index, s.cell.describe(), state, s.job or "", when, s.log or "", s.error or ""])
    counts = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    summary = ", ".join(f"{counts[k]} {k}" for k in sorted(counts, key=lambda k: (_rank(k), k)))
    head = f"sweep {sweep.id} ({sweep.kind}, {len(states)} cells): {summary}"
    if not have_queue:
        head += "\n(squeue is not available here: states come from the tasks' status files)"
    table = tabulate(rows, headers=["cell", "run", "state", "job", "time", "log", "error"], tablefmt="simple",
                     disable_numparse=True)
    return f"{head}\n{table}"


def _rank(state: str) -> int:
    return _STATE_ORDER.index(state) if state in _STATE_ORDER else len(_STATE_ORDER)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@jobs.command("resubmit")
@_results_dir
@_sweep_option
@slurm_options
def resubmit(results_dir: Path, sweep_name: str | None, **options) -> None:
    """Submit the failed, lost or missing cells of a sweep again (never those done or queued),
    with the sweep's Slurm settings; the options given here change them (e.g. a longer --time)."""
    from czsl_bench import slurm
    from czsl_bench.cli.executor import slurm_config
    from czsl_bench.sweep import cell_states, find_sweep, to_resubmit

    sweep = find_sweep(results_dir, sweep_name)
    settings = slurm_settings(options)
    cfg = slurm_config(**settings, base=sweep.executor)
    planned = int(sweep.executor.get("nproc_per_task", 1) or 1)
    if cfg.nproc_per_task != planned:  # [ddp] the cells' fingerprints carry world_size = W
        raise click.UsageError(f"sweep {sweep.id} was planned with --nproc-per-task {planned} (its records are "
                               f"ddp{planned} records); resubmit it with that, or start a new sweep with "
                               f"`czsl-bench run ... --nproc-per-task {cfg.nproc_per_task}`")
    queue = slurm.sweep_queue(sweep)
    if queue is None and not options["dry_run"]:
        raise click.ClickException("squeue is not available: without the queue a running task would look "
                                   "missing and get a second writer; run this on the cluster's login node")
    cells = [c.index for c in to_resubmit(cell_states(sweep, queue))]
    if not cells:
        click.echo(f"sweep {sweep.id}: nothing to resubmit (no failed, lost or missing cell)", err=True)
        return
    names = ", ".join(sweep.cells[i].describe() for i in cells)
    click.echo(f"sweep {sweep.id}: resubmitting {len(cells)} cell(s): {names}", err=True)
    if options["dry_run"]:
        click.echo(slurm.preview(sweep, cells, cfg), nl=False)
        click.echo("dry run: nothing submitted", err=True)
        return
    command = ["czsl-bench", *sys.argv[1:]]
    try:
        slurm.check_cluster(cfg)
        sweep.executor = cfg.to_dict()
        sub = slurm.submit(sweep, cells, cfg, command)
    except slurm.SlurmError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"submitted job {sub.jobs[0].split('_')[0]}: {len(cells)} task(s)", err=True)
    click.echo(f"follow it: czsl-bench jobs --results-dir {results_dir} --sweep {sweep.id}")
