"""Dataset loading speed: MIT-States metadata -> splits (target < 2 s) and image decoding throughput.

Run: ``pytest benchmarks/test_bench_datasets.py --benchmark-only``. Figures measured on the
project's 2-core CPU machine are recorded in docs/datasets.md.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from czsl_bench.datasets.czsl_format import CZSLDataset
from czsl_bench.registry import DATASETS
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared fixture builders
from fixtures.czsl_real_format import CANONICAL, build_real, write_images  # noqa: E402

SPLITS = ("train", "val", "test")


def _target(benchmark, seconds: float) -> None:
    # the fastest round is the least disturbed by other jobs on a shared machine
    if not benchmark.disabled and benchmark.stats is not None:
        assert benchmark.stats.stats.min < seconds, f"fastest round {benchmark.stats.stats.min:.2f} s > {seconds} s"


def _load_and_split(root: Path) -> CZSLDataset:
    ds = CZSLDataset.from_root(root, name="mit-states")
    for split in SPLITS:
        for world in ("closed", "open"):
            ds.split(split, world)
    return ds


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CZSL_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))
        yield


def test_bench_mit_states_metadata_to_splits_cold(benchmark, monkeypatch):
    """torch.load(weights_only=True) of the real 63,440-record metadata + all six Splits (no cache)."""
    monkeypatch.setenv("CZSL_METADATA_CACHE", "0")
    ds = benchmark.pedantic(_load_and_split, args=(CANONICAL / "mit-states",), rounds=5, iterations=1)
    assert len(ds.split("test")) == 12_995
    _target(benchmark, 2.0)


def test_bench_mit_states_metadata_to_splits_warm(benchmark):
    """The same with the validated records already in the content-addressed metadata cache."""
    _load_and_split(CANONICAL / "mit-states")  # fill the cache
    ds = benchmark.pedantic(_load_and_split, args=(CANONICAL / "mit-states",), rounds=5, iterations=1)
    assert len(ds.split("test")) == 12_995
    _target(benchmark, 2.0)


@pytest.fixture(scope="module")
def full_mit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "mit-states"
    build_real(root, "mit-states")  # all 53,753 split images, hard-linked 4x4 JPEGs
    return root


def test_bench_mit_states_plugin_load_with_image_check(benchmark, full_mit):
    """What a run pays: the plugin's strict load (counts, checksums, 53,753 image existence checks)."""
    ds = benchmark.pedantic(DATASETS.get("mit-states").load, args=(full_mit,), rounds=3, iterations=1)
    assert len(ds.all_images()) == 53_753


@pytest.fixture(scope="module")
def photo_split(tmp_path_factory):
    """256 photo-sized JPEGs (320x240, noise + gradient so they do not compress to nothing)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    gen = torch.Generator().manual_seed(0)
    blobs = []
    for k in range(16):
        pixels = (torch.rand(240, 320, 3, generator=gen) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    rels = [f"a_b/{k}.jpg" for k in range(256)]
    write_images(root, rels, blobs, link=False)
    records = [{"image": r, "attr": "a", "obj": "b", "set": "test"} for r in rels]
    ds = CZSLDataset.from_records("photos", root, [("a", "b")], [], [("a", "b")], records)
    return ds.split("test")


@pytest.mark.parametrize("workers, threads", [(0, None), (0, 1), (2, None)],
                         ids=["0-workers", "0-workers-1-thread", "2-workers"])
def test_bench_image_decoding_throughput(benchmark, photo_split, workers, threads):
    """Decode + the CLIP ViT-B eval transform (resize 224 bicubic, centre crop, normalise).

    ``threads=1`` pins torch's intra-op threads in the main process (workers always use one): on an
    oversubscribed CPU the default thread pool slows single-process loading several-fold.
    """
    import open_clip

    transform = open_clip.image_transform(224, is_train=False)
    loader = torch.utils.data.DataLoader(photo_split.dataset(transform), batch_size=64, num_workers=workers)
    before = torch.get_num_threads()

    def run() -> int:
        return sum(images.shape[0] for images, _, _ in loader)

    try:
        if threads is not None:
            torch.set_num_threads(threads)
        n = benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        torch.set_num_threads(before)
    assert n == 256
    if not benchmark.disabled and benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(256 / benchmark.stats.stats.median, 1)
