"""The standard compositional-split-natural loader on the real pair files and real metadata."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from czsl_bench.datasets.czsl_format import (
    CZSLDataset,
    DatasetError,
    ImageDecodeError,
    Split,
    SplitImages,
    find_missing_images,
    load_metadata,
    parse_pair_file,
    read_pair_file,
    resolve_image_path,
)
from czsl_bench.registry import DATASETS
from fixtures.czsl_real_format import (
    CANONICAL,
    METADATA,
    build_real,
    palette,
    split_image_paths,
    tiny_jpeg,
    write_images,
)

pytestmark = pytest.mark.usefixtures("private_metadata_cache")


@pytest.fixture(scope="module")
def real() -> dict[str, CZSLDataset]:
    """MIT-States and UT-Zappos straight from the shipped canonical files (no images needed)."""
    return {name: CZSLDataset.from_root(CANONICAL / name) for name in ("mit-states", "ut-zappos")}


# ---------------------------------------------------------------------------------------------
# Published / verified counts (spec-datasets §4, spec-evaluator §1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mit-states", "ut-zappos"])
def test_counts_match_the_plugin_statistics(real, name):
    stats = real[name].stats()
    expected = {k: s.value for k, s in DATASETS.get(name).stats.items()}
    assert stats == expected


def test_mit_states_golden_counts(real):
    ds = real["mit-states"]
    assert (len(ds.attrs), len(ds.objs), len(ds.closed_pairs), len(ds.open_pairs)) == (115, 245, 1962, 28175)
    test, val, train = ds.split("test"), ds.split("val"), ds.split("train")
    assert (len(train), len(val), len(test)) == (30_338, 10_420, 12_995)
    assert int(test.candidate_mask.sum()) == 1662
    assert int(val.candidate_mask.sum()) == 1562
    assert int(train.candidate_mask.sum()) == 1262
    assert int(test.seen_mask.sum()) == 1262
    # images of seen / unseen pairs (spec-datasets §4)
    assert int(val.seen_mask[val.labels].sum()) == 1_844
    assert int((~val.seen_mask[val.labels]).sum()) == 8_576
    assert int(test.seen_mask[test.labels].sum()) == 2_380
    assert int((~test.seen_mask[test.labels]).sum()) == 10_615


def test_ut_zappos_golden_counts(real):
    ds = real["ut-zappos"]
    test, val = ds.split("test"), ds.split("val")
    assert int(test.candidate_mask.sum()) == 101 and int(val.candidate_mask.sum()) == 98
    assert int(val.seen_mask[val.labels].sum()) == 877 and int(test.seen_mask[test.labels].sum()) == 1_023
    assert ds.split("test", "open").candidate_mask.all() and len(ds.open_pairs) == 192


def test_cgqa_pair_counts_from_the_shipped_files():
    ds = CZSLDataset(
        "cgqa", CANONICAL / "cgqa",
        *(read_pair_file(CANONICAL / "cgqa" / "compositional-split-natural" / f"{s}_pairs.txt")
          for s in ("train", "val", "test")),
        split_images={},
    )
    stats = ds.stats()
    expected = {k: s.value for k, s in DATASETS.get("cgqa").stats.items() if not k.endswith("_images")}
    assert {k: stats[k] for k in expected} == expected
    # the val seen/unseen numbers are the corrected ones (czsl#36), not the swapped published ones
    assert (stats["val_seen_pairs"], stats["val_unseen_pairs"]) == (1040, 1252)
    assert stats["closed_pairs"] == 7767 and stats["open_pairs"] == 278_362


def test_images_follow_the_set_field_not_the_pair_files(real):
    """czsl#20: assigning images by test_pairs.txt membership gives 23,306 MIT "test" images."""
    records = torch.load(CANONICAL / "mit-states" / METADATA, weights_only=True)
    test_pairs = set(real["mit-states"].test_pairs)
    by_pair_file = sum(1 for r in records if r["attr"] != "NA" and (r["attr"], r["obj"]) in test_pairs)
    assert by_pair_file == 23_306
    assert len(real["mit-states"].split("test")) == 12_995


