"""`data prepare` on small local archives built in the real release layouts (no network)."""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from czsl_bench.cli import cli
from czsl_bench.datasets.czsl_format import DatasetError
from czsl_bench.datasets.prepare import http_fetch
from czsl_bench.registry import DATASETS
from fixtures.czsl_real_format import (
    CANONICAL,
    METADATA,
    SPLIT_DIR,
    build_cgqa,
    load_real_metadata,
    palette,
    split_image_paths,
    subset_records,
)

# Fixtures with a subset of the images load with strict=False, which still warns about the counts.
pytestmark = [pytest.mark.usefixtures("private_metadata_cache"),
              pytest.mark.filterwarnings("ignore:.*counts differ from the published statistics:UserWarning",
                                         "ignore:.*differ from the canonical copies:UserWarning")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_tarball(path: Path, records: dict[str, list[dict]]) -> Path:
    """A TMN-layout split tarball: <folder>/compositional-split-natural/*.txt + metadata."""
    with tarfile.open(path, "w:gz") as tar:
        for folder, (name, recs) in {"mit-states": ("mit-states", records.get("mit-states")),
                                     "ut-zap50k": ("ut-zappos", records.get("ut-zappos"))}.items():
            if recs is None:
                continue
            for split in ("train", "val", "test"):
                tar.add(CANONICAL / name / SPLIT_DIR / f"{split}_pairs.txt", f"{folder}/{SPLIT_DIR}/{split}_pairs.txt")
            buf = io.BytesIO()
            torch.save(recs, buf)
            info = tarfile.TarInfo(f"{folder}/{METADATA}")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return path


def image_zip(path: Path, members: list[str], extra: dict[str, bytes] | None = None) -> Path:
    images = palette(4)
    with zipfile.ZipFile(path, "w") as zf:
        for k, name in enumerate(members):
            zf.writestr(name, images[k % len(images)])
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


class LocalFetch:
    """The injected network: URL -> local file, appending to a partial download like a Range request."""

    def __init__(self, files: dict[str, Path], fail_after: dict[str, int] | None = None):
        self.files = files
        self.fail_after = dict(fail_after or {})
        self.calls: list[str] = []

    def __call__(self, url: str, part: Path) -> None:
        self.calls.append(url)
        if url not in self.files:
            raise OSError(f"HTTP 404 for {url}")
        data = self.files[url].read_bytes()
        have = part.stat().st_size if part.exists() else 0
        stop = self.fail_after.pop(url, None)
        with open(part, "ab") as f:
            f.write(data[have: stop if stop is not None else len(data)])
        if stop is not None:
            raise OSError("connection reset")


@pytest.fixture(scope="module")
def mit_subset() -> list[dict]:
    return subset_records(load_real_metadata("mit-states"), per_pair=1)


def test_mit_states_images_renamed_and_splits_from_upstream(tmp_path, mit_subset):
    archives = tmp_path / "archives"
    archives.mkdir()
    rels = split_image_paths(mit_subset)
    # the release names folders "adj noun"; the metadata expects "adj_noun"
    members = [f"release_dataset/images/{r.split('/')[0].replace('_', ' ')}/{r.split('/')[1]}" for r in rels]
    zip_path = image_zip(archives / "release_dataset.zip", members,
                         extra={"release_dataset/README.txt": b"x", "../escape.jpg": b"evil"})
    tar_path = split_tarball(archives / "splits.tar.gz", {"mit-states": mit_subset, "ut-zappos": []})
    fetch = LocalFetch({"https://images.example/release_dataset.zip": zip_path,
                        "https://splits.example/s.tar.gz": tar_path})
    plugin = DATASETS.get("mit-states")
    root = tmp_path / "data" / "mit-states"
    report = plugin.prepare(root, fetch=fetch, splits_from="upstream", strict=False, log=lambda _: None,
                            urls={"images": "https://images.example/release_dataset.zip",
                                  "splits": "https://splits.example/s.tar.gz"},
                            sha256={"splits": sha256(tar_path)})
    assert report.check.usable, report.check.render()
    assert sorted(report.downloaded) == ["images", "splits"]
    assert (root / "images" / rels[0]).is_file() and not any(" " in p.name for p in (root / "images").iterdir())
    assert not (tmp_path / "data" / "escape.jpg").exists() and not (root / "escape.jpg").exists()
    ds = plugin.load(root, strict=False)
    assert len(ds.all_images()) == len(rels)
    # a second run downloads nothing and extracts nothing
    logs: list[str] = []
    again = plugin.prepare(root, fetch=fetch, splits_from="upstream", strict=False, log=logs.append,
                           urls={"images": "https://images.example/release_dataset.zip",
                                 "splits": "https://splits.example/s.tar.gz"},
                           sha256={"splits": sha256(tar_path)})
    assert again.downloaded == [] and sorted(again.reused) == ["images", "splits"]
    assert len(fetch.calls) == 2 and any(f"{len(rels):,} already present" in line for line in logs)


def test_package_splits_are_the_canonical_bytes(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    first = split_image_paths(load_real_metadata("mit-states"))[0]  # e.g. "ancient_city/x.jpg"
    folder, fname = first.split("/")
    zip_path = image_zip(archives / "release_dataset.zip", [f"release_dataset/images/{folder.replace('_', ' ')}/{fname}"])
    fetch = LocalFetch({"u": zip_path})
    root = tmp_path / "mit-states"
    report = DATASETS.get("mit-states").prepare(root, fetch=fetch, urls={"images": "u"}, log=lambda _: None)
    for rel in [f"{SPLIT_DIR}/{s}_pairs.txt" for s in ("train", "val", "test")] + [METADATA]:
        assert (root / rel).read_bytes() == (CANONICAL / "mit-states" / rel).read_bytes()
    # one image of 53,753 is present: prepare says what is missing, as data check does
    assert not report.check.usable
    assert "53,752 of 53,753 split images are missing" in report.check.errors()[0].message


def test_interrupted_download_resumes_and_checksums_are_enforced(tmp_path, mit_subset):
    tar_path = split_tarball(tmp_path / "splits.tar.gz", {"mit-states": mit_subset, "ut-zappos": []})
    zip_path = image_zip(tmp_path / "release_dataset.zip", ["release_dataset/images/ancient city/1.jpg"])
    files = {"https://a/splits": tar_path, "https://a/images": zip_path}
    root = tmp_path / "mit-states"
    plugin = DATASETS.get("mit-states")
    kw = dict(splits_from="upstream", strict=False, log=lambda _: None,
              urls={"images": "https://a/images", "splits": "https://a/splits"})
    half = tar_path.stat().st_size // 2
    with pytest.raises(DatasetError, match="could not download splits .*connection reset.*--url splits=URL"):
        plugin.prepare(root, fetch=LocalFetch(files, fail_after={"https://a/splits": half}),
                       sha256={"splits": sha256(tar_path)}, **kw)
    part = root / "_downloads" / "compositional_split_natural.tar.gz.part"
    assert part.stat().st_size == half
    plugin.prepare(root, fetch=LocalFetch(files), sha256={"splits": sha256(tar_path)}, **kw)
    assert not part.exists() and sha256(root / "_downloads" / "compositional_split_natural.tar.gz") == sha256(tar_path)
    # a wrong published checksum rejects the file and keeps nothing under the final name
    other = tmp_path / "other"
    with pytest.raises(DatasetError, match="does not match the expected 0000"):
        plugin.prepare(other, fetch=LocalFetch(files), sha256={"splits": "0" * 64}, **kw)
    assert not (other / "_downloads" / "compositional_split_natural.tar.gz").exists()
    assert not (other / "_downloads" / "compositional_split_natural.tar.gz.part").exists()


def test_mirror_fallback_and_recorded_checksum(tmp_path):
    zip_path = image_zip(tmp_path / "z.zip", ["ut-zap50k-images/Shoes/Flats/Acme/1.jpg"])
    root = tmp_path / "ut-zappos"
    plugin = DATASETS.get("ut-zappos")
    fetch = LocalFetch({"http://vision.cs.utexas.edu/projects/finegrained/utzap50k/ut-zap50k-images.zip": zip_path})
    plugin.prepare(root, fetch=fetch, log=lambda _: None)
    state = (root / ".czsl-prepare.json").read_text()
    assert sha256(zip_path) in state  # no published checksum: recorded at the first download
    # a later corruption of the archive is caught by the recorded checksum and re-downloaded
    (root / "_downloads" / "ut-zap50k-images.zip").write_bytes(b"garbage")
    logs: list[str] = []
    plugin.prepare(root, fetch=fetch, log=logs.append)
    assert any("does not match its checksum" in line for line in logs) and len(fetch.calls) == 2
    with pytest.raises(ValueError, match="unknown source key"):
        plugin.prepare(root, fetch=fetch, urls={"imgs": "x"})


def test_ut_zappos_reorganisation(tmp_path):
    records = subset_records(load_real_metadata("ut-zappos"), per_pair=2)
    zip_path = image_zip(tmp_path / "ut-zap50k-images.zip", [f"ut-zap50k-images/{r['_image']}" for r in records])
    tar_path = split_tarball(tmp_path / "splits.tar.gz", {"mit-states": [], "ut-zappos": records})
    root = tmp_path / "ut-zappos"
    report = DATASETS.get("ut-zappos").prepare(
        root, fetch=LocalFetch({"i": zip_path, "s": tar_path}), urls={"images": "i", "splits": "s"},
        sha256={"splits": sha256(tar_path)}, splits_from="upstream", strict=False, log=lambda _: None)
    assert report.check.usable, report.check.render()
    for rec in records:  # every record, NA ones included, like reorganize_utzap.py
        assert (root / "images" / rec["image"]).read_bytes() == (root / "_images" / rec["_image"]).read_bytes()
    assert (root / "_images" / "Shoes" / "Sneakers and Athletic Shoes").is_dir()


def test_cgqa_bundle_zip(tmp_path):
    built = build_cgqa(tmp_path / "built" / "cgqa")
    zip_path = tmp_path / "cgqa.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(built.root.rglob("*")):
            if path.is_file() and ".fixture" not in path.parts:
                zf.write(path, f"cgqa/{path.relative_to(built.root).as_posix()}")
    root = tmp_path / "data" / "cgqa"
    fetch = LocalFetch({"https://s3.mlcloud.uni-tuebingen.de/czsl/cgqa-updated.zip": zip_path})
    report = DATASETS.get("cgqa").prepare(root, fetch=fetch, strict=False, keep_archives=False, log=lambda _: None)
    assert report.check.usable, report.check.render()
    assert len(fetch.calls) == 2  # the Hugging Face mirror "failed", the S3 mirror served it
    assert not (root / "_downloads").exists()
    assert all(status == "match" for _, status in report.check.checksums)
    assert len(DATASETS.get("cgqa").load(root, strict=False).all_images()) == built.n_images


def test_not_a_zip_is_one_line(tmp_path):
    bogus = tmp_path / "cgqa.zip"
    bogus.write_bytes(b"<html>SlowDown</html>")  # what an overloaded S3 returned (czsl#32)
    with pytest.raises(DatasetError, match="is not a readable zip .*delete it and run prepare again"):
        DATASETS.get("cgqa").prepare(tmp_path / "cgqa", fetch=LocalFetch({
            "https://huggingface.co/datasets/nihalnayak/cgqa/resolve/main/cgqa.zip": bogus}), log=lambda _: None)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = bytes(range(256)) * 64

    def do_GET(self):  # noqa: N802 - http.server API
        data, status = self.payload, 200
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            data, status = data[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_fetch_resumes_with_range_requests(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/file.bin"
        part = tmp_path / "file.bin.part"
        part.write_bytes(_RangeHandler.payload[:1000])
        http_fetch(url, part, log=lambda _: None)
        assert part.read_bytes() == _RangeHandler.payload
        with pytest.raises(OSError, match="download of http://127.0.0.1:1/x failed"):
            http_fetch("http://127.0.0.1:1/x", tmp_path / "y.part", log=lambda _: None, timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_cli_prepare_with_file_urls(tmp_path):
    records = subset_records(load_real_metadata("ut-zappos"), per_pair=1)
    zip_path = image_zip(tmp_path / "ut.zip", [f"ut-zap50k-images/{r['_image']}" for r in records])
    tar_path = split_tarball(tmp_path / "splits.tar.gz", {"mit-states": [], "ut-zappos": records})
    root = tmp_path / "ut-zappos"
    args = ["data", "prepare", "ut-zappos", "--root", str(root), "--url", f"images={zip_path.as_uri()}",
            "--url", f"splits={tar_path.as_uri()}", "--sha256", f"splits={sha256(tar_path)}",
            "--splits-from", "upstream", "--no-strict"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "ut-zappos: usable" in result.output
    bad = CliRunner().invoke(cli, ["data", "prepare", "ut-zappos", "--root", str(root), "--url", "images"])
    assert bad.exit_code == 2 and "expected KEY=VALUE" in bad.output
    shutil.rmtree(root)
