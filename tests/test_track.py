"""The evaluation track in the run identity (docs/results.md "Run identity"): a method that adapts
at test time declares ``track = "transductive"``; its records never share a table cell with
inductive ones, even under the same method name, configuration and seed."""

from __future__ import annotations

import pytest

import czsl_bench
from czsl_bench.identity import RunIdentity
from czsl_bench.methods.clip import CLIPZeroShot
from czsl_bench.records import load_records
from czsl_bench.registry import METHODS
from czsl_bench.tables import build_table
from fixtures.tiny_three_path import registered_toy_world


class ToyStreamMethod(CLIPZeroShot):
    """CLIP zero-shot under another name; the tests flip its declared track."""

    name = "toy-stream"


@pytest.fixture
def toy_method():
    METHODS.register("toy-stream")(ToyStreamMethod)
    try:
        yield ToyStreamMethod
    finally:
        METHODS.unregister("toy-stream")
        ToyStreamMethod.track = "inductive"


def test_every_built_in_method_is_inductive():
    for name in ("clip", "coop", "csp", "troika", "cluspro", "cluspro-base", "vpcmjl", "cams"):
        assert METHODS.get(name).track == "inductive", name


def test_track_is_validated_and_changes_the_fingerprint():
    base = dict(method="m", config={}, backbone={"arch": "a", "pretrained": None, "weights_hash": "h"},
                dataset={"name": "d", "version": "v"}, setting="closed", seed=0, protocol="p")
    inductive, transductive = RunIdentity(**base), RunIdentity(**base, track="transductive")
    assert inductive.track == "inductive"
    assert inductive.fingerprint != transductive.fingerprint
    assert inductive.group_fingerprint != transductive.group_fingerprint
    with pytest.raises(ValueError, match="track is 'online'; it must be one of inductive, transductive"):
        RunIdentity(**base, track="online")


def test_transductive_records_never_share_a_cell_with_inductive_ones(toy_method, tmp_path):
    results = tmp_path / "results"
    with registered_toy_world(tmp_path / "toy") as toy:
        kwargs = dict(seed=0, backbone="czsl-tiny-vit", pretrained="none", results_dir=results,
                      cache_dir=tmp_path / "cache")
        inductive = czsl_bench.run("toy-stream", toy, **kwargs)
        toy_method.track = "transductive"
        with pytest.warns(UserWarning, match="held another run"):  # same path, another fingerprint: kept
            transductive = czsl_bench.run("toy-stream", toy, **kwargs)
    assert (inductive.identity["track"], transductive.identity["track"]) == ("inductive", "transductive")
    # the same numbers (the toy method does not really adapt), the same config and seed: only the
    # track differs, and that alone keeps the two apart
    assert inductive.metrics == transductive.metrics and inductive.config == transductive.config
    assert inductive.fingerprint != transductive.fingerprint
    records = load_records(results)
    assert sorted(r.identity["track"] for r in records) == ["inductive", "transductive"]  # both files kept
    table = build_table(records, "closed")
    rows = [label for label in table.mean.index if label.startswith("toy-stream")]
    assert len(rows) == 2 and all("[" in label for label in rows)
    assert (table.n.loc[rows] == 1).all().all()  # each cell holds one record, never the two averaged
    assert any("track" in note and "never averaged" in note for note in table.notes)