# ---------------------------------------------------------------------------------------------
# Structure of a Split
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", ["closed", "open"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_labels_point_at_the_image_pair(real, split, world):
    ds = real["ut-zappos"]
    sp = ds.split(split, world)
    assert isinstance(sp, Split) and sp.name == split and sp.world == world
    assert sp.pairs == (ds.closed_pairs if world == "closed" else ds.open_pairs)
    rows = ds.split_images[split]
    assert sp.images == [img for img, _, _ in rows]
    assert [sp.pairs[i] for i in sp.labels.tolist()] == [(a, o) for _, a, o in rows]
    assert [ds.attrs[i] for i in sp.attr_labels.tolist()] == [a for _, a, _ in rows]
    assert [ds.objs[i] for i in sp.obj_labels.tolist()] == [o for _, _, o in rows]
    assert [(ds.attrs[a], ds.objs[o]) for a, o in zip(sp.pair_attr.tolist(), sp.pair_obj.tolist())] == sp.pairs
    assert sp.labels.dtype == torch.long and sp.seen_mask.dtype == torch.bool
    assert sp.root == CANONICAL / "ut-zappos" / "images"


def test_vocabularies_sorted_and_train_pairs_in_file_order(real):
    ds = real["mit-states"]
    assert ds.attrs == sorted(ds.attrs) and ds.objs == sorted(ds.objs)
    assert ds.closed_pairs == sorted(ds.closed_pairs)
    first_line = (CANONICAL / "mit-states" / "compositional-split-natural" / "train_pairs.txt").read_text().split("\n")[0]
    assert ds.train_pairs[0] == tuple(first_line.split())
    assert ds.open_pairs[: len(ds.objs)] == [(ds.attrs[0], o) for o in ds.objs]  # attr-major


