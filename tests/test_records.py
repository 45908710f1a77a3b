"""Run records: schema, round trip, deterministic paths, atomic writes, loading, published rows."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from czsl_bench import records as rec_mod
from czsl_bench.identity import RunIdentity
from czsl_bench.records import (
    METRICS,
    SCHEMA_VERSION,
    RecordError,
    RunRecord,
    environment,
    find_existing,
    git_revision,
    json_schema,
    load_records,
    read_record,
    record_path,
    write_record,
)

from fixtures.records import make_identity, make_run_record

REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "results" / "reported"
REFERENCE = REPO / "results" / "reference"
BACKBONE_DIR = "ViT-L-14-quickgelu-openai"  # <arch>-<tag> of make_record's backbone


def make_record(**changes) -> RunRecord:
    """A complete schema-2 run record; its identity follows the changed fields."""
    base = dict(
        method="csp", dataset="mit-states", setting="closed", seed=0,
        metrics={"val": {"best_seen": 0.5, "best_unseen": 0.4, "best_hm": 0.35, "auc": 0.2, "bias": -1.25},
                 "test": {"best_seen": 0.45, "best_unseen": 0.5, "best_hm": 0.36, "auc": 0.19}},
        protocol="czsl-legacy-20bin", config={"lr": 5e-5, "optim": {"name": "adam"}},
        backbone={"arch": "ViT-L-14-quickgelu", "pretrained": "openai"},
        chosen_epoch=7, timings={"fit": 12.5, "total": 20.0}, params={"trainable": 10, "total": 100},
        created="2026-01-01T00:00:00Z",
    )
    base.update(changes)
    method, dataset, setting, seed, metrics = (base.pop(k) for k in ("method", "dataset", "setting", "seed", "metrics"))
    return make_run_record(method, dataset, setting, seed, metrics, **base)


def test_json_round_trip_is_exact():
    record = make_record(environment=environment(), open_threshold=None, n_images={"val": 3, "test": 4})
    text = record.to_json()
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    assert list(json.loads(text))[0] == "schema_version"
    assert RunRecord.from_json(text) == record


def test_record_path_is_deterministic_and_folds_in_the_variant(tmp_path):
    ident = make_identity("csp", "mit-states", "closed", 2)
    assert record_path(tmp_path, ident) == tmp_path / f"csp/mit-states/{BACKBONE_DIR}/closed/seed2.json"
    assert record_path(tmp_path, ident) == record_path(tmp_path, make_identity("csp", "mit-states", "closed", 2))
    # a changed config gets a folder named by the variant (or "custom") and the config's fingerprint
    k1 = make_identity("cluspro", "ut-zappos", "open", 0, config={"K": 1},
                       backbone={"arch": "czsl-tiny-vit", "pretrained": None})
    cfg8 = k1.config_fingerprint
    assert len(cfg8) == 8
    assert record_path("results", k1, variant="k1", overrides={"K": 1}) == \
        Path(f"results/cluspro/ut-zappos/czsl-tiny-vit-random/open/k1-{cfg8}/seed0.json")
    assert record_path("results", k1, overrides={"K": 1}) == \
        Path(f"results/cluspro/ut-zappos/czsl-tiny-vit-random/open/custom-{cfg8}/seed0.json")
    # a variant label that changes nothing is the plain run: the label is not part of the identity
    assert record_path("results", k1, variant="k1") == Path("results/cluspro/ut-zappos/czsl-tiny-vit-random/open/seed0.json")
    # another backbone, weights tag or config is another path
    other = make_identity("cluspro", "ut-zappos", "open", 0, config={"K": 3},
                          backbone={"arch": "czsl-tiny-vit", "pretrained": None})
    assert record_path("results", other, "k1", {"K": 3}) != record_path("results", k1, "k1", {"K": 1})
    tagged = make_identity("csp", "mit-states", "closed", 2, backbone={"pretrained": "/weights/my.ckpt.pt"})
    assert record_path(tmp_path, tagged).parent.parent.name == "ViT-L-14-quickgelu-file-my"


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="../evil"), "method '../evil' is not a valid name"),
    (dict(dataset="a/b"), "dataset 'a/b' is not a valid name"),
    (dict(variant=".hidden"), "variant '.hidden' is not a valid name"),
    (dict(method="reported"), "reserved"),
    (dict(method="reference"), "reserved"),
    (dict(setting="both"), "setting is 'both'"),
    (dict(seed=-1), "seed is -1"),
])
def test_record_path_rejects_unsafe_keys(tmp_path, kwargs, message):
    args = dict(method="csp", dataset="mit-states", setting="closed", seed=0) | kwargs
    variant = args.pop("variant", None)
    ident = make_identity(args["method"], args["dataset"], args["setting"], args["seed"])
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(".", r"\.")):
        # the variant only names a folder when the config changed
        record_path(tmp_path, ident, variant, {"lr": 1.0} if variant else None)


@pytest.mark.parametrize("changes, message", [
    (dict(metrics={"test": {"auc": 52.1}}), "divide percentages by 100"),
    (dict(metrics={"test": {"accuracy": 0.5}}), "unknown metric 'accuracy'"),
    (dict(metrics={"train": {"auc": 0.5}}), "split 'train'"),
    (dict(metrics={}), "metrics is empty"),
    (dict(metrics={"test": {"auc": float("nan")}}), "must be a finite number"),
    (dict(setting="closed-world"), "setting is 'closed-world'"),
    (dict(seed=None), "a run record needs a seed"),
    (dict(source="paper", seed=None), "needs a citation"),
    (dict(schema_version=SCHEMA_VERSION + 1), "upgrade czsl-bench"),
    (dict(params={"trainable": -3}), "params.trainable"),
    (dict(metrics_std={"test": {"best_hm": 0.01}}, metrics={"test": {"auc": 0.1}}), "without a mean"),
])
def test_validation_errors_name_the_field(changes, message):
    with pytest.raises(RecordError, match=message.replace("(", r"\(")) as info:
        make_record(**changes)
    assert "\n" not in str(info.value)


def test_from_json_rejects_unknown_and_missing_fields():
    data = json.loads(make_record().to_json())
    with pytest.raises(RecordError, match="unknown field"):
        RunRecord.from_dict(data | {"acc": 1})
    del data["metrics"]
    with pytest.raises(RecordError, match="missing field"):
        RunRecord.from_dict(data)
    with pytest.raises(RecordError, match="not valid JSON"):
        RunRecord.from_json("{")


def test_write_record_is_atomic_and_leaves_no_temp_file(tmp_path):
    record = make_record()
    path = write_record(record, tmp_path)
    assert path == tmp_path / f"csp/mit-states/{BACKBONE_DIR}/closed/seed0.json"
    assert record.source_path == path
    assert read_record(path) == record
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]


def test_a_run_record_carries_its_identity_and_fingerprint():
    record = make_record()
    assert record.key == ("run", record.fingerprint)
    assert record.run_identity.fingerprint == record.fingerprint
    assert record.group_fingerprint == make_record(seed=1).group_fingerprint  # seeds of one configuration
    assert record.group_fingerprint != make_record(config={"lr": 1e-3}).group_fingerprint
    data = json.loads(record.to_json())
    with pytest.raises(RecordError, match="needs an identity"):
        RunRecord.from_dict(data | {"identity": {}, "fingerprint": None})
    with pytest.raises(RecordError, match="does not match its identity"):
        RunRecord.from_dict(data | {"fingerprint": "0" * 16})  # an edited file
    other = RunIdentity.from_dict(data["identity"] | {"seed": 5})
    with pytest.raises(RecordError, match="identity names another method, setting or seed"):
        RunRecord.from_dict(data | {"identity": other.to_dict(), "fingerprint": other.fingerprint})


def test_write_record_keeps_another_run_found_at_its_path(tmp_path):
    first = make_record()
    path = write_record(first, tmp_path)
    other = make_record(dataset_version="another-copy", metrics={"test": {"auc": 0.3}})  # same path, other run
    assert other.fingerprint != first.fingerprint
    with pytest.warns(UserWarning, match="held another run"):
        assert write_record(other, tmp_path) == path
    kept = path.with_name(f"seed0.{first.fingerprint[:8]}.json")
    assert read_record(path) == other and read_record(kept) == first
    write_record(other, tmp_path)  # the same run again: rewritten in place, nothing else kept
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["seed0.json", kept.name])
    assert sorted(r.fingerprint for r in load_records(tmp_path)) == sorted([first.fingerprint, other.fingerprint])


def test_write_record_never_overwrites_a_newer_schema(tmp_path):
    path = write_record(make_record(), tmp_path)
    newer = json.loads(path.read_text()) | {"schema_version": SCHEMA_VERSION + 1,
                                            "environment": {"packages": {"czsl-bench": "9.9"}}}
    path.write_text(json.dumps(newer))
    with pytest.raises(RecordError, match=f"refusing to overwrite .*schema {SCHEMA_VERSION + 1} record "
                                          "written by czsl-bench 9.9"):
        write_record(make_record(), tmp_path)
    assert json.loads(path.read_text()) == newer
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]


def test_find_existing_matches_the_fingerprint_only(tmp_path):
    record = make_record()
    write_record(record, tmp_path)
    found = find_existing(tmp_path, record.run_identity)
    assert found == record and found.source_path == record.source_path
    # same path, other identity (another dataset copy): not this run
    assert find_existing(tmp_path, make_record(dataset_version="another-copy").run_identity) is None
    assert find_existing(tmp_path, make_record(seed=1).run_identity) is None


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    old = make_record()
    path = write_record(old, tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # what a killed run looks like from inside

    monkeypatch.setattr(rec_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_record(make_record(metrics={"test": {"auc": 0.9}}), tmp_path)
    assert read_record(path) == old  # never half-written
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]  # temp file removed


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(rec_mod.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_record(make_record(), tmp_path)
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.tmp"))
    assert find_existing(tmp_path, make_record().run_identity) is None


def test_killed_writer_process_never_leaves_a_partial_record(tmp_path):
    """SIGKILL a process that rewrites a record in a loop; the file always parses."""
    import signal
    import subprocess
    import sys
    import time

    path = write_record(make_record(), tmp_path)
    script = (
        "import sys\n"
        "from czsl_bench.records import RunRecord, write_record, read_record\n"
        f"rec = read_record({str(path)!r})\n"
        "rec.config = {'blob': 'x' * 200000}\n"
        "while True:\n"
        f"    write_record(rec, {str(tmp_path)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while "blob" not in path.read_text() and time.monotonic() < deadline:  # wait for the first rewrite
        time.sleep(0.02)
    time.sleep(0.2)  # now it is mid-loop: the kill lands during some write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "blob" in path.read_text()
    finished = find_existing(tmp_path, read_record(path).run_identity)
    assert finished is not None and finished.source_path == path
    # a temp file may survive a SIGKILL, but it is hidden and never read as a record
    assert [r.method for r in load_records(tmp_path)] == ["csp"]


def test_load_records_skips_malformed_files_with_one_line_each(tmp_path):
    good = write_record(make_record(), tmp_path)
    write_record(make_record(seed=1), tmp_path)
    bad_dir = tmp_path / "csp/mit-states/open"
    bad_dir.mkdir(parents=True)
    (bad_dir / "seed0.json").write_text("{truncated")
    (bad_dir / "seed1.json").write_text(json.dumps({"schema_version": 1, "method": "csp"}))
    percent = json.loads(good.read_text())
    percent["metrics"]["test"]["auc"] = 19.4
    (bad_dir / "seed2.json").write_text(json.dumps(percent))
    (tmp_path / "reported").mkdir()
    (tmp_path / "reported" / "ignored.json").write_text("{}")
    (tmp_path / ".checkpoints" / "csp").mkdir(parents=True)
    (tmp_path / ".checkpoints" / "csp" / "state.json").write_text("{}")  # hidden folders hold no records

    problems: list[tuple[Path, str]] = []
    loaded = load_records(tmp_path, exclude=("reported",), on_error=lambda p, why: problems.append((p, why)))
    assert sorted(r.seed for r in loaded) == [0, 1]
    assert [p.name for p, _ in problems] == ["seed0.json", "seed1.json", "seed2.json"]
    assert "not valid JSON" in problems[0][1]
    assert "missing field" in problems[1][1]
    assert "divide percentages by 100" in problems[2][1]
    assert all("\n" not in why for _, why in problems)

    with pytest.warns(UserWarning, match="skipping malformed record"):
        assert len(load_records(tmp_path, exclude=("reported",))) == 2
    assert load_records(tmp_path / "does-not-exist") == []


def test_schema_file_matches_the_dataclass_and_validates_records(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    fields = {f.name for f in dataclasses.fields(RunRecord)}
    assert set(schema["properties"]) == fields | {"higher_is_better"}
    assert set(schema["$defs"]["metrics"]["properties"]) == set(METRICS)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(json.loads(make_record(environment=environment()).to_json())))
    for path in sorted(REPORTED.glob("*.json")):
        assert not list(validator.iter_errors(json.loads(path.read_text()))), path.name
    reference = sorted(REFERENCE.rglob("*.json"))
    assert reference  # the committed reference runs are schema-2 records too
    for path in reference:
        assert not list(validator.iter_errors(json.loads(path.read_text()))), path
    percent = json.loads(make_record().to_json())
    percent["metrics"]["test"]["auc"] = 19.4
    assert list(validator.iter_errors(percent))


def test_environment_captures_versions_git_and_device(tmp_path):
    env = environment()
    assert {"packages", "git", "device", "python", "platform"} <= set(env)
    assert {"czsl-bench", "torch", "open_clip_torch", "numpy"} <= set(env["packages"])
    assert env["device"]["type"] in {"cpu", "cuda"}
    assert git_revision(tmp_path) == {"commit": "unknown", "dirty": None}  # not a git checkout
    json.dumps(env)


def test_json_default_handles_numpy_and_torch_scalars():
    np = pytest.importorskip("numpy")
    record = make_record(config={"lr": np.float32(0.5), "steps": np.int64(3), "path": Path("a/b")})
    data = json.loads(record.to_json())
    assert data["config"] == {"lr": 0.5, "steps": 3, "path": "a/b"}


@settings(max_examples=40, deadline=None)
@given(
    values=st.dictionaries(st.sampled_from([m for m in METRICS if m != "bias"]),
                           st.floats(min_value=0, max_value=1, allow_nan=False), min_size=1),
    bias=st.floats(allow_nan=False, allow_infinity=False, width=32),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_round_trip_property(values, bias, seed):
    record = make_record(seed=seed, metrics={"test": values | {"bias": bias}})
    assert RunRecord.from_json(record.to_json()) == record


# -- published rows ---------------------------------------------------------------------------------

PAPER_METHODS = {"clip", "coop", "csp", "plid", "troika", "cluspro", "vpcmjl", "cams"}
PAPER_DATASETS = {"mit-states", "ut-zappos", "cgqa"}


def test_reported_rows_cover_every_method_dataset_and_setting():
    rows = [r for r in load_records(REPORTED, on_error=lambda p, why: pytest.fail(f"{p}: {why}"))
            if r.variant is None]
    keys = {(r.method, r.dataset, r.setting) for r in rows}
    assert keys == {(m, d, s) for m in PAPER_METHODS for d in PAPER_DATASETS for s in ("closed", "open")}
    assert len(rows) == len(keys) == 48
    for r in rows:
        assert r.source == "paper" and r.seed is None and r.citation
        assert r.provenance.get("*", "").startswith("spec-"), r.describe()
        assert set(r.metrics) == {"test"}
        assert set(r.metrics["test"]) == {"best_seen", "best_unseen", "best_hm", "auc"}
        # filename is the deterministic reported path
        assert rec_mod.path_for(r, REPORTED).is_file()


def test_reported_rows_are_internally_consistent():
    """Best HM can not exceed HM(best S, best U); AUC lies inside the S x U rectangle."""
    for r in load_records(REPORTED):
        m = r.metrics["test"]
        s, u = m["best_seen"], m["best_unseen"]
        assert m["best_hm"] <= 2 * s * u / (s + u) + 1e-9, r.describe()
        assert m["auc"] <= s * u + 1e-9, r.describe()


@pytest.mark.parametrize("method, dataset, setting, expected, std", [
    # spec-cluspro.md §5.1 / §5.2 (ClusPro Tables 1 and 2), in %
    ("cluspro", "ut-zappos", "closed", (70.7, 76.0, 58.5, 46.6), (1.0, 1.2, 0.6, 0.5)),
    ("cluspro", "cgqa", "open", (41.6, 8.3, 11.6, 3.0), (0.3, 0.2, 0.3, 0.1)),
    ("csp", "mit-states", "closed", (46.6, 49.9, 36.3, 19.4), None),
    ("troika", "cgqa", "open", (40.8, 7.9, 10.9, 2.7), None),
    ("plid", "mit-states", "open", (49.1, 18.7, 20.0, 7.3), None),  # 20.0: the paper table, not 20.4
    ("clip", "cgqa", "open", (7.5, 4.6, 4.0, 0.27), None),  # spec-baselines.md §5 keeps two decimals
    ("coop", "ut-zappos", "closed", (52.1, 49.3, 34.6, 18.8), None),
    # spec-vpcmjl.md §6 (source columns C-GQA, UT-Zappos, MIT-States) and spec-cams.md §6
    ("vpcmjl", "ut-zappos", "closed", (71.9, 76.3, 58.5, 47.9), None),
    ("vpcmjl", "cgqa", "open", (46.0, 11.5, 15.5, 4.6), None),
    ("vpcmjl", "mit-states", "open", (51.8, 19.9, 22.0, 8.3), None),
    ("cams", "mit-states", "closed", (53.0, 54.3, 41.0, 24.2), None),
    ("cams", "cgqa", "closed", (46.7, 42.1, 36.4, 17.4), None),
    ("cams", "ut-zappos", "open", (71.2, 66.4, 54.5, 40.3), None),
])
def test_reported_rows_match_the_spec_tables(method, dataset, setting, expected, std):
    r = read_record(REPORTED / f"{method}__{dataset}__{setting}.json")
    names = ("best_seen", "best_unseen", "best_hm", "auc")
    assert tuple(round(100 * r.metrics["test"][k], 2) for k in names) == expected
    if std is not None:
        assert tuple(round(100 * r.metrics_std["test"][k], 2) for k in names) == std
    else:
        assert r.metrics_std == {}


def test_published_cluspro_ablations_use_the_methods_variant_names():
    """Paper Tables 3 and 4a-b as records whose variant names are ClusPro's declared ablations."""
    rows = [r for r in load_records(REPORTED) if r.variant is not None]
    assert {r.method for r in rows} == {"cluspro"} and all(r.setting == "closed" for r in rows)
    from czsl_bench.registry import METHODS

    declared = set(METHODS.get("cluspro").ablations())
    # every published ablation row is one ClusPro declares (it may declare more, e.g. 'code')
    assert {r.variant for r in rows} <= declared - {"full"}
    assert {"base", "no-pcl", "no-pdl", "k-1", "mu-0.5"} <= {r.variant for r in rows}
    by_key = {(r.variant, r.dataset): r.metrics["test"] for r in rows}
    assert {d for v, d in by_key if v in ("base", "no-pcl", "no-pdl")} == {"ut-zappos", "cgqa"}  # Table 3
    assert round(100 * by_key[("k-1", "ut-zappos")]["auc"], 1) == 42.8  # Table 4a
    assert round(100 * by_key[("mu-0.5", "ut-zappos")]["best_hm"], 1) == 56.0  # Table 4b
    assert round(100 * by_key[("no-pdl", "ut-zappos")]["best_seen"], 1) == 69.9  # Table 3, not Table 6b
    full = read_record(REPORTED / "cluspro__ut-zappos__closed.json").metrics["test"]
    assert by_key[("k-5", "ut-zappos")] == full == by_key[("mu-0.99", "ut-zappos")]  # the defaults


def test_reported_files_have_no_temp_leftovers():
    assert not [p for p in os.listdir(REPORTED) if p.startswith(".")]
