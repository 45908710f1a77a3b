"""Fault injection on the data side (issue #12): paths that leave the dataset root, tampered cache
files, killed world generations, a damaged synthetic world, noisy packaging.

Every test here reproduces one finding of the fault campaign and failed before its fix.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from czsl_bench.cli import cli
from czsl_bench.datasets.czsl_format import (
    CZSLDataset,
    DatasetError,
    ImageDecodeError,
    PathEscapeError,
)
from czsl_bench.registry import DATASETS
from fixtures.czsl_real_format import (
    CANONICAL,
    METADATA,
    SPLIT_DIR,
    build_real,
    load_real_metadata,
    palette,
    subset_records,
    tiny_jpeg,
)
from fixtures.toy_world import write_toy_world

pytestmark = [pytest.mark.usefixtures("private_metadata_cache"),
              pytest.mark.filterwarnings("ignore:.*counts differ from the published statistics:UserWarning",
                                         "ignore:.*differ from the canonical copies:UserWarning")]


def one_line(text: str) -> str:
    text = str(text).strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# 1. `data prepare` must not write outside the root nor pull files in from elsewhere
# ---------------------------------------------------------------------------------------------
def _split_tarball(path: Path, records: list[dict]) -> Path:
    """The TMN split tarball with UT-Zappos only (ut-zap50k/ folder), metadata = ``records``."""
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "val", "test"):
            tar.add(CANONICAL / "ut-zappos" / SPLIT_DIR / f"{split}_pairs.txt",
                    f"ut-zap50k/{SPLIT_DIR}/{split}_pairs.txt")
        buf = io.BytesIO()
        torch.save(records, buf)
        info = tarfile.TarInfo(f"ut-zap50k/{METADATA}")
        info.size = buf.tell()
        buf.seek(0)
        tar.addfile(info, buf)
    return path


def _image_zip(path: Path, records: list[dict]) -> Path:
    images = palette(4)
    with zipfile.ZipFile(path, "w") as zf:
        for k, rec in enumerate(records):
            zf.writestr(f"ut-zap50k-images/{rec['_image']}", images[k % len(images)])
    return path


def _prepare_ut(tmp_path: Path, records: list[dict], root: Path | None = None):
    tar = _split_tarball(tmp_path / "splits.tar.gz", records)
    zip_path = _image_zip(tmp_path / "images.zip", [r for r in records if ".." not in r["_image"]
                                                     and not r["_image"].startswith("/")])

    def fetch(url: str, part: Path) -> None:
        part.write_bytes({"i": zip_path, "s": tar}[url].read_bytes())

    return DATASETS.get("ut-zappos").prepare(
        root or tmp_path / "ut-zappos", fetch=fetch, urls={"images": "i", "splits": "s"},
        sha256={"splits": hashlib.sha256(tar.read_bytes()).hexdigest()}, splits_from="upstream",
        strict=False, log=lambda _: None)


@pytest.fixture(scope="module")
def ut_records() -> list[dict]:
    return [dict(r) for r in subset_records(load_real_metadata("ut-zappos"), per_pair=1, keep_na=0)]


def _files_linked_to(folder: Path, target: Path) -> list[Path]:
    ino = target.stat().st_ino, target.stat().st_dev
    return [p for p in folder.rglob("*") if p.is_file() and (p.stat().st_ino, p.stat().st_dev) == ino]


@pytest.mark.parametrize("key, bad", [
    ("image", "../escaped/pwned.jpg"),
    ("image", "Boots.Ankle/../../../escaped/pwned.jpg"),
    ("_image", "../../outside/secret.jpg"),
    ("_image", "/etc/hostname"),
])
def test_prepare_refuses_metadata_paths_outside_the_root(tmp_path, ut_records, key, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(tiny_jpeg((1, 2, 3)))
    records = [dict(r) for r in ut_records]
    records[3][key] = bad
    with pytest.raises(DatasetError) as info:
        _prepare_ut(tmp_path, records)
    message = one_line(info.value)
    assert "record 3" in message and repr(bad) in message and "leaves the dataset root" in message
    assert not (tmp_path / "escaped").exists()
    images = tmp_path / "ut-zappos" / "images"
    if images.exists():
        assert not _files_linked_to(images, outside / "secret.jpg")


def test_cli_prepare_with_an_escaping_metadata_path_exits_1_with_one_line(tmp_path, ut_records):
    records = [dict(r) for r in ut_records]
    records[0]["image"] = "../escaped/pwned.jpg"
    tar = _split_tarball(tmp_path / "splits.tar.gz", records)
    zip_path = _image_zip(tmp_path / "images.zip", records)
    result = CliRunner().invoke(cli, [
        "data", "prepare", "ut-zappos", "--root", str(tmp_path / "ut-zappos"), "--no-strict",
        "--url", f"images={zip_path.as_uri()}", "--url", f"splits={tar.as_uri()}", "--splits-from", "upstream",
        "--sha256", f"splits={hashlib.sha256(tar.read_bytes()).hexdigest()}"])
    assert result.exit_code == 1, result.output
    assert "Error: " in result.output and "'../escaped/pwned.jpg', which leaves the dataset root" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "escaped").exists()


def test_prepare_does_not_follow_a_symlink_in_images_src_out_of_the_root(tmp_path, ut_records):
    # the original tree holds a symlink of the member's size to a file elsewhere: extraction would
    # keep it ("already present") and the reorganisation would hard-link the outside file in
    records = [dict(r) for r in ut_records]
    member = palette(4)[0]
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"S" * len(member))
    root = tmp_path / "ut-zappos"
    link = root / "_images" / records[0]["_image"]
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(PathEscapeError) as info:
        _prepare_ut(tmp_path, records, root)
    message = one_line(info.value)
    assert records[0]["_image"] in message and "through a symlink" in message
    if (root / "images").exists():
        assert not _files_linked_to(root / "images", outside)


def test_prepare_does_not_write_through_a_symlinked_images_folder(tmp_path, ut_records):
    records = [dict(r) for r in ut_records]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "ut-zappos"
    folder = root / "images" / records[0]["image"].split("/")[0]
    folder.parent.mkdir(parents=True)
    folder.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(PathEscapeError) as info:
        _prepare_ut(tmp_path, records, root)
    message = one_line(info.value)
    assert "record 0" in message and records[0]["image"] in message
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 1. the loaders refuse the same paths (absolute, '..', symlinks out)
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def toy(tmp_path) -> Path:
    return write_toy_world(tmp_path / "toy", per_pair=(2, 1))


def _set_image(root: Path, index: int, value: str, key: str = "image") -> None:
    records = torch.load(root / METADATA, weights_only=True)
    records[index][key] = value
    torch.save(records, root / METADATA)


@pytest.mark.parametrize("bad, reason", [
    ("../../outside/secret.png", "'..' component"),
    ("blue_circle/../../../outside/secret.png", "'..' component"),
    ("/etc/passwd", "absolute path"),
    ("", "empty path"),
])
def test_loader_refuses_metadata_paths_outside_the_root(toy, bad, reason):
    _set_image(toy, 4, bad)
    with pytest.raises(PathEscapeError) as info:
        CZSLDataset.from_root(toy, name="toy")
    message = one_line(info.value)
    assert f"record 4 ('image') names {bad!r}, which leaves the dataset root" in message and reason in message
    assert "official file" in message  # how to fix


def test_an_escaping_underscore_image_is_refused_too(toy):
    _set_image(toy, 0, "../../../etc/hostname", key="_image")
    with pytest.raises(PathEscapeError, match=r"record 0 \('_image'\) names '../../../etc/hostname'"):
        CZSLDataset.from_root(toy, name="toy")


def test_loader_refuses_a_symlinked_image_outside_the_root_but_not_links_inside(toy, tmp_path):
    rel = "blue_circle/train_0.png"
    secret = tmp_path / "secret.png"
    shutil.move(toy / "images" / rel, secret)
    (toy / "images" / rel).symlink_to(secret)
    with pytest.raises(PathEscapeError) as info:
        CZSLDataset.from_root(toy, name="toy", check_images=True)
    message = one_line(info.value)
    assert rel in message and str(secret) in message and "through a symlink" in message
    # without the upfront check, reading the image refuses it (as one line, also from workers)
    ds = CZSLDataset.from_root(toy, name="toy")
    index = ds.split("train").images.index(rel)
    with pytest.raises(ImageDecodeError, match="leaves the dataset root"):
        ds.split("train").dataset()[index]
    # a link that stays inside the root, and an images/ folder that lives on another disk, are fine
    shutil.move(secret, toy / "kept.png")
    (toy / "images" / rel).unlink()
    (toy / "images" / rel).symlink_to(toy / "kept.png")
    shutil.move(toy / "images", tmp_path / "other-disk")
    (toy / "images").symlink_to(tmp_path / "other-disk", target_is_directory=True)
    ds = CZSLDataset.from_root(toy, name="toy", check_images=True)
    assert ds.split("train").dataset()[index][0].shape[0] == 3


# ---------------------------------------------------------------------------------------------
# 2. `data check` reports escaping paths as such, never as usable or "download again"
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ut(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ut") / "ut-zappos"
    build_real(root, "ut-zappos", per_pair=1)
    return root


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy" / src.name
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _first_split_record(root: Path) -> int:
    records = torch.load(root / METADATA, weights_only=True)
    return next(i for i, r in enumerate(records) if r["set"] != "NA" and r["attr"] != "NA")


@pytest.mark.parametrize("bad", ["../../outside/secret.png", "/etc/passwd"])
def test_check_reports_metadata_paths_outside_the_root(small_ut, tmp_path, bad):
    root = _copy(small_ut, tmp_path)
    (root.parent / "outside").mkdir()  # images/../../outside: a real image, so it looks "usable"
    (root.parent / "outside" / "secret.png").write_bytes(tiny_jpeg((9, 9, 9)))
    index = _first_split_record(root)
    _set_image(root, index, bad)
    report = DATASETS.get("ut-zappos").check(root, strict=False)
    assert not report.usable
    errors = [f.line() for f in report.errors()]
    assert any(f"record {index} ('image') names {bad!r}, which leaves the dataset root" in e for e in errors), errors
    assert not any("download" in e or "not an image" in e for e in errors), errors
    result = CliRunner().invoke(cli, ["data", "check", "ut-zappos", "--root", str(root), "--no-strict"])
    assert result.exit_code == 1 and "leaves the dataset root" in result.output


def test_check_reports_a_symlinked_image_outside_the_root(small_ut, tmp_path):
    root = _copy(small_ut, tmp_path)
    records = torch.load(root / METADATA, weights_only=True)
    rel = records[_first_split_record(root)]["image"]
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(tiny_jpeg((5, 5, 5)))
    (root / "images" / rel).unlink()
    (root / "images" / rel).symlink_to(secret)
    for mode in ("exists", "header"):
        report = DATASETS.get("ut-zappos").check(root, images=mode, strict=False)
        assert not report.usable, report.render()
        (finding,) = [f for f in report.errors()]
        assert "1 of" in finding.message and "leave the dataset root" in finding.message
        assert rel in finding.message and str(secret) in finding.message and "symlink" in finding.fix
    with pytest.raises(DatasetError, match="leave the dataset root"):
        DATASETS.get("ut-zappos").load(root, strict=False)


# ---------------------------------------------------------------------------------------------
# 3. every cached file is verified on read
# ---------------------------------------------------------------------------------------------
def test_a_flipped_byte_in_the_metadata_cache_is_caught_and_recomputed(toy, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    clean = CZSLDataset.from_root(toy, name="toy")  # fills the cache
    sizes = {s: len(clean.split(s)) for s in ("train", "val", "test")}
    [cached] = (tmp_path / "cache" / "metadata").glob("*.json")
    raw = cached.read_bytes()
    assert b'"set": "val"' in raw
    cached.write_bytes(raw.replace(b'"set": "val"', b'"set": "vam"', 1))  # the loader would put it in test
    with caplog.at_level("WARNING"):
        ds = CZSLDataset.from_root(toy, name="toy")
    assert {s: len(ds.split(s)) for s in sizes} == sizes
    assert ds.split("val").images == clean.split("val").images
    assert "damaged (checksum mismatch)" in caplog.text and str(cached) in caplog.text
    assert cached.read_bytes() == raw  # rewritten from the metadata file


def test_a_damaged_web_corpus_cache_is_rendered_again(tmp_path, monkeypatch, caplog):
    from czsl_bench.pretrain import PretrainConfig, _cached_web_corpus

    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    cfg = PretrainConfig(n_images=24, image_size=16)
    images, captions, state = _cached_web_corpus(cfg, [])
    assert state == "rendered"
    [path] = (tmp_path / "cache" / "web").glob("*.npz")
    assert _cached_web_corpus(cfg, [])[2] == "cache hit"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # inside the image array
    path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        again, again_captions, state = _cached_web_corpus(cfg, [])
    assert state == "rendered" and "web corpus cache file" in caplog.text and "damaged" in caplog.text
    assert (again == images).all() and again_captions == captions
    assert _cached_web_corpus(cfg, [])[2] == "cache hit"


SMALL = dict(size=1, image_size=16, workers=1)


def _flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_damaged_cached_synthetic_world_is_regenerated(tmp_path, monkeypatch, caplog):
    from czsl_bench.datasets.synthetic import plugin

    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    clean = plugin.load(**SMALL)
    root = clean.root
    sizes = {s: len(clean.split(s)) for s in ("train", "val", "test")}
    image = root / "images" / clean.split("test").images[0]
    original = image.read_bytes()
    _flip_byte(image)  # same size: the feature cache key (path, size) would not notice either
    meta = root / METADATA
    raw = meta.read_bytes()
    value = b"X\x03\x00\x00\x00val"  # the pickled string "val" (memoized: every val record uses it)
    assert value in raw
    meta.write_bytes(raw.replace(value, value[:-1] + b"m", 1))  # still a valid pickle; val images move to test
    with caplog.at_level("WARNING"):
        ds = plugin.load(**SMALL)
    assert "is damaged" in caplog.text and "checksum mismatch" in caplog.text
    assert ds.root == root and image.read_bytes() == original
    assert {s: len(ds.split(s)) for s in sizes} == sizes


def test_a_damaged_synthetic_world_at_an_explicit_root_is_refused_in_one_line(tmp_path):
    from czsl_bench.datasets.synthetic import plugin

    root = tmp_path / "world"
    ds = plugin.load(root, **SMALL)
    _flip_byte(root / "images" / ds.split("train").images[3])
    with pytest.raises(DatasetError) as info:
        plugin.load(root, **SMALL)
    message = one_line(info.value)
    assert str(root) in message and ds.split("train").images[3] in message and "checksum mismatch" in message
    assert "data check synthetic" in message


# ---------------------------------------------------------------------------------------------
# 4. a generation killed with kill -9 leaves a partial folder that the next one (and cache clear) removes
# ---------------------------------------------------------------------------------------------
def _killed_generation(cache_dir: Path, name: str) -> Path:
    """Start a real generation in a child process, kill -9 it mid-way; returns its partial folder."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys; from czsl_bench.datasets.synthetic import generate, SyntheticConfig; "
            "generate(sys.argv[1], SyntheticConfig(size=60, image_size=64, workers=1))")
    child = subprocess.Popen([sys.executable, "-c", code, str(cache_dir / name)])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            partial = next(iter(cache_dir.glob(f".{name}.tmp-*")), None)
            if partial is not None and next(partial.glob("images/*/*.png"), None) is not None:
                break
            assert child.poll() is None, "the generation ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the generation wrote no image within 180 s")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert partial.is_dir() and not (cache_dir / name).exists()
    return partial


