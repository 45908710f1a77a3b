"""The Slurm executor: a sweep's cells as the tasks of a Slurm job array, through submitit.

    from czsl_bench.slurm import SlurmConfig, submit
    sweep = submit(sweep, SlurmConfig(partition="gpu", time=120, gpus=1, max_parallel=16))

The login node plans (czsl_bench.api.identify: fingerprints, record paths), checks the cluster
(``sbatch`` on PATH, the partition exists, a tiny probe job sees the results folder and the same
Python), and submits one array whose task k runs cell k with :class:`CellTask`. A task writes its
own status file and its cell's records (czsl_bench.sweep); it always runs with ``skip_existing``
and ``resume``. Preemption and time limits follow submitit's checkpointing protocol: Slurm sends
the job's ``--signal`` (USR2, ``signal_delay`` seconds before the limit, or at preemption where the
cluster sets ``preempt_send_user_signal``), submitit calls :meth:`CellTask.checkpoint`, which
resubmits the same cell, and requeues the job; the new run resumes from the Trainer's last epoch
checkpoint, so its record equals an uninterrupted run's. A task killed without the signal
(``scontrol requeue``, a node failure) resumes the same way.

[ddp] With ``nproc_per_task = W > 1`` each array task is W Slurm tasks on one node, one DDP rank
each (:func:`export_rank_env` turns Slurm's variables into torchrun's); the cells are planned with
``world_size`` W (their ``ddp<W>`` records), rank 0 alone writes the status file and the record,
and submitit checkpoints and requeues from rank 0 (docs/distributed.md, "Through Slurm").

submitit is an optional dependency (``pip install czsl-bench[slurm]``); nothing here imports it
before a submission.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from czsl_bench.sweep import QueueEntry, Submission, Sweep, write_status

SUBMITIT_HINT = "pip install 'czsl-bench[slurm]' (or pip install submitit)"
# seconds a probe job may have left the queue before its answer shows (network filesystems cache)
_PROBE_GRACE = 10.0
_MEM_RE = re.compile(r"^\d+(\.\d+)?[KMGT]?B?$", re.IGNORECASE)


class SlurmError(ValueError):
    """The cluster cannot take the sweep as configured; one line saying what and how to fix it."""


@dataclass
class SlurmConfig:
    """Resources of each task of the array, and how the array is run.

    Keys of ``--slurm-config FILE`` (YAML/JSON/TOML) are these field names (``-`` or ``_``) or
    their sbatch/submitit aliases; command-line options win over the file.
    """

    partition: str | None = None
    time: int = field(default=60, metadata={"alias": "timeout_min"})  # minutes per task
    gpus: int = field(default=0, metadata={"alias": "gpus_per_node"})
    cpus: int = field(default=4, metadata={"alias": "cpus_per_task"})  # per rank when nproc_per_task > 1
    # [ddp] processes (DDP ranks) that train each cell together: one Slurm task per rank, one node
    nproc_per_task: int = field(default=1, metadata={"alias": "ntasks_per_node"})
    mem: str | None = None  # sbatch syntax: 16G, 32000M
    max_parallel: int | None = field(default=None, metadata={"alias": "array_parallelism"})
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "czsl-bench"
    sbatch: list[str] = field(default_factory=list)  # extra options, e.g. ["--exclude=node3"]
    setup: list[str] = field(default_factory=list)  # shell lines before the task (module load ...)
    signal_delay: int = 120  # seconds between the checkpoint signal and the time limit
    max_timeouts: int = 3  # requeues after a time limit (preemptions are not counted)
    probe: bool = True  # check with a tiny job that the nodes see the results folder
    probe_timeout: int = 300  # seconds to wait for the probe job

    def validate(self) -> "SlurmConfig":
        if self.time < 1:
            raise SlurmError(f"time is {self.time} minutes; a task needs at least 1 (--time 30 or 01:30:00)")
        for name in ("gpus", "cpus", "signal_delay", "max_timeouts"):
            if getattr(self, name) < 0:
                raise SlurmError(f"{name} is {getattr(self, name)}; it must be >= 0")
        if self.cpus < 1:
            raise SlurmError("cpus is 0; a task needs at least one CPU (--cpus 4)")
        if self.nproc_per_task < 1:
            raise SlurmError(f"nproc_per_task is {self.nproc_per_task}; it must be >= 1 (--nproc-per-task 2)")
        if self.nproc_per_task > 1 and self.gpus and self.gpus != self.nproc_per_task:
            raise SlurmError(f"--nproc-per-task {self.nproc_per_task} with --gpus {self.gpus}: each rank uses one GPU, "
                             f"so give --gpus {self.nproc_per_task} (or --gpus 0 for CPU ranks on gloo)")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise SlurmError(f"max_parallel is {self.max_parallel}; it must be >= 1 (--max-parallel 8)")
        if self.mem is not None and not _MEM_RE.match(str(self.mem)):
            raise SlurmError(f"mem is {self.mem!r}; write it as sbatch does, e.g. 16G or 32000M")
        if self.signal_delay * 2 > self.time * 60:
            raise SlurmError(f"signal_delay of {self.signal_delay} s is more than half the {self.time}-minute "
                             "time limit; raise --time or lower signal_delay")
        for option in self.sbatch:
            _sbatch_option(option)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def submitit_parameters(self, n_tasks: int) -> dict[str, Any]:
        """The keyword arguments of ``submitit.SlurmExecutor.update_parameters``."""
        extra: dict[str, Any] = {}
        if self.mem is not None:
            extra["mem"] = str(self.mem)  # submitit's own mem takes GB numbers only
        for option in self.sbatch:
            key, value = _sbatch_option(option)
            extra[key] = value
        params: dict[str, Any] = {
            "job_name": self.job_name, "time": self.time, "cpus_per_task": self.cpus,
            "signal_delay_s": self.signal_delay, "stderr_to_stdout": True,  # one log per task
            "array_parallelism": min(self.max_parallel or n_tasks, max(n_tasks, 1)),
        }
        if self.nproc_per_task > 1:
            # [ddp] one Slurm task per rank, all on one node (CellTask reads its rank from SLURM_*)
            params["nodes"] = 1
            params["ntasks_per_node"] = self.nproc_per_task
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.setup:
            params["setup"] = list(self.setup)
        if extra:
            params["additional_parameters"] = extra
        return params


def _sbatch_option(option: str) -> tuple[str, Any]:
    """``--exclude=node3`` -> ("exclude", "node3"); ``--exclusive`` -> ("exclusive", True)."""
    text = option.strip()
    if not text.startswith("--") or len(text) < 3 or " " in text.split("=", 1)[0]:
        raise SlurmError(f"sbatch option {option!r} is not --NAME or --NAME=VALUE (e.g. --sbatch --exclude=node3)")
    name, sep, value = text[2:].partition("=")
    return name.replace("-", "_"), (value if sep else True)


def load_config(path: str | Path | None = None, base: dict[str, Any] | None = None,
                **overrides: Any) -> SlurmConfig:
    """Defaults (or ``base``, e.g. a sweep's stored config) < ``path`` (YAML/JSON/TOML) <
    ``overrides`` (None values are left out; ``sbatch`` options add to the file's)."""
    from czsl_bench.config import ConfigError, apply_values, load_config_file

    cfg = SlurmConfig()
    try:
        if base:
            cfg = apply_values(cfg, dict(base), where="the sweep's executor config")
        if path is not None:
            values = {str(k).replace("-", "_"): v for k, v in load_config_file(path).items()}
            cfg = apply_values(cfg, values, where=f"--slurm-config {path}")
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        if "sbatch" in given:
            given["sbatch"] = list(cfg.sbatch) + list(given["sbatch"])
        cfg = apply_values(cfg, given, where="the Slurm options")
    except ConfigError as exc:
        raise SlurmError(str(exc)) from None
    return cfg.validate()


def parse_time(value: str | int | None) -> int | None:
    """``90``, ``1:30:00``, ``2-00:00:00`` or ``45:00`` (sbatch's forms) -> minutes."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        days = int(d) if d.isdigit() else -1
    parts = text.split(":")
    if days < 0 or not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise SlurmError(f"time {value!r} is not minutes, MM:SS, HH:MM:SS or D-HH:MM:SS (e.g. --time 90)")
    nums = [int(p) for p in parts]
    if len(nums) == 1:
        minutes = nums[0]
    elif len(nums) == 2:
        minutes = nums[0] + (nums[1] > 0)  # MM:SS, rounded up
    else:
        minutes = nums[0] * 60 + nums[1] + (nums[2] > 0)
    return days * 24 * 60 + minutes


# -- checks -------------------------------------------------------------------------------------


def check_cluster(cfg: SlurmConfig) -> None:
    """``sbatch`` on PATH and the partition known to ``sinfo``; one :class:`SlurmError` line if not."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH: --executor slurm submits from a Slurm login node; run it there "
                         "(or add Slurm's bin folder to PATH), or add --dry-run to see what would be submitted")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise SlurmError(f"--executor slurm needs submitit: {SUBMITIT_HINT}") from None
    if cfg.partition is None:
        return
    names = partitions()
    if names is not None and cfg.partition not in names:
        raise SlurmError(f"partition {cfg.partition!r} does not exist on this cluster (sinfo lists "
                         f"{', '.join(names) or 'none'}); fix --partition or partition: in --slurm-config")


def partitions() -> list[str] | None:
    """The partition names ``sinfo`` lists (None when sinfo cannot be asked)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        raise SlurmError(f"sinfo failed ({_first_line(out.stderr) or out.returncode}); is slurmctld reachable?")
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def probe(results_dir: str | Path, cfg: SlurmConfig, timeout: float | None = None) -> dict[str, Any]:
    """Run a tiny job on ``cfg``'s partition that reads a token from ``results_dir`` with this
    Python and writes an answer there; raise :class:`SlurmError` if the nodes cannot see the
    folder (or this environment). Returns the answer (node, python, czsl-bench version)."""
    folder = Path(results_dir).resolve() / ".sweeps" / ".probe"
    folder.mkdir(parents=True, exist_ok=True)
    token = os.urandom(8).hex()
    ask, answer = folder / f"{token}.ask", folder / f"{token}.json"
    ask.write_text(token, encoding="utf-8")
    script = ("import json,socket,sys,czsl_bench;from pathlib import Path;"
              f"t=Path({str(ask)!r}).read_text();"
              f"assert t=={token!r};"
              f"Path({str(answer)!r}).write_text(json.dumps({{'node':socket.gethostname(),"
              "'python':sys.executable,'version':getattr(czsl_bench,'__version__','?')}))")
    command = ["sbatch", "--parsable", f"--job-name={cfg.job_name}-probe", "--time=2", "--ntasks=1",
               "--cpus-per-task=1", "--output=/dev/null", "--open-mode=append"]
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, name) is not None:
            command.append(f"--{name}={getattr(cfg, name)}")
    for option in cfg.sbatch:
        command.append(option)
    command.append("--wrap=" + "; ".join([*cfg.setup, f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"]))
    job = _sbatch(command)
    deadline = time.monotonic() + (cfg.probe_timeout if timeout is None else timeout)
    gone_since = None
    try:
        while time.monotonic() < deadline:
            if answer.exists():
                try:
                    return json.loads(answer.read_text(encoding="utf-8"))
                except ValueError:
                    pass  # being written on another node: read it again
            entry = queue_states([job]).get(job)
            if entry is None:
                # left the queue: give a network filesystem a few seconds to show its answer
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > _PROBE_GRACE:
                    raise SlurmError(
                        f"the results folder {Path(results_dir).resolve()} is not visible from the compute nodes "
                        f"(or they lack {sys.executable} with czsl-bench): probe job {job} ended without "
                        "answering; put --results-dir on a filesystem the nodes share, with the same "
                        "environment there (docs/cluster.md), or skip the check with --no-probe")
            time.sleep(0.5)
        state = queue_states([job]).get(job)
        _cancel(job)
        why = f" ({state.state.lower()}: {state.reason})" if state else ""
        raise SlurmError(f"the probe job {job} did not answer within {cfg.probe_timeout} s{why}; the cluster "
                         "may be busy: wait and retry, raise probe_timeout in --slurm-config, or skip it with --no-probe")
    finally:
        for path in (ask, answer):
            path.unlink(missing_ok=True)


def _sbatch(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmError(f"sbatch could not run ({exc})") from None
    if out.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {_first_line(out.stderr) or out.returncode}")
    return out.stdout.strip().split(";")[0]


def _cancel(job: str) -> None:
    try:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pass


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


# -- the queue -----------------------------------------------------------------------------------


def queue_states(jobs: Iterable[str]) -> dict[str, QueueEntry]:
    """squeue's view of ``jobs`` (``123`` or ``123_4``), one entry per array task; jobs that have
    left the queue are absent. Raises :class:`SlurmError` when squeue cannot be asked."""
    arrays = sorted({str(j).split("_")[0] for j in jobs if j})
    if not arrays:
        return {}
    if shutil.which("squeue") is None:
        raise SlurmError("squeue is not on PATH")
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%M|%r", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmError(f"squeue could not run ({exc})") from None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return {}  # every job has left the queue (and the controller forgot them)
        raise SlurmError(f"squeue failed: {_first_line(out.stderr) or out.returncode}")
    entries = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2:
            entries[parts[0]] = QueueEntry(parts[1], parts[2] if len(parts) > 2 else "",
                                           parts[3] if len(parts) > 3 and parts[3] != "None" else "")
    return entries


def sweep_queue(sweep: Sweep) -> dict[str, QueueEntry] | None:
    """The queue entries of ``sweep``'s jobs, or None where squeue is not available."""
    jobs = [j for sub in sweep.submissions for j in sub.jobs]
    try:
        return queue_states(jobs)
    except SlurmError:
        return None


# -- submitting ---------------------------------------------------------------------------------


def preview(sweep: Sweep, cells: list[int], cfg: SlurmConfig) -> str:
    """The sbatch script submitit would write for ``cells`` (a dry run; needs no cluster)."""
    params = cfg.submitit_parameters(len(cells))
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(sweep.logs_dir))}"
    try:
        from submitit.slurm.slurm import _make_sbatch_string
    except ImportError:
        flags = "\n".join(f"#   {k} = {v}" for k, v in sorted(params.items()))
        return f"# submitit is not installed ({SUBMITIT_HINT}); the array's parameters:\n{flags}\n"
    # submitit submits a single cell as a plain job, not as an array of one
    return _make_sbatch_string(command=command, folder=str(sweep.logs_dir),
                               map_count=len(cells) if len(cells) > 1 else None, **params)


