"""The Slurm executor without a cluster: settings, errors, dry run, states of a sweep, partial tables.

Fake `sbatch`/`sinfo`/`squeue` scripts on PATH stand in for a cluster where a real one cannot give
the case (a results folder the nodes cannot see); tests/test_slurm_cluster.py runs the real thing.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from czsl_bench import slurm
from czsl_bench.cli import cli
from czsl_bench.records import RunRecord
from czsl_bench.sweep import Cell, Submission, Sweep, cell_states, expected_seeds, to_resubmit, write_status
from czsl_bench.tables import build_table, render

PLANNED = ["run", "csp", "--dataset", "synthetic", "--seed", "0,1", "--set", "epochs=1"]


def fake_bin(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# -- settings ------------------------------------------------------------------------------------


def test_config_file_then_options_with_aliases_and_sbatch_extras(tmp_path):
    path = tmp_path / "slurm.toml"
    path.write_text('partition = "gpu"\ncpus_per_task = 8\nmax-parallel = 4\nmem = "32G"\n'
                    'sbatch = ["--exclude=node3"]\naccount = "vision"\n')
    cfg = slurm.load_config(path, gpus=1, time=slurm.parse_time("1:30:00"), cpus=None, sbatch=["--exclusive"])
    assert (cfg.partition, cfg.cpus, cfg.max_parallel, cfg.gpus, cfg.time) == ("gpu", 8, 4, 1, 90)
    params = cfg.submitit_parameters(n_tasks=10)
    assert params["array_parallelism"] == 4 and params["gpus_per_node"] == 1 and params["account"] == "vision"
    assert params["additional_parameters"] == {"mem": "32G", "exclude": "node3", "exclusive": True}
    assert params["stderr_to_stdout"] is True  # one log per task
    assert slurm.load_config().submitit_parameters(3)["array_parallelism"] == 3


@pytest.mark.parametrize("text, minutes", [("90", 90), ("45:30", 46), ("1:30:00", 90), ("2-00:00:00", 2880)])
def test_time_limits_in_sbatch_forms(text, minutes):
    assert slurm.parse_time(text) == minutes


@pytest.mark.parametrize("kwargs, message", [
    (dict(mem="lots"), "write it as sbatch does"),
    (dict(time=1), "more than half the 1-minute time limit"),
    (dict(max_parallel=0), "max_parallel is 0"),
    (dict(sbatch=["exclude=node3"]), "is not --NAME or --NAME=VALUE"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(slurm.SlurmError, match=message) as info:
        slurm.load_config(**kwargs)
    assert "\n" not in str(info.value)


def test_an_unknown_config_file_key_names_the_nearest(tmp_path):
    path = tmp_path / "slurm.json"
    path.write_text(json.dumps({"partitoin": "gpu"}))
    with pytest.raises(slurm.SlurmError, match="Did you mean partition"):
        slurm.load_config(path)


# -- errors before submitting ----------------------------------------------------------------------


def test_no_sbatch_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.SlurmError, match="sbatch is not on PATH: --executor slurm submits from a Slurm login"):
        slurm.check_cluster(slurm.SlurmConfig())


def test_an_unknown_partition_lists_the_known_ones(monkeypatch, tmp_path):
    fake_bin(tmp_path, "sbatch", "exit 1")
    fake_bin(tmp_path, "sinfo", "printf 'debug\\ngpu\\n'")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(slurm.SlurmError, match=r"partition 'gpu-a100' does not exist on this cluster "
                                               r"\(sinfo lists debug, gpu\); fix --partition"):
        slurm.check_cluster(slurm.SlurmConfig(partition="gpu-a100"))
    slurm.check_cluster(slurm.SlurmConfig(partition="gpu"))


def test_a_results_folder_the_nodes_cannot_see(monkeypatch, tmp_path):
    # the job "runs" elsewhere: it never answers and leaves the queue at once
    fake_bin(tmp_path / "bin", "sbatch", "echo 77")
    fake_bin(tmp_path / "bin", "squeue", "exit 0")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "_PROBE_GRACE", 0.2)
    with pytest.raises(slurm.SlurmError, match=r"is not visible from the compute nodes .* probe job 77 ended "
                                               r"without answering; put --results-dir on a filesystem the nodes share"):
        slurm.probe(tmp_path / "results", slurm.SlurmConfig(), timeout=20)
    assert not list((tmp_path / "results" / ".sweeps" / ".probe").iterdir())  # the token is cleaned up


def test_a_probe_answer_is_returned(monkeypatch, tmp_path):
    # this "node" shares the folder: the fake sbatch runs the wrapped command itself
    fake_bin(tmp_path / "bin", "sbatch", 'for a in "$@"; do case "$a" in --wrap=*) sh -c "${a#--wrap=}";; esac; done; echo 78')
    fake_bin(tmp_path / "bin", "squeue", "exit 0")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    answer = slurm.probe(tmp_path / "results", slurm.SlurmConfig(), timeout=60)
    assert answer["node"] and Path(answer["python"]).exists()


def test_slurm_options_without_the_slurm_executor_are_a_usage_error():
    result = CliRunner().invoke(cli, ["run", "clip", "--dataset", "synthetic", "--partition", "gpu"])
    assert result.exit_code == 2 and "--partition only apply to --executor slurm" in result.output


def test_dry_run_prints_the_cells_and_the_array_and_writes_nothing(tmp_path):
    results = tmp_path / "results"
    result = CliRunner().invoke(cli, [*PLANNED, "--results-dir", str(results), "--executor", "slurm", "--dry-run",
                                      "--partition", "gpu", "--gpus", "1", "--max-parallel", "1", "--time", "2:00:00",
                                      "--sbatch=--exclude=node3"])
    assert result.exit_code == 0, result.output
    assert "2 cells, 0 with records already, 2 to submit" in result.output
    assert "task 1: csp synthetic seed1" in result.output
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=120", "#SBATCH --exclude=node3", "#SBATCH --signal=USR2@120",
                 "-m submitit.core._submit"):
        assert line in result.output
    assert "dry run: nothing submitted" in result.output
    assert not results.exists()


def test_ablate_dry_run_plans_one_task_per_configuration_and_seed(tmp_path):
    result = CliRunner().invoke(cli, ["ablate", "csp", "--dataset", "synthetic", "--seed", "0,1", "--set", "epochs=1",
                                      "--results-dir", str(tmp_path), "--executor", "slurm", "--dry-run",
                                      "--slurm-config", str(_write(tmp_path / "s.json", '{"partition": "gpu", "gpus": 1}'))])
    assert result.exit_code == 0, result.output
    assert "task 0: no-dropout synthetic seed0" in result.output and "task 1: no-dropout synthetic seed1" in result.output
    assert "#SBATCH --array=0-1%2" in result.output and "#SBATCH --partition=gpu" in result.output
    assert not (tmp_path / ".sweeps").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- a sweep's states --------------------------------------------------------------------------------


def _sweep(folder: Path, n: int = 4) -> Sweep:
    """A saved sweep in ``folder`` of ``n`` csp cells (records would be ``folder/seed<i>.json``)."""
    cells = [Cell(index=i, method="csp", dataset="toy", seed=i, settings=["closed"], ablation=None,
                  fingerprints={"closed": f"fp{i}"}, groups={"closed": "g"},
                  records={"closed": str(folder / f"seed{i}.json")}, checkpoint=None, label="csp")
             for i in range(n)]
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sub = Submission(cells=list(range(n)), jobs=[f"9_{i}" for i in range(n)],
                     logs=[str(logs / f"9_{i}_0_log.out") for i in range(n)], submitted="now", command=["czsl-bench"])
    sweep = Sweep(id=folder.name, dir=folder, created="now", command=["czsl-bench"], cwd=".", kind="run",
                  options={}, executor={}, cells=cells, submissions=[sub])
    sweep.save()
    return sweep


def test_states_come_from_records_the_queue_and_the_status_files(tmp_path):
    sweep = _sweep(tmp_path)
    Path(sweep.cells[0].records["closed"]).write_text(json.dumps({"fingerprint": "fp0"}))  # done
    write_status(sweep.dir, 1, state="failed", job="9_1", started=time.time() - 5, ended=time.time(),
                 error="checkpoint x cannot be read (UnpicklingError); delete it to start over")
    write_status(sweep.dir, 2, state="running", job="9_2", started=time.time())
    Path(sweep.submissions[0].logs[2]).write_text(
        "training...\nslurmstepd: error: *** JOB 11 ON n1 CANCELLED AT 2026-11-24T10:00:00 DUE TO TIME LIMIT ***\n")
    queue = {"9_3": slurm.QueueEntry("PENDING", "0:00", "Resources")}
    states = {s.cell.index: s for s in cell_states(Sweep.load(sweep.dir), queue)}
    assert [states[i].state for i in range(4)] == ["done", "failed", "lost", "pending"]
    assert states[1].error.startswith("checkpoint x cannot be read") and 4 < states[1].seconds < 6
    assert states[2].error == "*** JOB 11 ON n1 CANCELLED AT 2026-11-24T10:00:00 DUE TO TIME LIMIT ***"
    assert states[3].reason == "Resources"
    assert [c.index for c in to_resubmit(states.values())] == [1, 2]
    # once the pending task has left the queue without a record, it is missing
    assert cell_states(sweep, {})[3].state == "missing"


def test_jobs_lists_a_sweep_without_squeue(monkeypatch, tmp_path):
    results = tmp_path / "results"
    sweep = _sweep(results / ".sweeps" / "20261124-100000-ab12", n=2)
    write_status(sweep.dir, 1, state="failed", job="9_1", started=1.0, ended=3.0, error="boom: one line")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(cli, ["jobs", "--results-dir", str(results)])
    assert result.exit_code == 1
    assert "squeue is not available here" in result.output
    assert "failed" in result.output and "boom: one line" in result.output and "9_1_0_log.out" in result.output
    waiting = CliRunner().invoke(cli, ["jobs", "--results-dir", str(results), "--wait"])
    assert waiting.exit_code == 1 and "squeue is not available here, so the end" in waiting.output
    refused = CliRunner().invoke(cli, ["jobs", "resubmit", "--results-dir", str(results)])
    assert refused.exit_code == 1 and "squeue is not available" in refused.output
    unknown = CliRunner().invoke(cli, ["jobs", "--results-dir", str(results), "--sweep", "nope"])
    assert unknown.exit_code == 1 and "'nope' is not a sweep" in unknown.output


def test_jobs_without_any_sweep_says_how_to_make_one(tmp_path):
    result = CliRunner().invoke(cli, ["jobs", "--results-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no sweep under" in result.output and "--executor slurm" in result.output


# -- tables while a sweep runs ------------------------------------------------------------------------


def _record(seed: int) -> RunRecord:
    from czsl_bench.identity import RunIdentity

    ident = RunIdentity(method="csp", config={"lr": 0.1}, backbone={"arch": "a", "pretrained": None, "weights_hash": "w"},
                        dataset={"name": "toy", "version": "v"}, setting="closed", seed=seed, protocol="p")
    return RunRecord(method="csp", dataset="toy", setting="closed", seed=seed, protocol="p",
                     metrics={"test": {"best_seen": 0.5, "best_unseen": 0.4, "best_hm": 0.3, "auc": 0.2 + seed / 100}},
                     identity=ident.to_dict(), fingerprint=ident.fingerprint)


def test_a_table_marks_cells_whose_sweep_seeds_are_not_all_recorded(tmp_path):
    records = [_record(0), _record(1)]
    group = records[0].group_fingerprint
    partial = build_table(records, expected={group: {0, 1, 2}})
    text = render(partial, "markdown")
    assert "20.5 ± 0.7 (2/3)" in text and "50.0 ± 0.0 (2/3)" in text
    assert "still queued, running or failed" in text
    assert "(2/3)" not in render(build_table(records, expected={group: {0, 1}}), "markdown")
    assert "(2/3)" not in render(build_table(records), "markdown")


def test_expected_seeds_read_the_sweeps_under_the_results(tmp_path):
    _sweep(tmp_path / ".sweeps" / "20261124-100000-ab12", n=3)
    (tmp_path / ".sweeps" / "broken").mkdir()
    (tmp_path / ".sweeps" / "broken" / "sweep.json").write_text("{")
    assert expected_seeds(tmp_path) == {"g": {0, 1, 2}}


# -- several processes per task (DDP) ------------------------------------------------------------


def test_nproc_per_task_is_one_slurm_task_per_rank_on_one_node(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text("nproc-per-task: 2\ngpus: 2\n")
    cfg = slurm.load_config(path)
    assert cfg.nproc_per_task == 2
    params = cfg.submitit_parameters(3)
    assert params["ntasks_per_node"] == 2 and params["nodes"] == 1 and params["gpus_per_node"] == 2
    assert "ntasks_per_node" not in slurm.SlurmConfig().submitit_parameters(3)
    assert slurm.load_config(ntasks_per_node=4).nproc_per_task == 4  # the sbatch/submitit alias


@pytest.mark.parametrize("kwargs, message", [
    (dict(nproc_per_task=0), "nproc_per_task is 0"),
    (dict(nproc_per_task=2, gpus=1), "each rank uses one GPU, so give --gpus 2"),
])
def test_bad_rank_settings_are_one_line(kwargs, message):
    with pytest.raises(slurm.SlurmError, match=message) as err:
        slurm.SlurmConfig(**kwargs).validate()
    assert "\n" not in str(err.value)


def test_a_task_exports_torchrun_variables_from_slurms():
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234"}
    assert slurm.export_rank_env(env) == 2
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("1", "2", "1", "127.0.0.1", "21234")
    single = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert slurm.export_rank_env(single) == 1 and "WORLD_SIZE" not in single


def test_dry_run_with_ranks_plans_ddp_fingerprints_and_shows_them(tmp_path):
    results = tmp_path / "results"
    args = [*PLANNED, "--results-dir", str(results), "--executor", "slurm", "--dry-run"]
    single = CliRunner().invoke(cli, args)
    ddp = CliRunner().invoke(cli, [*args, "--nproc-per-task", "2", "--set", "batch_size=8"])
    assert single.exit_code == 0 and ddp.exit_code == 0, ddp.output
    assert "DDP on 2 processes" in ddp.output and "#SBATCH --ntasks-per-node=2" in ddp.output
    assert "/ddp2/seed1.json" in ddp.output and "/ddp2/" not in single.output
    assert "--ntasks-per-node=2" not in single.output

    # the planner's fingerprint is the one a run on 2 processes computes (WORLD_SIZE=2, as torchrun sets it)
    from czsl_bench import api

    spec = api.RunSpec("csp", "synthetic", 0, ("closed",))
    opts = api.RunOptions(overrides=["epochs=1", "batch_size=8"], results_dir=str(results))
    (planned,) = api.identify([spec], opts, world_size=2)
    os.environ["WORLD_SIZE"] = "2"
    try:
        (env_plan,) = api.identify([spec], opts)
    finally:
        del os.environ["WORLD_SIZE"]
    (alone,) = api.identify([spec], opts)
    assert planned.identities["closed"].world_size == 2
    assert planned.identities["closed"].fingerprint == env_plan.identities["closed"].fingerprint
    assert planned.identities["closed"].fingerprint != alone.identities["closed"].fingerprint
    assert planned.checkpoint != alone.checkpoint


@pytest.mark.parametrize("args, message", [
    (["run", "clip", "--dataset", "synthetic", "--nproc-per-task", "2"], "clip does not train"),
    ([*PLANNED, "--nproc-per-task", "3", "--set", "batch_size=8"], "batch_size 8 is the global batch of a run on 3"),
])
def test_ranks_for_a_cell_that_cannot_take_them_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(cli, [*args, "--results-dir", str(tmp_path / "r"), "--executor", "slurm", "--dry-run"])
    assert result.exit_code == 2 and message in result.output


def test_resubmit_keeps_the_sweeps_world_size(tmp_path):
    results = tmp_path / "results"
    sweep = _sweep(results / ".sweeps" / "20261124-100000-ab12", n=2)
    sweep.executor = {**sweep.executor, "nproc_per_task": 2}
    sweep.save()
    result = CliRunner().invoke(cli, ["jobs", "resubmit", "--results-dir", str(results), "--dry-run",
                                      "--nproc-per-task", "1"])
    assert result.exit_code == 2 and "planned with --nproc-per-task 2" in result.output