@pytest.mark.slow
def test_the_next_generation_removes_a_killed_generations_partial_folder(tmp_path, monkeypatch):
    from czsl_bench.datasets.synthetic import generate, SyntheticConfig

    monkeypatch.setenv("CZSL_CACHE", str(tmp_path))
    cache_dir = tmp_path / "synthetic"
    cache_dir.mkdir()
    partial = _killed_generation(cache_dir, "victim")
    generate(cache_dir / "next", SyntheticConfig(**SMALL))
    assert not partial.exists()
    assert sorted(p.name for p in cache_dir.iterdir()) == ["next"]


@pytest.mark.slow
def test_cache_clear_removes_killed_partials_and_keeps_live_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path))
    cache_dir = tmp_path / "synthetic"
    cache_dir.mkdir()
    partial = _killed_generation(cache_dir, "victim")
    result = CliRunner().invoke(cli, ["cache", "clear", "-y"])
    assert result.exit_code == 0, result.output
    assert not partial.exists()
    assert "1 partial synthetic world folder(s)" in result.output and str(partial) in result.output
    # a generation that is still running (its owner alive) is left alone
    from czsl_bench.datasets.synthetic.store import write_owner

    live = cache_dir / ".other.tmp-1-0123abcd"
    live.mkdir()
    write_owner(live)
    result = CliRunner().invoke(cli, ["cache", "clear", "-y"])
    assert result.exit_code == 0 and live.is_dir() and "partial" not in result.output


