"""Fault injection for inputs and writers (issue #12): every bad input is one line naming what,
where and how to fix it, never a traceback; every file is written atomically with the umask's
permissions; a full disk says so and leaves nothing behind."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

from czsl_bench import atomic
from czsl_bench.cli import cli
from czsl_bench.records import RunRecord, write_record
from fixtures.records import make_identity, make_run_record


def _record(seed: int = 0, auc: float = 0.2) -> RunRecord:
    return make_run_record("csp", "synthetic", "closed", seed,
                           {"val": {"auc": auc}, "test": {"auc": auc, "best_hm": auc, "best_seen": auc,
                                                          "best_unseen": auc}})


def _one_line_error(result, code: int | tuple[int, ...] = (1, 2)) -> str:
    """The CLI failed the way a person can act on: an error exit code, no traceback, one line."""
    codes = (code,) if isinstance(code, int) else code
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# ----------------------------------------------------------------------------------------------
# writers: permissions follow the umask, a full disk is one line and no partial file
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _toy_trainer_run(tmp_path, epochs: int = 1):
    from test_training import ToyConfig, ToyMethod, _ctx, _validate

    from czsl_bench.training import Trainer

    method = ToyMethod(ToyConfig(epochs=epochs, batch_size=16, lr=0.05))
    ctx = _ctx(0)
    method.prepare(ctx)
    Trainer(seed=0, validate=_validate, checkpoint_dir=tmp_path).fit(method, ctx)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_every_writer_honours_the_umask(tmp_path, mask):
    from czsl_bench.cache import FeatureCache

    expected = 0o666 & ~mask
    with _umask(mask):
        record = write_record(_record(), tmp_path / "results")
        res = CliRunner().invoke(cli, ["table", "--results-dir", str(tmp_path / "results"),
                                       "--output", str(tmp_path / "table.md")])
        assert res.exit_code == 0, res.output
        cache = FeatureCache(tmp_path / "cache")
        entry = cache.put(cache.key(kind="test"), {"x": torch.zeros(3)})
        _toy_trainer_run(tmp_path / "ckpt")
        text = atomic.atomic_write_text(tmp_path / "a.txt", "a")
    for path in (record, tmp_path / "table.md", entry, tmp_path / "ckpt" / "last.pt", text):
        assert _mode(path) == expected, (path, oct(_mode(path)), oct(expected))


def test_ablation_plot_honours_the_umask(tmp_path):
    from czsl_bench.methods.cluspro import ClusPro
    from czsl_bench.plots import ablation_sweep_figure

    records = [make_run_record("cluspro", "synthetic", "closed", s, {"test": {"auc": 0.1 + k / 100}},
                               variant=f"k-{k}", overrides={"n_prototypes": k}) for k in (1, 3) for s in range(2)]
    with _umask(0o022):
        out = ablation_sweep_figure(records, "cluspro", "synthetic", ClusPro.ablation_sweeps(), tmp_path / "p.png")
    assert _mode(out) == 0o644


class _FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: then every write fails with ENOSPC."""

    def __init__(self, raw, room: int):
        self.raw, self.room = raw, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.raw.write(data)

    def fileno(self):
        return self.raw.fileno()

    def close(self):
        self.raw.close()
        super().close()


def _disk_with(monkeypatch, room: int) -> None:
    """Every atomic write from now on gets a file object that runs out of space after ``room`` bytes."""
    real = atomic._fdopen

    def fdopen(fd, mode, encoding=None):
        buffered = io.BufferedWriter(_FullDisk(real(fd, "wb", buffering=0), room))
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=encoding or "utf-8")

    monkeypatch.setattr(atomic, "_fdopen", fdopen)


def test_checkpoint_on_a_full_disk_says_disk_full_and_leaves_no_partial_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    _disk_with(monkeypatch, 200)
    with pytest.raises(atomic.DiskFullError) as info:
        _toy_trainer_run(ckpt)
    message = str(info.value)
    assert message.startswith("disk full") and str(ckpt) in message, message
    assert "\n" not in message and "unexpected pos" not in message
    assert info.value.errno == errno.ENOSPC
    assert list(ckpt.iterdir()) == []  # neither last.pt nor a temp file


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")
    _disk_with(monkeypatch, 3)
    with pytest.raises(OSError, match=r"^disk full: could not write r\.json in .*free space"):
        atomic.atomic_write_bytes(target, b"new contents")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_table_output_on_a_full_disk_is_one_cli_line(tmp_path, monkeypatch):
    write_record(_record(), tmp_path)
    _disk_with(monkeypatch, 10)
    res = CliRunner().invoke(cli, ["table", "--results-dir", str(tmp_path), "--output", str(tmp_path / "t.md")])
    line = _one_line_error(res, 1)
    assert "disk full" in line and str(tmp_path) in line, line
    assert not (tmp_path / "t.md").exists() and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# records: a deeply nested JSON file is one unreadable record, not a crash
# ----------------------------------------------------------------------------------------------
DEEP = "[" * 200_000


def test_deeply_nested_record_is_skipped_by_table(tmp_path):
    good = write_record(_record(seed=0, auc=0.25), tmp_path)
    deep = good.with_name("seed1.json")
    deep.write_text(DEEP)
    res = CliRunner().invoke(cli, ["table", "--results-dir", str(tmp_path), "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "RecursionError" not in res.output
    assert f"skipping {deep}: not a record: JSON nested too deeply to read" in res.output
    assert "25.0" in res.output  # the readable record still makes the table


def test_deeply_nested_record_counts_as_unfinished_for_skip_existing(tmp_path):
    from czsl_bench.records import RecordError, find_existing, load_records, read_record, record_path

    ident = make_identity("csp", "synthetic", "closed", 0)
    deep = record_path(tmp_path, ident)
    deep.parent.mkdir(parents=True)
    deep.write_text('{"schema_version": 1, "config": ' + DEEP)
    assert find_existing(tmp_path, ident) is None
    with pytest.raises(RecordError, match=r"seed0\.json: not a record: JSON nested too deeply to read$"):
        read_record(deep)
    reasons = []
    assert load_records(tmp_path, on_error=lambda p, why: reasons.append(why)) == []
    assert reasons == ["not a record: JSON nested too deeply to read"]


def test_skip_existing_sweep_reruns_over_a_deeply_nested_record(tmp_path):
    from fixtures.toy_world import registered_toy_dataset

    from czsl_bench.records import read_record, record_path

    with registered_toy_dataset(tmp_path / "toy"):
        results = tmp_path / "results"
        # the path of the run's record (it depends on method, dataset, backbone, setting and seed only)
        deep = record_path(results, make_identity("clip", "toy", "closed", 0,
                                                  backbone={"arch": "czsl-tiny-vit", "pretrained": None}))
        deep.parent.mkdir(parents=True)
        deep.write_text(DEEP)
        res = CliRunner().invoke(cli, ["run", "clip", "--dataset", "toy", "--seed", "0,1", "--skip-existing",
                                       "--backbone", "czsl-tiny-vit", "--pretrained", "none", "-q",
                                       "--results-dir", str(results), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "2/2 runs ok" in res.output
    assert read_record(deep).seed == 0  # the damaged file was replaced by a real record