def test_splits_are_cached_and_unknown_names_fail(real):
    ds = real["ut-zappos"]
    assert ds.split("test") is ds.split("test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ds.split("dev")
    with pytest.raises(ValueError, match="unknown world"):
        ds.split("test", "half-open")


# ---------------------------------------------------------------------------------------------
# Property tests on random small worlds
# ---------------------------------------------------------------------------------------------
@st.composite
def worlds(draw):
    n_attr = draw(st.integers(1, 5))
    n_obj = draw(st.integers(1, 5))
    universe = [(f"a{i}", f"o{j}") for i in range(n_attr) for j in range(n_obj)]
    train = draw(st.lists(st.sampled_from(universe), min_size=1, unique=True))
    val = draw(st.lists(st.sampled_from(universe), unique=True))
    test = draw(st.lists(st.sampled_from(universe), unique=True))
    everything = train + val + test
    records = draw(st.lists(st.tuples(st.sampled_from(everything + [("NA", "o0"), ("a9", "o9")]),
                                      st.sampled_from(["train", "val", "test", "NA"])), max_size=30))
    return train, val, test, [{"image": f"{a}_{o}/{k}.jpg", "attr": a, "obj": o, "set": s}
                              for k, ((a, o), s) in enumerate(records)]


@settings(max_examples=60, deadline=None)
@given(worlds())
def test_masks_and_labels_follow_the_protocol(world):
    train, val, test, records = world
    ds = CZSLDataset.from_records("w", "/nowhere", train, val, test, records)
    for name, own in (("train", set(train)), ("val", set(val)), ("test", set(test))):
        closed, opened = ds.split(name, "closed"), ds.split(name, "open")
        assert [p in set(train) for p in closed.pairs] == closed.seen_mask.tolist()
        allowed = set(train) | (own if name != "train" else set())
        assert [p in allowed for p in closed.pairs] == closed.candidate_mask.tolist()
        assert opened.candidate_mask.all() and int(opened.seen_mask.sum()) == len(set(train))
        # the same image has the same pair in both worlds
        assert [closed.pairs[i] for i in closed.labels] == [opened.pairs[i] for i in opened.labels]
        expected = [r["image"] for r in records
                    if r["attr"] != "NA" and r["set"] != "NA" and (r["attr"], r["obj"]) in set(train + val + test)
                    and (r["set"] if r["set"] in ("train", "val") else "test") == name]
        assert closed.images == expected


# ---------------------------------------------------------------------------------------------
# Malformed inputs: one line, naming the file
# ---------------------------------------------------------------------------------------------
def test_malformed_pair_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "val_pairs.txt"
    path.write_text("red apple\nbig\n\nred apple\nsliced apple pie\n")
    pairs, errors, dupes = parse_pair_file(path)
    assert pairs == [("red", "apple")]
    assert [(e.lineno, e.reason.split(",")[0]) for e in errors] == [(2, "expected '<attr> <obj>'"), (3, "empty line"),
                                                                  (5, "expected '<attr> <obj>'")]
    assert [d.lineno for d in dupes] == [4]
    with pytest.raises(DatasetError, match=rf"{path}:2: expected .* \(and 2 more malformed line\(s\)\); fix me"):
        read_pair_file(path, fix="fix me")


def test_non_utf8_pair_file(tmp_path):
    path = tmp_path / "train_pairs.txt"
    path.write_bytes(b"red apple\ncaf\xe9 latte\n")
    _, errors, _ = parse_pair_file(path)
    assert errors[0].lineno == 2 and "UTF-8" in errors[0].reason


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_truncated_metadata_is_one_line(tmp_path):
    real = (CANONICAL / "ut-zappos" / METADATA).read_bytes()
    path = tmp_path / METADATA
    path.write_bytes(real[: len(real) // 3])
    with pytest.raises(DatasetError) as info:
        load_metadata(path, fix="download it again")
    text = _one_line(info.value)
    assert str(path) in text and "truncated or corrupt" in text


class _Payload:
    """A pickled object that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_metadata_with_python_objects_is_refused_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / METADATA
    with open(path, "wb") as f:
        pickle.dump([{"image": "a_b/1.jpg", "attr": "a", "obj": "b", "set": "train"}, _Payload()], f, protocol=2)
    with pytest.raises(DatasetError) as info:
        load_metadata(path)
    text = _one_line(info.value)
    assert "not plain data" in text and str(path) in text
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "content, message",
    [({"image": "x"}, "holds a dict, expected a list"),
     (["a_b/1.jpg"], "record 0 is a str"),
     ([{"image": "a_b/1.jpg", "attr": "a", "obj": "b"}], "record 0 lacks key 'set'"),
     ([{"image": "a_b/1.jpg", "attr": "a", "obj": "b", "set": 3}], "non-string value for key 'set'")],
)
def test_metadata_structure_is_validated(tmp_path, content, message):
    path = tmp_path / METADATA
    torch.save(content, path)
    with pytest.raises(DatasetError, match=message):
        load_metadata(path)


def test_descriptions_file_is_optional_and_parsed(tmp_path):
    root = tmp_path / "ds"
    build_real(root, "ut-zappos", per_pair=1, images=False)
    assert CZSLDataset.from_root(root).descriptions is None
    (root / "descriptions.json").write_text('{"Canvas Shoes.Flats": ["flat canvas shoes", "a canvas flat"]}')
    assert CZSLDataset.from_root(root).descriptions == {("Canvas", "Shoes.Flats"): ["flat canvas shoes", "a canvas flat"]}
    (root / "descriptions.json").write_text('{"Canvas": "x"}')
    with pytest.raises(DatasetError, match="must map '<attr> <obj>' to a list of strings"):
        CZSLDataset.from_root(root)


# ---------------------------------------------------------------------------------------------
# Images: the torch Dataset, decode errors, the MIT-States space fallback
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ut(tmp_path_factory) -> CZSLDataset:
    root = tmp_path_factory.mktemp("ut") / "ut-zappos"
    build_real(root, "ut-zappos", per_pair=2)
    return CZSLDataset.from_root(root, check_images=True)


def test_split_images_yields_tensor_label_index(small_ut):
    split = small_ut.split("test")
    data = SplitImages(split, transform=lambda im: torch.tensor(np.array(im), dtype=torch.float32))
    assert isinstance(data, torch.utils.data.Dataset) and len(data) == len(split)
    image, label, index = data[3]
    assert image.shape == (4, 4, 3) and label == int(split.labels[3]) and index == 3
    default = split.dataset()[0][0]
    assert default.shape == (3, 4, 4) and default.dtype == torch.float32 and 0 <= default.min() <= default.max() <= 1


def _corrupt_copy(small_ut: CZSLDataset, tmp_path: Path) -> tuple[Split, Path]:
    split = small_ut.split("val")
    bad = split.root / split.images[1]
    original = bad.read_bytes()
    bad.unlink()  # fixture images may be hard links: never write through one
    bad.write_bytes(original[:20])  # a truncated JPEG
    return split, bad


def test_decode_error_is_one_line_naming_the_file(small_ut, tmp_path):
    split, bad = _corrupt_copy(small_ut, tmp_path)
    try:
        with pytest.raises(ImageDecodeError) as info:
            split.dataset()[1]
        assert str(bad) in _one_line(info.value)
        bad.unlink()
        with pytest.raises(ImageDecodeError, match="is missing"):
            split.dataset()[1]
    finally:
        bad.write_bytes(tiny_jpeg((1, 2, 3)))


def test_decode_error_from_a_dataloader_worker_is_still_one_line(small_ut, tmp_path):
    split, bad = _corrupt_copy(small_ut, tmp_path)
    try:
        loader = torch.utils.data.DataLoader(split.dataset(), batch_size=4, num_workers=1)
        with pytest.raises(ImageDecodeError) as info:
            list(loader)
        text = _one_line(info.value)
        assert text.startswith("cannot decode image") and str(bad) in text
    finally:
        bad.write_bytes(tiny_jpeg((1, 2, 3)))


def test_dataloader_with_workers_returns_every_image_once(small_ut):
    split = small_ut.split("test")
    loader = torch.utils.data.DataLoader(split.dataset(), batch_size=16, num_workers=2)
    indices, labels = [], []
    for images, label, index in loader:
        assert images.shape[1:] == (3, 4, 4)
        indices += index.tolist()
        labels += label.tolist()
    assert indices == list(range(len(split))) and labels == split.labels.tolist()


def test_space_named_mit_states_folders_are_found(tmp_path):
    root = tmp_path / "images"
    write_images(tmp_path, ["coiled brass/1.jpg", "ancient_castle/2.jpg"], palette(2))
    assert resolve_image_path(root, "coiled_brass/1.jpg") == root / "coiled brass" / "1.jpg"
    assert find_missing_images(root, ["coiled_brass/1.jpg", "ancient_castle/2.jpg", "old_castle/3.jpg"]) == [
        "old_castle/3.jpg"]


def test_check_images_at_load_names_the_missing_files(tmp_path):
    root = tmp_path / "ut-zappos"
    fixture = build_real(root, "ut-zappos", per_pair=1)
    gone = split_image_paths(fixture.records)[7]
    (root / "images" / gone).unlink()
    with pytest.raises(DatasetError, match=rf"1 of {fixture.n_images} split images are missing .*first: {gone}\); do this"):
        CZSLDataset.from_root(root, check_images=True, fix="do this")


# ---------------------------------------------------------------------------------------------
# The content-addressed metadata cache
# ---------------------------------------------------------------------------------------------
def test_metadata_cache_serves_identical_records_and_never_stale_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / METADATA
    records = [{"image": "a_b/1.jpg", "attr": "a", "obj": "b", "set": "train"}]
    torch.save(records, path)
    assert load_metadata(path) == records
    [cached] = list((tmp_path / "cache" / "metadata").glob("*.json"))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called although the records are cached")

    monkeypatch.setattr(torch, "load", no_torch_load)
    assert load_metadata(path) == records  # served from the cache
    monkeypatch.undo()
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    changed = records + [{"image": "a_b/2.jpg", "attr": "a", "obj": "b", "set": "test"}]
    torch.save(changed, path)
    assert load_metadata(path) == changed  # other bytes, other key: re-read
    cached.write_text("{not json")  # a damaged cache entry is ignored
    torch.save(records, path)
    assert load_metadata(path) == records
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_metadata(path)


def test_metadata_cache_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CZSL_METADATA_CACHE", "0")
    path = tmp_path / METADATA
    torch.save([{"image": "a_b/1.jpg", "attr": "a", "obj": "b", "set": "train"}], path)
    load_metadata(path)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("world", ["closed", "open"])
def test_split_feeds_the_evaluator(real, world):
    """An oracle that scores each image's own pair highest is perfect under the protocol."""
    from czsl_bench.evaluation.metrics import evaluate_split

    split = real["ut-zappos"].split("test", world)
    scores = torch.zeros(len(split), len(split.pairs))
    scores[torch.arange(len(split)), split.labels] = 10.0
    result = evaluate_split(scores, split)
    assert result.best_seen == pytest.approx(1.0) and result.best_unseen == pytest.approx(1.0)
    assert result.attr_acc == pytest.approx(1.0) and result.obj_acc == pytest.approx(1.0)
    assert result.n_images == 2_914
