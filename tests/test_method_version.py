"""The method's code version in the run identity (docs/results.md "Run identity"): a method
declares ``version`` (``Method.version``, default ``"1"``); a change of its numerics bumps it, so
records of the older code get other fingerprints: ``--skip-existing`` runs again, ``table`` keeps
the two apart, ``--resume`` does not continue the old checkpoint. Records written before the field
(identity version 1) are read as ``method_version "1"``; ``czsl-bench records migrate`` rewrites
them in place."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

import czsl_bench
from czsl_bench import api
from czsl_bench.cli import cli
from czsl_bench.hashing import short_hash
from czsl_bench.identity import IDENTITY_VERSION, RunIdentity, differing_fields
from czsl_bench.methods.clip import CLIPZeroShot
from czsl_bench.records import RecordError, find_existing, load_records, read_record, write_record
from czsl_bench.registry import METHODS
from czsl_bench.tables import build_table
from fixtures.records import make_identity, make_run_record
from fixtures.tiny_three_path import registered_toy_world


class ToyVersionedMethod(CLIPZeroShot):
    """CLIP zero-shot under another name; the tests bump its declared version."""

    name = "toy-versioned"


@pytest.fixture
def toy_method():
    METHODS.register("toy-versioned")(ToyVersionedMethod)
    try:
        yield ToyVersionedMethod
    finally:
        METHODS.unregister("toy-versioned")
        ToyVersionedMethod.version = "1"


def _as_identity_v1(record) -> dict:
    """``record`` as czsl-bench wrote it before method versions: identity version 1."""
    data = json.loads(record.to_json())
    identity = {k: v for k, v in data["identity"].items() if k != "method_version"}
    identity["version"] = 1
    data["identity"], data["fingerprint"] = identity, short_hash(identity)
    return data


def test_every_built_in_method_declares_its_version():
    versions = {name: METHODS.get(name).version for name in METHODS.names()}
    assert all(isinstance(v, str) and v for v in versions.values()), versions
    assert versions["cluspro"] == "2"  # issue #11: line search, nHSIC, stopping, paper EMA
    assert versions["cluspro-base"] == "1"  # no clustering: untouched by those changes
    assert api._method_version("cluspro") == "2" and api._method_version("csp") == "1"


def test_method_version_changes_every_fingerprint_and_is_validated():
    one = make_identity("cluspro")
    two = dataclasses.replace(one, method_version="2")
    assert one.method_version == "1" and one.version == IDENTITY_VERSION == 2
    assert one.fingerprint != two.fingerprint and one.group_fingerprint != two.group_fingerprint
    assert api.training_fingerprint(one) != api.training_fingerprint(two)  # --resume keeps them apart
    assert one.config_fingerprint == two.config_fingerprint  # same config folder: the path is the same
    assert differing_fields([one.to_dict(), two.to_dict()]) == ["method_version"]
    with pytest.raises(ValueError, match="method_version is ''"):
        dataclasses.replace(one, method_version="")
    with pytest.raises(ValueError, match="identity version is 1"):
        RunIdentity.from_dict({k: v for k, v in one.to_dict().items() if k != "method_version"} | {"version": 1})


def test_an_identity_v1_record_is_read_as_method_version_1(tmp_path):
    fresh = make_run_record("csp", "mit-states", "closed", 0)
    path = tmp_path / "seed0.json"
    path.write_text(json.dumps(_as_identity_v1(fresh)))
    record = read_record(path)
    assert record.identity == fresh.identity and record.fingerprint == fresh.fingerprint  # the same run
    assert record.run_identity.method_version == "1"
    assert record.provenance["migrated_from_identity"] == 1
    assert "identity v1 read as v2: method_version taken as '1'" in record.notes

    edited = _as_identity_v1(fresh)
    edited["identity"]["seed"] = 7  # the stored fingerprint no longer matches: refused, not migrated
    path.write_text(json.dumps(edited))
    with pytest.raises(RecordError, match="identity version is 1"):
        read_record(path)


def test_records_migrate_rewrites_identity_v1_in_place(tmp_path):
    fresh = make_run_record("csp", "mit-states", "closed", 0)
    write_record(fresh, tmp_path)
    path = fresh.source_path
    path.write_text(json.dumps(_as_identity_v1(fresh)))
    result = CliRunner().invoke(cli, ["records", "migrate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"rewrote {path} (identity v1 -> v2, method_version 1)" in result.output
    assert "1 record(s) migrated" in result.output
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]  # no `seed0.<fp8>.json` left beside
    raw = json.loads(path.read_text())
    assert raw["identity"]["version"] == 2 and raw["identity"]["method_version"] == "1"
    assert raw["fingerprint"] == fresh.fingerprint
    again = CliRunner().invoke(cli, ["records", "migrate", str(tmp_path)])
    assert again.exit_code == 0 and "0 record(s) migrated" in again.output


def test_a_new_method_version_is_not_skipped_averaged_or_confused(toy_method, tmp_path):
    results = tmp_path / "results"
    with registered_toy_world(tmp_path / "toy") as toy:
        opts = dict(backbone="czsl-tiny-vit", pretrained="none", results_dir=results, cache_dir=tmp_path / "cache")
        old = czsl_bench.run("toy-versioned", toy, seed=0, **opts)
        # the record as an older czsl-bench wrote it (identity v1) is the same run: skipped
        old.source_path.write_text(json.dumps(_as_identity_v1(old)))
        spec = api.RunSpec("toy-versioned", toy, 0, ("closed",))
        skipped = api.execute(spec, api.RunOptions(skip_existing=True, **opts))
        assert skipped.skipped and skipped.records[0].fingerprint == old.fingerprint

        toy_method.version = "2"  # the method's numerics changed
        assert find_existing(results, dataclasses.replace(old.run_identity, method_version="2")) is None
        with pytest.warns(UserWarning, match="held another run"):  # same path, another fingerprint: kept
            rerun = api.execute(spec, api.RunOptions(skip_existing=True, **opts))
        assert not rerun.skipped
    new = rerun.records[0]
    assert (old.identity["method_version"], new.identity["method_version"]) == ("1", "2")
    assert old.metrics == new.metrics  # the toy method did not really change: only the version differs
    records = load_records(results)
    assert sorted(r.identity["method_version"] for r in records) == ["1", "2"]  # both files kept
    table = build_table(records, "closed")
    rows = [label for label in table.mean.index if label.startswith("toy-versioned")]
    assert len(rows) == 2 and (table.n.loc[rows] == 1).all().all()  # never averaged
    assert any("method_version" in note and "never averaged" in note for note in table.notes)