def submit(sweep: Sweep, cells: list[int], cfg: SlurmConfig, command: list[str]) -> Submission:
    """Submit ``cells`` of ``sweep`` as one job array (one task per cell), save the sweep with the
    new submission and return it."""
    try:
        import submitit
    except ImportError:
        raise SlurmError(f"--executor slurm needs submitit: {SUBMITIT_HINT}") from None
    if not cells:
        raise SlurmError("nothing to submit")
    sweep.logs_dir.mkdir(parents=True, exist_ok=True)
    sweep.save()  # before any task starts: a task reads its cell from sweep.json
    executor = submitit.SlurmExecutor(folder=sweep.logs_dir, max_num_timeout=cfg.max_timeouts)
    executor.update_parameters(**cfg.submitit_parameters(len(cells)))
    try:
        jobs = executor.map_array(CellTask(), [str(sweep.dir)] * len(cells), list(cells))
    except Exception as exc:  # submitit raises its own error types around sbatch's message
        raise SlurmError(f"sbatch refused the array: {_first_line(str(exc))}") from None
    from datetime import datetime, timezone

    sub = Submission(cells=list(cells), jobs=[str(j.job_id) for j in jobs],
                     logs=[str(j.paths.stdout) for j in jobs],
                     submitted=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=list(command))
    # Tasks may already be running and write their status files; sweep.json is the login node's alone.
    sweep.submissions.append(sub)
    sweep.save()
    return sub