# ---------------------------------------------------------------------------------------------
# 5. `data check synthetic` checks the generated world like a real dataset
# ---------------------------------------------------------------------------------------------
def test_data_check_synthetic_verifies_files_counts_checksums_and_version(tmp_path, monkeypatch):
    import json

    from czsl_bench.datasets.synthetic import plugin

    root = tmp_path / "world"
    ds = plugin.load(root, **SMALL)
    runner = CliRunner()
    ok = runner.invoke(cli, ["data", "check", "synthetic", "--root", str(root)])
    assert ok.exit_code == 0, ok.output
    assert "synthetic: usable (0 error(s), 0 warning(s))" in ok.output
    assert "train_images" in ok.output and "images/ (" in ok.output and "match" in ok.output

    rel = ds.split("val").images[0]
    _flip_byte(root / "images" / rel, offset=-3)  # past the header: only the checksum notices
    (root / "images" / ds.split("test").images[1]).unlink()
    bad = runner.invoke(cli, ["data", "check", "synthetic", "--root", str(root), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    errors = [f["message"] for f in report["findings"] if f["level"] == "error"]
    assert any("2 file(s) of the world" in e for e in errors), errors
    assert any("split images are missing" in e for e in errors), errors
    details = [d for f in report["findings"] for d in f["details"]]
    assert f"images/{rel}: checksum mismatch" in details
    assert {"file": "images/ (" + f"{len(ds.all_images()):,} files)", "status": "2 DIFFER"} in report["checksums"]


def test_data_check_synthetic_reports_another_generator_version(tmp_path):
    import json

    from czsl_bench.datasets.synthetic import plugin
    from czsl_bench.datasets.synthetic.store import doc_checksum

    root = tmp_path / "world"
    plugin.load(root, **SMALL)
    info = json.loads((root / "world.json").read_text())
    info["generator_version"] = "0.9.0"
    info["checksum"] = doc_checksum(info)
    (root / "world.json").write_text(json.dumps(info))
    strict = plugin.check(root)
    assert not strict.usable
    assert any("generated by synthetic generator 0.9.0" in f.message for f in strict.errors())
    assert plugin.check(root, strict=False).usable
