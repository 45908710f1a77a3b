"""The decoded-image cache (czsl_bench/image_cache.py): keys, verification on read, atomic builds,
listing and clearing."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from czsl_bench import image_cache
from czsl_bench.cli import cli
from czsl_bench.datasets.czsl_format import ImageDecodeError, decode_image
from czsl_bench.image_cache import KIND, ImageCache, split_parts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.czsl_real_format import photo_split  # noqa: E402

PREPROCESS = {"size": [224, 224], "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
              "resize_mode": "shortest", "fill_color": 0}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def split(tmp_path):
    return photo_split(tmp_path / "photos", 12, split="train")


def _key(split, version="v1", preprocess=PREPROCESS) -> str:
    return ImageCache.key(**split_parts(split, version, preprocess))


def _build(cache: ImageCache, split, **kwargs):
    return cache.get_or_build(split_parts(split, "v1", PREPROCESS), split.root, split.images, workers=0, **kwargs)


def _decoded(split) -> list[np.ndarray]:
    return [np.asarray(decode_image(split.image_path(i))) for i in range(len(split))]


def _same(store, arrays) -> bool:
    return len(store) == len(arrays) and all(np.array_equal(store.array(i), a) for i, a in enumerate(arrays))


def test_key_changes_when_any_input_changes(split, tmp_path, monkeypatch):
    base = _key(split)
    assert _key(split) == base  # a pure function of the parts
    moved = tmp_path / "moved"
    shutil.copytree(split.root.parent, moved)
    assert _key(dataclasses.replace(split, root=moved / "images")) == base  # the root is not content

    renamed = split.root / "a_b" / "renamed.jpg"
    shutil.copy(split.root / split.images[0], renamed)
    resized = split.root / "a_b" / "0.jpg"
    changed = {
        "dataset version": _key(split, version="v2"),
        "split name": _key(dataclasses.replace(split, name="val")),
        "image list (one fewer)": _key(dataclasses.replace(split, images=split.images[:-1])),
        "image list (renamed file)": _key(dataclasses.replace(split, images=["a_b/renamed.jpg", *split.images[1:]])),
        "decode mode": _key(split, preprocess={**PREPROCESS, "mode": "L"}),
        "preprocessing size": _key(split, preprocess={**PREPROCESS, "size": [336, 336]}),
        "preprocessing interpolation": _key(split, preprocess={**PREPROCESS, "interpolation": "bilinear"}),
    }
    resized.write_bytes(resized.read_bytes() + b"\0" * 10)  # same name, other bytes (size)
    changed["image bytes"] = _key(split)
    monkeypatch.setattr(image_cache, "IMAGE_CACHE_FORMAT", image_cache.IMAGE_CACHE_FORMAT + 1)
    resized.write_bytes(resized.read_bytes()[:-10])
    changed["cache format"] = _key(split)
    for what, key in changed.items():
        assert key != base, what
    assert len(set(changed.values())) == len(changed)


def test_an_entry_holds_the_decoded_originals_in_memory_or_mapped(split, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    arrays = _decoded(split)
    store = _build(cache, split)
    assert store.paths is None and _same(store, arrays)  # small: read into memory
    key = _key(split)
    mapped = cache.get(key, in_memory_bytes=0)
    assert mapped.paths is not None and all(isinstance(s, np.memmap) for s in mapped.shards)
    assert _same(mapped, arrays)
    again = pickle.loads(pickle.dumps(mapped))  # what a spawned DataLoader worker receives
    assert again.paths == mapped.paths and _same(again, arrays)
    assert len(pickle.dumps(mapped)) < 10_000  # the file paths, not the pixels
    assert sorted(map(tuple, store.sizes.tolist())) == sorted(a.shape[:2] for a in arrays)
    [entry] = cache.entries()
    assert (entry.key, entry.kind, entry.parts["split"], entry.parts["n"]) == (key, KIND, "train", 12)
    assert entry.size_bytes >= sum(a.nbytes for a in arrays)


def test_a_truncated_or_altered_shard_is_detected_and_rebuilt(split, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(image_cache, "SHARD_BYTES", 400_000)  # several shards
    cache = ImageCache(tmp_path / "cache")
    arrays = _decoded(split)
    _build(cache, split)
    folder = cache.path(_key(split))
    shards = sorted(folder.glob("shard-*.u8"))
    assert len(shards) >= 3
    with open(shards[1], "r+b") as f:  # truncated: caught by the size check
        f.truncate(shards[1].stat().st_size - 100)
    with caplog.at_level(logging.WARNING, logger="czsl_bench.image_cache"):
        assert cache.get(_key(split)) is None
    assert "damaged" in caplog.text and "truncated" in caplog.text
    assert not folder.exists()
    assert _same(_build(cache, split), arrays)  # decoded again

    data = bytearray(shards[2].read_bytes())  # same size, one flipped byte: caught by the checksum
    data[1234] ^= 0xFF
    shards[2].write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="czsl_bench.image_cache"):
        store = _build(cache, split)
    assert "checksum mismatch" in caplog.text and _same(store, arrays)


_KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from fixtures.czsl_real_format import photo_split
    from czsl_bench import image_cache
    from czsl_bench.image_cache import ImageCache, split_parts

    split = photo_split(__import__("pathlib").Path({root!r}), 12, split="train")
    image_cache.SHARD_BYTES = 400_000
    add = image_cache._ShardWriter.add
    seen = []

    def add_then_die(self, array):
        add(self, array)
        seen.append(1)
        if len(seen) == 7:  # shards written, index not yet: the worst moment
            os.kill(os.getpid(), signal.SIGKILL)

    image_cache._ShardWriter.add = add_then_die
    ImageCache({cache!r}).get_or_build(split_parts(split, "v1", {pp!r}), split.root, split.images, workers=0)
""")


