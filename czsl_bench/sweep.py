"""Sweeps: a grid of cells planned once on the login node, run as tasks elsewhere, followed to the end.

A cell is one (method, dataset, seed) with its settings and ablation: one :func:`czsl_bench.api.execute`
call, whose identity (and so record path and fingerprint) is known before it runs
(:func:`czsl_bench.api.identify`). A sweep lives on the shared filesystem, beside the records::

    <results>/.sweeps/<id>/sweep.json     the login node's: command, run options, executor config,
                                          cells (fingerprints, record paths), submissions (job ids)
    <results>/.sweeps/<id>/tasks/<i>.json cell i's task's: state, Slurm ids, host, times, error line
    <results>/.sweeps/<id>/logs/          the executor's folder: one log per task

Each file has exactly one writer (the login node for ``sweep.json``, the cell's task for its status,
the cell's task for its records), every write is atomic, and the folder is hidden, so record
loaders and ``table`` never read it. What a cell's state is comes from three places, in order: its
records (done), the queue (pending, running), its task's status (failed, or "lost" when the task
stopped without saying so: time limit, memory, cancelled, node failure).

Pure Python; no torch, no Slurm. Queue information is passed in (czsl_bench.slurm reads it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

SWEEPS = ".sweeps"
SWEEP_VERSION = 1
# run options a task rebuilds from sweep.json; paths among them are stored absolute, since a task
# may start in another working directory than the command that planned it
_OPTION_FIELDS = ("backbone", "pretrained", "overrides", "config_file", "results_dir", "device",
                  "deterministic", "threshold", "data_root", "cache_dir", "eval_batch_size", "num_workers")
_PATH_OPTIONS = ("config_file", "results_dir", "data_root", "cache_dir")
FINAL_STATES = ("done", "failed", "lost", "missing")


class SweepError(ValueError):
    """A sweep folder is missing, unreadable or names no such cell; the message says how to fix it."""


@dataclass
class Cell:
    index: int
    method: str
    dataset: str
    seed: int
    settings: list[str]
    ablation: str | None
    fingerprints: dict[str, str]  # setting -> record fingerprint
    groups: dict[str, str]  # setting -> group fingerprint (the identity without the seed)
    records: dict[str, str]  # setting -> record path
    checkpoint: str | None  # the Trainer's checkpoint folder (None: the method does not train)
    label: str = ""  # the ablation point or method name shown by `jobs`

    def describe(self) -> str:
        name = self.label or self.method
        return f"{name} {self.dataset} seed{self.seed}"


@dataclass
class Submission:
    """One submitted array: task k of it runs cell ``cells[k]``, as job ``jobs[k]`` with log ``logs[k]``."""

    cells: list[int]
    jobs: list[str]
    logs: list[str]
    submitted: str
    command: list[str]


@dataclass
class Sweep:
    id: str
    dir: Path
    created: str
    command: list[str]
    cwd: str
    kind: str  # "run" | "ablate"
    options: dict[str, Any]
    executor: dict[str, Any]
    cells: list[Cell]
    submissions: list[Submission] = field(default_factory=list)
    version: int = SWEEP_VERSION

    # -- files ----------------------------------------------------------------------------------
    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def save(self) -> None:
        from czsl_bench.atomic import atomic_write_text

        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "dir"}
        atomic_write_text(self.dir / "sweep.json", json.dumps(data, indent=1, default=str) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Sweep":
        directory = Path(directory)
        path = directory / "sweep.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SweepError(f"{directory} holds no sweep.json; is it a sweep folder? "
                             f"(`czsl-bench jobs` lists the sweeps under RESULTS_DIR/{SWEEPS})") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise SweepError(f"{path} cannot be read ({exc}); the sweep cannot be followed") from None
        if data.get("version") != SWEEP_VERSION:
            raise SweepError(f"{path} has format version {data.get('version')}; this czsl-bench reads "
                             f"{SWEEP_VERSION} (upgrade czsl-bench)")
        cells = [Cell(**c) for c in data.pop("cells")]
        subs = [Submission(**s) for s in data.pop("submissions")]
        return cls(dir=directory, cells=cells, submissions=subs, **data)

    # -- what a task needs ----------------------------------------------------------------------
    def run_options(self, cell: Cell, provenance: dict[str, Any] | None = None) -> Any:
        """The :class:`~czsl_bench.api.RunOptions` cell's task runs with: the sweep's options, the
        cell's ablation, and always ``skip_existing`` (another sweep may have finished it) and
        ``resume`` (a requeued task continues from the Trainer's checkpoint, which is keyed by the
        training fingerprint, so it can only be this cell's)."""
        from czsl_bench.api import RunOptions

        return RunOptions(**self.options, ablation=cell.ablation, skip_existing=True, resume=True,
                          provenance=provenance)

    def spec(self, cell: Cell) -> Any:
        from czsl_bench.api import RunSpec

        return RunSpec(cell.method, cell.dataset, cell.seed, tuple(cell.settings))

    def current_job(self, index: int) -> tuple[str | None, str | None]:
        """(job id, log path) of the latest submission of cell ``index`` (None, None: never submitted)."""
        for sub in reversed(self.submissions):
            if index in sub.cells:
                k = sub.cells.index(index)
                return sub.jobs[k], sub.logs[k]
        return None, None


def options_dict(opts: Any) -> dict[str, Any]:
    """The JSON-ready run options of a sweep (``RunOptions`` without progress, skip and resume)."""
    out = {}
    for name in _OPTION_FIELDS:
        value = getattr(opts, name)
        if name in _PATH_OPTIONS and value is not None:
            value = str(Path(value).expanduser().resolve())
        elif name == "overrides" and value is not None:
            value = list(value) if not isinstance(value, dict) else value
        out[name] = value
    return out


def sweeps_root(results_dir: str | Path) -> Path:
    return Path(results_dir) / SWEEPS


def new_sweep(results_dir: str | Path, plans: Iterable[tuple[Any, str | None, str]], opts: Any,
              executor: dict[str, Any], command: list[str], kind: str) -> Sweep:
    """A sweep of ``plans`` — ``(api.CellPlan, ablation, label)`` per cell — not yet saved."""
    cells = []
    for i, (plan, ablation, label) in enumerate(plans):
        spec = plan.spec
        cells.append(Cell(
            index=i, method=spec.method, dataset=spec.dataset, seed=spec.seed, settings=list(spec.settings),
            ablation=ablation, label=label,
            fingerprints={s: ident.fingerprint for s, ident in plan.identities.items()},
            groups={s: ident.group_fingerprint for s, ident in plan.identities.items()},
            records={s: str(Path(p).resolve()) for s, p in plan.paths.items()},
            checkpoint=str(Path(plan.checkpoint).resolve()) if plan.checkpoint is not None else None))
    now = datetime.now(timezone.utc)
    sweep_id = now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    directory = sweeps_root(results_dir).resolve() / sweep_id
    return Sweep(id=sweep_id, dir=directory, created=now.isoformat(timespec="seconds"), command=list(command),
                 cwd=os.getcwd(), kind=kind, options=options_dict(opts), executor=dict(executor), cells=cells)


def list_sweeps(results_dir: str | Path) -> list[Path]:
    """Sweep folders under ``results_dir``, oldest first (ids start with their UTC creation time)."""
    root = sweeps_root(results_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "sweep.json").is_file())