def _task_ids() -> dict[str, Any]:
    env = os.environ
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else env.get("SLURM_JOB_ID")
    return {"job": job, "slurm_job_id": env.get("SLURM_JOB_ID"), "array_job_id": array, "array_task_id": task,
            "restarts": int(env.get("SLURM_RESTART_COUNT") or 0), "host": socket.gethostname()}


def _checkpointable() -> type:
    try:
        from submitit.helpers import Checkpointable
    except ImportError:  # the class must exist to be imported; submitting needs submitit anyway
        return object
    return Checkpointable


class CellTask(_checkpointable()):
    """One array task: run cell ``index`` of the sweep in ``sweep_dir`` and record it.

    ``checkpoint`` (submitit's protocol, inherited from ``Checkpointable``) resubmits the same call
    when Slurm signals a preemption or the time limit; the requeued run resumes from the Trainer's
    checkpoint of the last finished epoch.
    """

    def __call__(self, sweep_dir: str, index: int) -> dict[str, Any]:
        from czsl_bench import api

        ids = _task_ids()
        sweep = Sweep.load(sweep_dir)
        cell = sweep.cells[index]
        _limit_threads()
        world = export_rank_env()  # [ddp] W > 1: this task is one rank of the cell's run
        main = int(os.environ.get("RANK", "0")) == 0
        status = write_status if main else (lambda *a, **k: None)  # [ddp] rank 0's file alone
        status(sweep.dir, index, state="running", started=time.time(), ended=None, error=None,
               cell=cell.describe(), world_size=world, **ids)
        provenance = {"executor": {
            "kind": "slurm", "command": sweep.command, "config": sweep.executor, "sweep": sweep.id,
            "cell": index, "job_id": ids["slurm_job_id"], "array_job_id": ids["array_job_id"],
            "array_task_id": ids["array_task_id"], "restarts": ids["restarts"], "host": ids["host"]}}
        try:
            outcome = api.execute(sweep.spec(cell), sweep.run_options(cell, provenance))
        except BaseException:
            # submitit's signal handler exits here after requeueing (or the task was killed)
            status(sweep.dir, index, state="interrupted", ended=time.time())
            raise
        if outcome.error is not None:
            status(sweep.dir, index, state="failed", ended=time.time(), error=outcome.error)
            raise api.RunError(f"{sweep.spec(cell).describe()} failed: {outcome.error}")
        status(sweep.dir, index, state="done", ended=time.time(), skipped=outcome.skipped,
                     records=[str(getattr(r, "source_path", "")) for r in outcome.records] if outcome.skipped
                     else list(cell.records.values()))
        return {"cell": index, "skipped": outcome.skipped, "seconds": outcome.seconds}