def test_a_killed_build_leaves_no_entry(tmp_path):
    root, cache_root = tmp_path / "photos", tmp_path / "cache"
    script = _KILLED_BUILD.format(tests=str(REPO / "tests"), root=str(root), cache=str(cache_root), pp=PREPROCESS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    split = photo_split(tmp_path / "photos2", 12, split="train")  # the same files, read again
    split = dataclasses.replace(split, root=root / "images")
    cache = ImageCache(cache_root)
    folder = cache.path(_key(split))
    assert list(folder.glob("shard-*.u8")) and not (folder / "index.json").exists()  # it did die mid-way
    assert cache.entries() == [] and cache.get(_key(split)) is None
    assert _same(_build(cache, split), _decoded(split))  # the next build starts over
    assert not list(folder.glob(".*.tmp"))
    assert cache.clear() == 1 and not any(cache.images_dir.glob("*/*"))


def test_a_damaged_image_fails_the_build_in_one_line_and_leaves_nothing(split, tmp_path):
    (split.root / split.images[5]).write_bytes(b"not a jpeg at all")
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(ImageDecodeError) as err:
        _build(cache, split)
    assert "\n" not in str(err.value) and split.images[5] in str(err.value) and "download it again" in str(err.value)
    assert not cache.path(_key(split)).exists() and cache.entries() == []


def test_cache_ls_and_clear_show_and_remove_decoded_images(split, tmp_path):
    from czsl_bench.cache import FeatureCache

    root = tmp_path / "cache"
    _build(ImageCache(root), split, meta={"dataset": "photos", "split": "train"})
    FeatureCache(root).put(FeatureCache.key(kind="image_features", n=1), {"features": __import__("torch").zeros(1, 2)},
                           parts={"kind": "image_features"})
    runner = CliRunner()
    listing = runner.invoke(cli, ["cache", "ls", "--root", str(root)])
    assert listing.exit_code == 0, listing.output
    assert "decoded_images" in listing.output and "dataset=photos, split=train, n=12" in listing.output
    assert "2 entries" in listing.output
    lines = runner.invoke(cli, ["cache", "ls", "--root", str(root), "--json"]).output.splitlines()
    assert sorted(json.loads(line)["kind"] for line in lines) == ["decoded_images", "image_features"]
    cleared = runner.invoke(cli, ["cache", "clear", "--root", str(root), "--kind", KIND, "--yes"])
    assert cleared.exit_code == 0 and "deleted 1 decoded_images entries" in cleared.output
    assert ImageCache(root).entries() == [] and len(FeatureCache(root).entries()) == 1
    os.makedirs(ImageCache(root).images_dir / "ab" / ("ab" + "0" * 62))  # a killed build's folder
    runner.invoke(cli, ["cache", "clear", "--root", str(root), "--yes"])
    assert not any(ImageCache(root).images_dir.glob("*/*")) and FeatureCache(root).entries() == []
