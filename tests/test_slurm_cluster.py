"""`--executor slurm` against a real Slurm: the single-node cluster of scripts/slurm-single-node.sh.

Skipped (with the reason) where no Slurm answers; in CI (CI=true) a missing Slurm fails instead,
since .ci/run starts one. Everything goes through the `czsl-bench` command in subprocesses, as a
user would run it, with one torch thread everywhere so that a task's numbers equal a local run's.

The scenarios, on the synthetic world with the cheapest trained settings:
* a 2 methods x 2 seeds sweep completes and its records equal local runs;
* a task requeued mid-training (first by submitit's checkpoint signal, then by `scontrol requeue`)
  resumes from its checkpoint and ends with the uninterrupted record;
* a failing task shows its error in `czsl-bench jobs`, and `jobs resubmit` fills the gap;
* a cell trained with DDP on 2 ranks per task (`--nproc-per-task 2`, gloo) gives the record of a
  local `torchrun --nproc-per-node 2` run of the same cell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLI = [str(Path(sys.executable).with_name("czsl-bench"))]
SWEEP = ["coop,csp", "--dataset", "synthetic", "--seed", "0,1", "--set", "epochs=2", "-q"]
SLURM = ["--executor", "slurm", "--cpus", "1", "--time", "20"]
# fields that say where, when and how fast a run went, not what it computed
_VOLATILE_TRAINING = ("resumed_from",)
_VOLATILE_EPOCH = ("seconds", "data_seconds", "compute_seconds")


def _slurm_answers() -> str | None:
    """None when the test cluster is up, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (sudo scripts/slurm-single-node.sh start installs and starts one)"
    out = subprocess.run(["sinfo", "-h", "-o", "%R %t"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"Slurm does not answer ({out.stderr.strip()[:120]}); start it: sudo scripts/slurm-single-node.sh start"
    if "debug" not in out.stdout.split():
        return "this Slurm has no 'debug' partition (scripts/slurm-single-node.sh configures one)"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _slurm_answers()
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI runs the Slurm tests and .ci/run starts Slurm, but: {why}")
        pytest.skip(why)
    return True


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CI": os.environ.get("CI", "")}


def czsl(env, *args, check=True, timeout=900):
    out = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"czsl-bench {' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def comparable(path) -> dict:
    """A record without what differs between two runs of the same cell: timings, creation time,
    epoch seconds, where it resumed from, and the executor's provenance."""
    data = json.loads(Path(path).read_text())
    for name in ("timings", "created", "environment"):
        data.pop(name)
    training = json.loads(Path(path).read_text())["environment"]["training"]
    if training is not None:
        for name in _VOLATILE_TRAINING:
            training.pop(name)
        for epoch in training["history"]:
            for name in _VOLATILE_EPOCH:
                epoch.pop(name)
    data["training"] = training
    data["provenance"].pop("executor", None)
    return data


def sweep_of(results: Path) -> dict:
    (folder,) = [p for p in (results / ".sweeps").iterdir() if (p / "sweep.json").exists()]
    return json.loads((folder / "sweep.json").read_text())


def jobs(env, results, *args, check=False):
    out = czsl(env, "jobs", "--results-dir", results, "--json", *args, check=check)
    return out, [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def release(job: str) -> None:
    """A requeued job waits about two minutes before it may start again; let it start now."""
    wait_for(lambda: _squeue(job) == "PENDING", 60, f"job {job} to be pending again")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, capture_output=True)


def _squeue(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job.split("_")[0], "-o", "%i %T"], capture_output=True, text=True)
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    return states.get(job, "")


def checkpoint_epoch(folder: str) -> int:
    path = Path(folder) / "last.pt"
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not there yet, or being replaced
        return 0


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(cluster, env, tmp_path_factory):
    """The 2 x 2 sweep on Slurm, and the same cells run locally."""
    base = tmp_path_factory.mktemp("slurm-sweep")
    results, local = base / "results", base / "local"
    started = time.monotonic()
    submitted = czsl(env, "run", *SWEEP, *SLURM, "--max-parallel", "2", "--results-dir", results)
    # while it runs, `table` works: a table of what is there, or one line saying cells are to come
    during = czsl(env, "table", "--results-dir", results, check=False)
    finished = czsl(env, "jobs", "--results-dir", results, "--wait", "--timeout", "600", check=False)
    seconds = time.monotonic() - started
    czsl(env, "run", *SWEEP, "--results-dir", local)
    return dict(results=results, local=local, submitted=submitted, during=during, finished=finished,
                seconds=seconds)


def test_a_sweep_completes_with_the_records_of_local_runs(sweep, env):
    assert "submitted job" in sweep["submitted"].stderr and "probe: node" in sweep["submitted"].stderr
    assert sweep["during"].returncode in (0, 1) and "Traceback" not in sweep["during"].stderr
    if sweep["during"].returncode == 1:
        assert "cells to come (czsl-bench jobs)" in sweep["during"].stderr
    assert sweep["finished"].returncode == 0, sweep["finished"].stdout
    assert "4 done" in sweep["finished"].stdout
    info = sweep_of(sweep["results"])
    assert len(info["submissions"]) == 1 and len(info["submissions"][0]["jobs"]) == 4
    array = info["submissions"][0]["jobs"][0].split("_")[0]
    for cell in info["cells"]:
        (path,) = cell["records"].values()
        twin = sweep["local"] / Path(path).relative_to(sweep["results"])
        assert comparable(path) == comparable(twin), f"{cell['method']} seed {cell['seed']}"
        executor = json.loads(Path(path).read_text())["provenance"]["executor"]
        assert executor["array_job_id"] == array and executor["array_task_id"] == str(cell["index"])
        assert executor["command"][:3] == ["czsl-bench", "run", "coop,csp"]
        assert executor["config"]["cpus"] == 1 and executor["config"]["max_parallel"] == 2
        log = Path(info["submissions"][0]["logs"][cell["index"]])
        assert log.name == f"{array}_{cell['index']}_0_log.out" and "Job completed successfully" in log.read_text()
    # the finished sweep marks nothing partial
    table = czsl(env, "table", "--results-dir", sweep["results"])
    assert "(1/2)" not in table.stdout and "CSP (epochs=2)" in table.stdout
    print(f"\n2x2 sweep on Slurm: {sweep['seconds']:.0f} s from submission to the last record")


def test_a_failing_task_shows_its_error_and_resubmit_fills_the_gap(sweep, env):
    results = sweep["results"]
    info = sweep_of(results)
    cell = next(c for c in info["cells"] if c["method"] == "csp" and c["seed"] == 1)
    record = Path(cell["records"]["closed"])
    reference = comparable(record)
    # the gap: the record is gone, and the checkpoint the task will resume from is garbage
    record.unlink()
    (Path(cell["checkpoint"]) / "last.pt").write_bytes(b"not a checkpoint")
    out, states = jobs(env, results)
    assert out.returncode == 1 and [s["state"] for s in states].count("missing") == 1
    assert "(1/2)" in czsl(env, "table", "--results-dir", results).stdout  # CSP has 1 of its 2 seeds

    czsl(env, "jobs", "resubmit", "--results-dir", results)
    czsl(env, "jobs", "--results-dir", results, "--wait", "--timeout", "300", check=False)
    out, states = jobs(env, results)
    failed = [s for s in states if s["state"] == "failed"]
    assert out.returncode == 1 and [s["cell"] for s in failed] == [cell["index"]]
    assert "cannot be read" in failed[0]["error"] and "delete it to start over" in failed[0]["error"]
    assert "\n" not in failed[0]["error"]
    table = czsl(env, "jobs", "--results-dir", results, check=False).stdout
    assert "failed" in table and "cannot be read" in table

    shutil.rmtree(cell["checkpoint"])  # what the error line says to do
    czsl(env, "jobs", "resubmit", "--results-dir", results)
    done = czsl(env, "jobs", "--results-dir", results, "--wait", "--timeout", "300")
    assert "4 done" in done.stdout
    assert comparable(record) == reference
    assert len(sweep_of(results)["submissions"]) == 3
    nothing = czsl(env, "jobs", "resubmit", "--results-dir", results)
    assert "nothing to resubmit" in nothing.stderr


def test_a_requeued_task_resumes_from_its_checkpoint(cluster, env, tmp_path):
    results, local = tmp_path / "results", tmp_path / "local"
    cell_args = ["csp", "--dataset", "synthetic", "--seed", "3", "--set", "epochs=16", "-q"]
    czsl(env, "run", *cell_args, *SLURM, "--no-probe", "--results-dir", results)
    cell = sweep_of(results)["cells"][0]
    job = sweep_of(results)["submissions"][0]["jobs"][0]

    # 1. submitit's protocol: Slurm's signal (USR2, as at preemption or near the time limit)
    wait_for(lambda: checkpoint_epoch(cell["checkpoint"]) >= 2, 300, "two epochs")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    release(job)
    # 2. killed outright and put back in the queue
    wait_for(lambda: _squeue(job) == "RUNNING", 120, "the requeued task to start")
    first = checkpoint_epoch(cell["checkpoint"])
    wait_for(lambda: checkpoint_epoch(cell["checkpoint"]) >= first + 2, 300, "two more epochs")
    subprocess.run(["scontrol", "requeue", job], check=True)
    release(job)

    out = czsl(env, "jobs", "--results-dir", results, "--wait", "--timeout", "300")
    assert "done, requeued 2x" in out.stdout
    path = cell["records"]["closed"]
    record = json.loads(Path(path).read_text())
    assert record["environment"]["training"]["resumed_from"] >= first + 2 > 2
    assert record["provenance"]["executor"]["restarts"] == 2
    log = Path(sweep_of(results)["submissions"][0]["logs"][0]).read_text()
    assert "Calling checkpoint method" in log and "DUE TO JOB REQUEUE" in log

    czsl(env, "run", *cell_args, "--results-dir", local)
    assert comparable(path) == comparable(local / Path(path).relative_to(results))


def test_a_cell_on_two_ranks_per_task_equals_a_local_torchrun_run(cluster, env, tmp_path):
    """[ddp] `--nproc-per-task 2`: two Slurm tasks (one CPU each) are the two gloo ranks of one run;
    its ddp2 record equals the one `torchrun --nproc-per-node 2` writes for the same cell."""
    results, local = tmp_path / "results", tmp_path / "local"
    cell_args = ["csp", "--dataset", "synthetic", "--seed", "0", "--set", "epochs=2", "--set", "batch_size=8",
                 "--device", "cpu", "-q"]
    started = time.monotonic()
    out = czsl(env, "run", *cell_args, *SLURM, "--nproc-per-task", "2", "--no-probe", "--results-dir", results)
    assert "2 DDP ranks each" in out.stderr
    done = czsl(env, "jobs", "--results-dir", results, "--wait", "--timeout", "600", check=False)
    seconds = time.monotonic() - started
    info = sweep_of(results)
    log = Path(info["submissions"][0]["logs"][0])
    assert done.returncode == 0, done.stdout + (log.read_text() if log.exists() else "")
    (cell,) = info["cells"]
    (path,) = cell["records"].values()
    assert "/ddp2/" in path
    record = json.loads(Path(path).read_text())
    assert record["identity"]["world_size"] == 2 and record["fingerprint"] == cell["fingerprints"]["closed"]
    status = json.loads((results / ".sweeps" / info["id"] / "tasks" / "0.json").read_text())
    assert status["state"] == "done" and status["world_size"] == 2

    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                "-m", "czsl_bench", "run", *cell_args, "--results-dir", str(local)]
    ran = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=900)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    twin = local / Path(path).relative_to(results)
    assert comparable(path) == comparable(twin)
    print(f"\nDDP cell (2 ranks) on Slurm: {seconds:.0f} s from submission to the record")
