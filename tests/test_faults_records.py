"""Fault cases of the records layer that issue #12 listed and the run identity closes:
two files holding one run, and a record of a newer schema at a writer's path."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from czsl_bench.records import SCHEMA_VERSION, RecordError, load_records, write_record
from czsl_bench.tables import build_table
from fixtures.records import make_run_record

METRICS = {"val": {"auc": 0.2}, "test": {"auc": 0.3, "best_hm": 0.4, "best_seen": 0.5, "best_unseen": 0.6}}


def test_a_duplicate_file_of_one_run_names_both_files_and_the_one_used(tmp_path):
    paths = [write_record(make_run_record("csp", "mit-states", "closed", seed, METRICS), tmp_path) for seed in (0, 1)]
    copy = paths[0].with_name("seed0-old.json")
    shutil.copy(paths[0], copy)
    records = load_records(tmp_path)
    assert len(records) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = build_table(records, "closed")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert str(paths[0]) in messages[0] and str(copy) in messages[0]
    assert messages[0].endswith(f"using {paths[0]}")  # the file at the canonical path wins
    assert table.n.iloc[0].max() == 2  # both seeds still in the row: none vanished


def test_no_writer_overwrites_a_record_of_a_newer_schema(tmp_path):
    record = make_run_record("csp", "mit-states", "closed", 0, METRICS)
    path = write_record(record, tmp_path)
    newer = json.loads(path.read_text()) | {"schema_version": SCHEMA_VERSION + 1}
    newer["environment"] = {"packages": {"czsl-bench": "9.9.9"}}
    path.write_text(json.dumps(newer))
    with pytest.raises(RecordError, match="written by czsl-bench 9.9.9"):
        write_record(record, tmp_path)
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION + 1  # untouched


def test_a_record_of_another_run_at_the_path_is_kept_beside(tmp_path):
    old = make_run_record("csp", "mit-states", "closed", 0, METRICS, dataset_version="old-copy")
    new = make_run_record("csp", "mit-states", "closed", 0, METRICS, dataset_version="new-copy")
    path = write_record(old, tmp_path)
    with pytest.warns(UserWarning, match="held another run"):
        assert write_record(new, tmp_path) == path
    kept = path.with_name(f"seed0.{old.fingerprint[:8]}.json")
    assert json.loads(kept.read_text())["fingerprint"] == old.fingerprint
    assert json.loads(path.read_text())["fingerprint"] == new.fingerprint