def find_sweep(results_dir: str | Path, name: str | None = None) -> Sweep:
    """The sweep ``name`` (an id, a unique id prefix, or a folder), else the newest one."""
    if name and (Path(name) / "sweep.json").is_file():
        return Sweep.load(name)
    folders = list_sweeps(results_dir)
    if not folders:
        raise SweepError(f"no sweep under {sweeps_root(results_dir)}; submit one with "
                         "`czsl-bench run ... --executor slurm` (or pass --results-dir)")
    if name is None:
        return Sweep.load(folders[-1])
    matches = [p for p in folders if p.name.startswith(name)]
    if len(matches) != 1:
        known = ", ".join(p.name for p in folders[-5:])
        what = "matches several sweeps" if matches else "is not a sweep"
        raise SweepError(f"{name!r} {what} under {sweeps_root(results_dir)}; recent sweeps: {known}")
    return Sweep.load(matches[0])


# -- a task's status file ---------------------------------------------------------------------------


def status_path(sweep_dir: str | Path, index: int) -> Path:
    return Path(sweep_dir) / "tasks" / f"{index}.json"


def write_status(sweep_dir: str | Path, index: int, **fields: Any) -> dict[str, Any]:
    """Update cell ``index``'s status (read, merge, atomic rewrite: its task is its only writer)."""
    from czsl_bench.atomic import atomic_write_text

    status = read_status(sweep_dir, index) or {}
    status.update(fields)
    status["updated"] = time.time()
    atomic_write_text(status_path(sweep_dir, index), json.dumps(status, indent=1, default=str) + "\n")
    return status


