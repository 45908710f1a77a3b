"""`data check` and plugin loading on real-format fixtures and deliberately broken copies."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from czsl_bench.cli import cli
from czsl_bench.datasets.czsl_format import CZSLDataset, DatasetError
from czsl_bench.datasets.plugin import default_data_home
from czsl_bench.registry import DATASETS
from fixtures.czsl_real_format import METADATA, build_cgqa, build_real, split_image_paths

# Fixtures with a subset of the images load with strict=False, which still warns about the counts.
pytestmark = [pytest.mark.usefixtures("private_metadata_cache"),
              pytest.mark.filterwarnings("ignore:.*counts differ from the published statistics:UserWarning",
                                         "ignore:.*differ from the canonical copies:UserWarning")]


@pytest.fixture(scope="module")
def full_ut(tmp_path_factory) -> Path:
    """UT-Zappos with the real metadata and all 29,126 split images (4x4 JPEGs), ~3 s to build."""
    root = tmp_path_factory.mktemp("full") / "ut-zappos"
    build_real(root, "ut-zappos")
    return root


@pytest.fixture(scope="module")
def small_mit(tmp_path_factory) -> Path:
    """MIT-States: real pair files, the first image of every (set, pair) of the real metadata."""
    root = tmp_path_factory.mktemp("small") / "mit-states"
    build_real(root, "mit-states", per_pair=1)
    return root


def broken_copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / src.name
    shutil.copytree(src, dest)
    return dest


def load_error(name: str, root: Path, **kw) -> str:
    with pytest.raises(DatasetError) as info:
        DATASETS.get(name).load(root, **kw)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------------------------------
# A complete standard copy
# ---------------------------------------------------------------------------------------------
def test_full_ut_zappos_is_usable_and_loads_strictly(full_ut):
    plugin = DATASETS.get("ut-zappos")
    report = plugin.check(full_ut)
    assert report.usable and not report.findings, report.render()
    assert all(c.ok for c in report.counts) and len(report.counts) == 14
    assert report.checksums and all(status == "match" for _, status in report.checksums)
    assert report.images_checked == 29_126
    ds = plugin.load(full_ut)
    assert isinstance(ds, CZSLDataset) and ds.name == "ut-zappos"
    assert (len(ds.split("train")), len(ds.split("val")), len(ds.split("test"))) == (22_998, 3_214, 2_914)
    assert "ut-zappos: usable (0 error(s), 0 warning(s))" in report.render()


def test_cli_check_exit_codes(full_ut, small_mit):
    runner = CliRunner()
    ok = runner.invoke(cli, ["data", "check", "ut-zappos", "--root", str(full_ut), "--images", "exists"])
    assert ok.exit_code == 0, ok.output
    assert "test_candidates" in ok.output and "match" in ok.output
    partial = runner.invoke(cli, ["data", "check", "mit-states", "--root", str(small_mit), "--images", "exists"])
    assert partial.exit_code == 1 and "counts differ from the published statistics" in partial.output
    lenient = runner.invoke(cli, ["data", "check", "mit-states", "--root", str(small_mit), "--no-strict", "--json"])
    assert lenient.exit_code == 0 and '"usable": true' in lenient.output


def test_root_resolution_order(full_ut, monkeypatch, tmp_path):
    plugin = DATASETS.get("ut-zappos")
    monkeypatch.delenv("CZSL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert plugin.resolve_root() == tmp_path / "cache" / "czsl-bench" / "data" / "ut-zappos"
    assert default_data_home() == tmp_path / "cache" / "czsl-bench" / "data"
    monkeypatch.setenv("CZSL_DATA", str(full_ut.parent))
    assert plugin.resolve_root() == full_ut
    assert plugin.resolve_root(tmp_path / "x") == tmp_path / "x"  # explicit beats the environment
    assert len(plugin.load().split("test")) == 2_914  # found through $CZSL_DATA


# ---------------------------------------------------------------------------------------------
# Broken copies: check reports, load fails with the same line
# ---------------------------------------------------------------------------------------------
def test_missing_root_gives_download_steps(tmp_path):
    text = load_error("mit-states", tmp_path / "nothing")
    assert "does not exist" in text and "czsl-bench data prepare mit-states" in text
    assert "release_dataset.zip" in text
    report = DATASETS.get("mit-states").check(tmp_path / "nothing")
    assert not report.usable and report.errors()[0].line() == text


def test_missing_images_count_and_first_paths(small_mit, tmp_path):
    root = broken_copy(small_mit, tmp_path)
    rels = split_image_paths(torch.load(root / METADATA, weights_only=True))
    for rel in rels[10:13]:
        (root / "images" / rel).unlink()
    report = DATASETS.get("mit-states").check(root, strict=False)
    [error] = report.errors()
    assert f"3 of {len(rels):,} split images are missing" in error.message
    assert sorted(error.details) == sorted(rels[10:13])
    assert load_error("mit-states", root, strict=False) == error.line()


def test_unreadable_image_is_an_error_in_check(small_mit, tmp_path):
    root = broken_copy(small_mit, tmp_path)
    rels = split_image_paths(torch.load(root / METADATA, weights_only=True))
    (root / "images" / rels[5]).write_bytes(b"this is not a jpeg")
    (root / "images" / rels[6]).write_bytes(b"")
    report = DATASETS.get("mit-states").check(root, strict=False)
    [error] = report.errors()
    assert error.message.startswith(f"mit-states: 2 of {len(rels):,} split images cannot be read (first: ")
    assert sorted(error.details) == sorted([f"{rels[5]}: not an image PIL can identify", f"{rels[6]}: empty file"])
    assert DATASETS.get("mit-states").check(root, strict=False, images="exists").usable  # exists-only misses it


def test_malformed_line_reports_file_and_line(small_mit, tmp_path):
    root = broken_copy(small_mit, tmp_path)
    path = root / "compositional-split-natural" / "test_pairs.txt"
    lines = path.read_text().split("\n")
    lines[41] = "ancient"  # line 42
    path.write_text("\n".join(lines))
    report = DATASETS.get("mit-states").check(root, strict=False)
    [error] = report.errors()
    assert f"{path}:42: expected '<attr> <obj>', found 1 field(s)" in error.message
    assert load_error("mit-states", root, strict=False) == error.line()
    assert any(rel.endswith("test_pairs.txt") and status == "DIFFERS" for rel, status in report.checksums)


def test_truncated_metadata(small_mit, tmp_path):
    root = broken_copy(small_mit, tmp_path)
    data = (root / METADATA).read_bytes()
    (root / METADATA).write_bytes(data[: len(data) // 2])
    report = DATASETS.get("mit-states").check(root, strict=False)
    assert not report.usable
    text = load_error("mit-states", root, strict=False)
    assert text == report.errors()[0].line()
    assert "truncated or corrupt" in text and str(root / METADATA) in text and "data prepare" in text


class Exploit:
    def __reduce__(self):
        return (shutil.rmtree, ("/definitely/not/here",))


def test_metadata_pickle_with_objects(small_mit, tmp_path):
    root = broken_copy(small_mit, tmp_path)
    records = torch.load(root / METADATA, weights_only=True)
    with open(root / METADATA, "wb") as f:
        pickle.dump(records[:3] + [Exploit()], f, protocol=2)
    text = load_error("mit-states", root, strict=False)
    assert "not plain data" in text and str(root / METADATA) in text
    assert DATASETS.get("mit-states").check(root).errors()[0].line() == text


def test_missing_pair_file_and_missing_metadata(small_mit, tmp_path):
    root = broken_copy(small_mit, tmp_path)
    (root / "compositional-split-natural" / "val_pairs.txt").unlink()
    (root / METADATA).unlink()
    report = DATASETS.get("mit-states").check(root)
    messages = [e.message for e in report.errors()]
    assert any("missing pair file" in m and "val_pairs.txt" in m for m in messages)
    assert any("missing metadata file" in m for m in messages)
    assert ("compositional-split-natural/val_pairs.txt", "missing") in report.checksums


def test_orphan_records_are_reported(small_mit, tmp_path):
    root = broken_copy(small_mit, tmp_path)
    records = torch.load(root / METADATA, weights_only=True)
    records.append({"image": "ancient_unicorn/1.jpg", "attr": "ancient", "obj": "unicorn", "set": "test"})
    torch.save(records, root / METADATA)
    report = DATASETS.get("mit-states").check(root, strict=False)
    assert report.usable  # the standard loaders drop such records; a warning, not an error
    [orphan] = [w for w in report.warnings() if "in no split file" in w.message]
    assert "1 metadata record(s)" in orphan.message and "ancient_unicorn/1.jpg" in orphan.message


def test_non_canonical_split_file_with_same_pairs_is_a_warning(full_ut, tmp_path):
    root = tmp_path / "ut-zappos"
    shutil.copytree(full_ut / "compositional-split-natural", root / "compositional-split-natural")
    shutil.copyfile(full_ut / METADATA, root / METADATA)
    path = root / "compositional-split-natural" / "val_pairs.txt"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    report = DATASETS.get("ut-zappos").check(root, images="none")
    assert report.usable and all(c.ok for c in report.counts)
    assert any("differ from the canonical copies" in w.message for w in report.warnings())
    with pytest.warns(UserWarning, match="differ from the canonical"):
        DATASETS.get("ut-zappos").load(root, check_images=False)


def test_cgqa_fixture_and_canonical_caveat(tmp_path):
    root = tmp_path / "cgqa"
    build_cgqa(root)
    plugin = DATASETS.get("cgqa")
    ds = plugin.load(root, strict=False)
    assert len(ds.split("test", "open").pairs) == 278_362
    assert int(ds.split("test").candidate_mask.sum()) == 6515 and int(ds.split("val").candidate_mask.sum()) == 6844
    # published image counts cannot hold for a generated metadata file
    assert "test_images 1,811 (expected 5,098)" in load_error("cgqa", root)
    records = torch.load(root / METADATA, weights_only=True)
    first_train = records[0]
    torch.save(records[1:], root / METADATA)  # the first train pair loses its only training image
    empty = [w for w in plugin.check(root, strict=False, images="none").warnings() if "no training image" in w.message]
    assert empty and f"1 train pair(s) have no training image (first: {first_train['attr']} {first_train['obj']})" in \
        empty[0].message
    with (root / "compositional-split-natural" / "train_pairs.txt").open("a") as f:
        f.write("tiny elephant\n")
    warning = [w for w in plugin.check(root, strict=False, images="none").warnings() if "canonical" in w.message]
    assert "not byte-verified" in warning[0].fix