def export_rank_env(environ: dict[str, str] | None = None) -> int:
    """[ddp] Under ``ntasks_per_node = W > 1`` (``--nproc-per-task W``) each Slurm task is one rank:
    set the variables torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) from Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_ID), so that
    :func:`czsl_bench.distributed.init` joins the ranks into one group. The ranks share one node
    (``nodes = 1``), so the rendezvous is on 127.0.0.1 at a port drawn from the job id (array tasks
    are jobs of their own; ``CZSL_MASTER_PORT`` fixes it). Returns W (1: nothing set)."""
    env = os.environ if environ is None else environ
    world = int(env.get("SLURM_NTASKS") or 1)
    if world <= 1:
        return 1
    job = int(env.get("SLURM_JOB_ID") or 0)
    values = {"RANK": env.get("SLURM_PROCID", "0"), "WORLD_SIZE": str(world),
              "LOCAL_RANK": env.get("SLURM_LOCALID", env.get("SLURM_PROCID", "0")),
              "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": env.get("CZSL_MASTER_PORT") or str(20000 + job % 30000)}
    env.update(values)
    return world


def _limit_threads() -> None:
    """torch's default is one thread per core of the node, not of the allocation (no cgroups on
    many clusters): use the CPUs Slurm gave the task unless OMP_NUM_THREADS says otherwise."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(cpus))


def wait(sweep: Sweep, timeout: float, poll: float = 2.0, on_change: Any = None) -> list[Any]:
    """Block until every cell of ``sweep`` is in a final state (done, failed, lost, missing) or
    ``timeout`` seconds pass; returns the last states."""
    from czsl_bench.sweep import FINAL_STATES, cell_states

    deadline = time.monotonic() + timeout
    last = None
    while True:
        queue = sweep_queue(sweep)
        if queue is None:
            raise SlurmError("squeue is not available here, so the end of the tasks cannot be seen; "
                             "wait on the cluster's login node (or drop --wait)")
        states = cell_states(sweep, queue)
        summary = [s.state for s in states]
        if on_change is not None and summary != last:
            on_change(states)
        last = summary
        if all(s in FINAL_STATES for s in summary) or time.monotonic() >= deadline:
            return states
        time.sleep(poll)