def read_status(sweep_dir: str | Path, index: int) -> dict[str, Any] | None:
    try:
        data = json.loads(status_path(sweep_dir, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- states -------------------------------------------------------------------------------------------


@dataclass
class QueueEntry:
    state: str  # Slurm's: PENDING, RUNNING, COMPLETING, REQUEUED, ...
    elapsed: str = ""  # squeue's %M
    reason: str = ""


@dataclass
class CellState:
    cell: Cell
    state: str  # done | pending | running | failed | lost | missing | <other Slurm state, lower case>
    job: str | None
    log: str | None
    seconds: float | None
    error: str | None = None
    restarts: int = 0
    reason: str = ""  # why a pending task waits (squeue's reason)

    def to_dict(self) -> dict[str, Any]:
        return {"cell": self.cell.index, "method": self.cell.method, "label": self.cell.label,
                "dataset": self.cell.dataset, "seed": self.cell.seed, "settings": self.cell.settings,
                "state": self.state, "job": self.job, "log": self.log, "seconds": self.seconds,
                "error": self.error, "restarts": self.restarts, "reason": self.reason}


def records_present(cell: Cell) -> bool:
    """Every setting's record is at its path with the cell's fingerprint."""
    for setting, path in cell.records.items():
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        if not isinstance(data, dict) or data.get("fingerprint") != cell.fingerprints[setting]:
            return False
    return True


def cell_states(sweep: Sweep, queue: dict[str, QueueEntry] | None) -> list[CellState]:
    """The state of every cell; ``queue`` maps job ids (``123_4``) to squeue's view, or is None
    where the queue cannot be asked (the states then come from the status files alone)."""
    now = time.time()
    out = []
    for cell in sweep.cells:
        job, log = sweep.current_job(cell.index)
        status = read_status(sweep.dir, cell.index) or {}
        if status.get("job") not in (None, job):
            status = {}  # written by an earlier submission of this cell: it says nothing of this one
        seconds = _seconds(status, now)
        restarts = int(status.get("restarts") or 0)
        entry = queue.get(job) if queue is not None and job else None
        if records_present(cell):
            state, error = "done", None
        elif entry is not None:
            state, error = entry.state.lower(), None
        elif status.get("state") == "failed":
            state, error = "failed", status.get("error")
        elif status.get("state") in ("running", "interrupted") and queue is not None:
            state, error = "lost", _lost_reason(log)
        elif status.get("state") in ("running", "interrupted"):
            state, error = status["state"], None
        elif job is None:
            state, error = "missing", "never submitted (its record existed when the sweep was planned)"
        else:
            state = "missing" if queue is not None else "unknown"
            error = ("no record and not in the queue: cancelled before it started, or its record was "
                     "removed since" if queue is not None else None)
        out.append(CellState(cell, state, job, log, seconds, error, restarts,
                             entry.reason if entry is not None else ""))
    return out


def _seconds(status: dict[str, Any], now: float) -> float | None:
    started = status.get("started")
    if not isinstance(started, (int, float)):
        return None
    ended = status.get("ended")
    return round((ended if isinstance(ended, (int, float)) else now) - started, 1)


def _lost_reason(log: str | None) -> str:
    """Slurm's own line for a task it ended (``*** JOB 12 ... CANCELLED ... DUE TO TIME LIMIT ***``),
    else the last error-looking line of the task's log."""
    generic = "the task stopped without reporting (time limit, memory, cancelled or node failure)"
    if not log:
        return generic
    try:
        lines = [line.strip() for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return generic + "; its log is missing"
    for line in reversed(lines):
        if "***" in line and ("CANCELLED" in line or "DUE TO" in line):
            return line.split("error:", 1)[-1].strip()
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Killed" in line:
            return line[:300]
    return generic + f"; see {log}"


def to_resubmit(states: Iterable[CellState]) -> list[Cell]:
    """Cells to run again: failed, lost or missing (never those done, queued or running)."""
    return [s.cell for s in states if s.state in ("failed", "lost", "missing", "unknown")]


# -- for tables -------------------------------------------------------------------------------------


def expected_seeds(results_dir: str | Path) -> dict[str, set[int]]:
    """group fingerprint -> the seeds the sweeps under ``results_dir`` planned for it: a table cell
    holding fewer of them is partial (still running, failed, or not yet submitted again)."""
    out: dict[str, set[int]] = {}
    for folder in list_sweeps(results_dir):
        try:
            sweep = Sweep.load(folder)
        except SweepError:
            continue  # a table is built from records; an unreadable sweep only loses its marks
        for cell in sweep.cells:
            for group in cell.groups.values():
                out.setdefault(group, set()).add(cell.seed)
    return out
