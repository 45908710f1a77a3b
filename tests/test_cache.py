"""Feature cache: keys, atomic writes, corruption recovery, concurrency, feature helpers, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import czsl_bench.cache as cache_mod
import czsl_bench.features as features_mod
from czsl_bench.backbone import load_backbone
from czsl_bench.cache import CACHE_FORMAT_VERSION, FeatureCache, default_cache_root
from czsl_bench.features import image_features, pair_prompts, pair_text_features, split_image_features
from czsl_bench.cli.cache import cache as cache_cli
from czsl_bench.names import clean_name

TINY = "czsl-test-cache-vit"
TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    directory = tmp_path_factory.mktemp("configs")
    (directory / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(directory / f"{TINY}.json")
    torch.manual_seed(0)
    return load_backbone(TINY, None, device="cpu")


@pytest.fixture()
def store(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


# ---- keys -------------------------------------------------------------------------------------


def test_key_is_stable_and_order_free():
    a = FeatureCache.key(kind="x", arch="ViT", nested={"b": 1, "a": [1, 2.5]})
    b = FeatureCache.key(nested={"a": [1, 2.5], "b": 1}, arch="ViT", kind="x")
    assert a == b and len(a) == 64
    # a fixed golden value: the key function must not drift silently between releases
    # sha256 of '{"czsl_cache_format":1,"parts":{"kind":"x","n":1}}'
    assert FeatureCache.key(kind="x", n=1) == "1ac587863d4acff98cbd089db6ff5123a549f394776fdd458cd00843cd96a70b"
    assert len({FeatureCache.key(n=v) for v in (1, 1.0, "1", "1.0", True, -0.0, 0.0)}) == 7


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                          st.floats(allow_nan=False))
_parts = st.dictionaries(st.text(min_size=1, max_size=6), _json_scalars, min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(parts=_parts, data=st.data())
def test_changing_any_part_changes_the_key(parts, data):
    name = data.draw(st.sampled_from(sorted(parts)))
    new_value = data.draw(_json_scalars.filter(lambda v: repr(v) != repr(parts[name]) or type(v) is not type(parts[name])))
    changed = dict(parts, **{name: new_value})
    assert FeatureCache.key(**changed) != FeatureCache.key(**parts)
    # a part name longer than the strategy's (6 characters): an added part, never a replaced one
    assert FeatureCache.key(**parts, added_part=0) != FeatureCache.key(**parts)


def test_key_rejects_unstable_types():
    with pytest.raises(TypeError, match="cache key part parts.t is a Tensor"):
        FeatureCache.key(t=torch.zeros(2))
    with pytest.raises(ValueError, match="not a sha256"):
        FeatureCache(".").path("../../etc/passwd")


def test_format_version_enters_the_key(monkeypatch):
    before = FeatureCache.key(a=1)
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    assert FeatureCache.key(a=1) != before


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    monkeypatch.delenv("CZSL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "czsl-bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_root() == Path.home() / ".cache" / "czsl-bench"


# ---- put / get, corruption --------------------------------------------------------------------


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(50, 16, generator=g), "ids": torch.arange(50)}


def test_roundtrip_is_bit_exact_and_listed(store):
    key = store.key(kind="image_features", n=50)
    assert store.get(key) is None
    store.put(key, _tensors(), meta={"arch": "tiny", "n": 50}, parts={"kind": "image_features", "n": 50})
    got = store.get(key)
    assert got is not None and all(torch.equal(got[k], v) for k, v in _tensors().items())
    (entry,) = store.entries()
    assert entry.key == key and entry.kind == "image_features" and entry.meta == {"arch": "tiny", "n": 50}
    assert not list(store.features_dir.glob("*/*.tmp"))  # no temp file left behind


def test_views_sharing_memory_are_stored(store):
    base = torch.randn(10, 4)
    key = store.key(a=1)
    store.put(key, {"first": base[:5], "second": base[5:]})
    got = store.get(key)
    assert torch.equal(got["first"], base[:5]) and torch.equal(got["second"], base[5:])


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_damaged_entries_are_detected_deleted_and_rebuilt(store, damage, caplog):
    parts = {"kind": "test", "n": 50}
    calls = []

    def compute():
        calls.append(1)
        return _tensors()

    store.get_or_compute(parts, compute)
    path = store.path(store.key(**parts))
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) - 37])
    elif damage == "flip":
        pos = len(raw) - 100  # inside the tensor data, header intact
        path.write_bytes(raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1 :])
    elif damage == "header":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        path.write_bytes(b"")
    assert store.get(store.key(**parts)) is None
    assert not path.exists()
    assert "unreadable" in caplog.text
    again = store.get_or_compute(parts, compute)
    assert len(calls) == 2 and torch.equal(again["features"], _tensors()["features"])
    assert store.get(store.key(**parts)) is not None


def test_get_or_compute_hits_without_computing(store):
    calls = []
    parts = {"kind": "t"}
    store.get_or_compute(parts, lambda: calls.append(1) or _tensors())
    out = store.get_or_compute(parts, lambda: calls.append(1) or _tensors())
    assert len(calls) == 1 and torch.equal(out["features"], _tensors()["features"])


def test_failed_write_leaves_no_entry(store, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put(store.key(a=1), _tensors())
    assert store.get(store.key(a=1)) is None
    assert not list(store.features_dir.glob("*/*"))


def _worker(root: str, parts: dict, counter: str, seed: int) -> None:
    def compute():
        with open(counter, "a") as fh:
            fh.write("x")
        return _tensors(0)

    store = FeatureCache(root)
    store.get_or_compute(parts, compute)
    for _ in range(5):  # and raw concurrent puts of the same key never leave a broken file
        store.put(store.key(kind="raw"), _tensors(0))


def test_concurrent_writers_compute_once_and_never_corrupt(tmp_path):
    root, counter = str(tmp_path / "cache"), str(tmp_path / "count")
    parts = {"kind": "concurrent"}
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(root, parts, counter, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert Path(counter).read_text() == "x"
    store = FeatureCache(root)
    assert torch.equal(store.get(store.key(**parts))["features"], _tensors(0)["features"])
    assert torch.equal(store.get(store.key(kind="raw"))["features"], _tensors(0)["features"])


def test_clear_by_kind_and_all(store):
    store.put(store.key(k=1), _tensors(), parts={"kind": "image_features"})
    store.put(store.key(k=2), _tensors(), parts={"kind": "pair_text_features"})
    assert store.clear("image_features") == 1
    assert [e.kind for e in store.entries()] == ["pair_text_features"]
    assert store.clear() == 1 and store.entries() == []


# ---- feature helpers --------------------------------------------------------------------------


PAIRS = [("sliced", "apple"), ("Ancient", "building"), ("Boots.Ankle", "leather"), ("red", "traffic_light")]


def test_pair_prompts_clean_names():
    assert clean_name("Boots.Ankle") == "boots ankle" and clean_name("traffic_light") == "traffic_light"
    assert pair_prompts(PAIRS[:1]) == ["a photo of sliced apple"]
    with pytest.raises(ValueError, match="must contain"):
        pair_prompts(PAIRS, template="a photo of {obj}")


def test_pair_text_features_cache_hits_and_invalidates(backbone, store, monkeypatch):
    calls = []
    real = features_mod.encode_token_ids

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_mod, "encode_token_ids", counting)
    first = pair_text_features(backbone, PAIRS, cache=store, batch_size=3)
    with torch.no_grad():
        expected = backbone.encode_text([f"a photo of {clean_name(a)} {clean_name(o)}" for a, o in PAIRS])
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)  # shortest-fitting context ~ 77
    assert torch.equal(pair_text_features(backbone, PAIRS, cache=store, batch_size=3), first)
    assert len(calls) == 1
    # each of these changes one input: a miss each time
    pair_text_features(backbone, PAIRS, template="a photo of {obj} that is {attr}", cache=store)
    pair_text_features(backbone, PAIRS, context_length=16, cache=store)
    pair_text_features(backbone, PAIRS[:3], cache=store)
    pair_text_features(backbone, PAIRS, cache=store, clean=str.lower)
    other = load_backbone(TINY, None, device="cpu")
    pair_text_features(other, PAIRS, cache=store)
    assert len(calls) == 6
    assert len(store.entries()) == 6


def test_pair_text_features_progress_and_batches(backbone):
    seen = []
    out = pair_text_features(backbone, PAIRS, batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(3, 4), (4, 4)]
    whole = pair_text_features(backbone, PAIRS, batch_size=100)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)


def _write_images(root: Path, n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(n):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        rel = f"cls{i % 2}/img{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / rel)
        names.append(rel)
    return names


def test_image_features_match_direct_encoding_and_invalidate(backbone, store, tmp_path, monkeypatch):
    root = tmp_path / "images"
    names = _write_images(root, 5)
    feats = image_features(backbone, root, names, cache=store, batch_size=2)
    batch = torch.stack([backbone.preprocess_eval(Image.open(root / n).convert("RGB")) for n in names])
    with torch.no_grad():
        torch.testing.assert_close(feats, backbone.encode_image(batch, adapters=False), rtol=1e-5, atol=1e-5)

    calls = []
    real = features_mod.encode_images
    monkeypatch.setattr(features_mod, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(image_features(backbone, root, names, cache=store), feats)
    assert calls == []
    # a moved dataset keeps its entries
    moved = tmp_path / "moved"
    root.rename(moved)
    assert torch.equal(image_features(backbone, moved, names, cache=store), feats) and calls == []
    # changed image content (size), changed list, changed extra: misses
    Image.new("RGB", (41, 40)).save(moved / names[0])
    image_features(backbone, moved, names, cache=store)
    image_features(backbone, moved, names[:4], cache=store)
    image_features(backbone, moved, names[:4], cache=store, extra={"split_file": "abc"})
    assert len(calls) == 3
    # a changed eval preprocessing is a miss too
    backbone_pp = dict(backbone.preprocess_cfg)
    try:
        backbone.preprocess_cfg["interpolation"] = "bilinear"
        image_features(backbone, moved, names[:4], cache=store)
    finally:
        backbone.preprocess_cfg.clear()
        backbone.preprocess_cfg.update(backbone_pp)
    assert len(calls) == 4


def test_split_image_features_and_missing_images(backbone, store, tmp_path):
    root = tmp_path / "images"
    names = _write_images(root, 3)

    class Split:  # the fields of czsl_bench.datasets.Split that the helper reads
        name = "test"

    split = Split()
    split.root, split.images = root, names
    out = split_image_features(backbone, split, cache=store)
    assert out.shape == (3, backbone.embed_dim) and store.entries()[0].meta["split"] == "test"
    with pytest.raises(FileNotFoundError, match=r"image .*missing\.png' is missing; check the dataset root"):
        image_features(backbone, root, names + ["missing.png"], cache=store)
    (root / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="cannot be read"):
        image_features(backbone, root, ["broken.png"], cache=store)


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_ls_and_clear(store):
    runner = CliRunner()
    root = str(store.root)
    result = runner.invoke(cache_cli, ["ls", "--root", root])
    assert result.exit_code == 0 and "no entries" in result.output
    store.put(store.key(k=1), _tensors(), meta={"arch": "tiny", "n": 50}, parts={"kind": "image_features"})
    store.put(store.key(k=2), _tensors(), parts={"kind": "pair_text_features"})
    result = runner.invoke(cache_cli, ["ls", "--root", root])
    assert result.exit_code == 0 and "image_features" in result.output and "2 entries" in result.output
    lines = runner.invoke(cache_cli, ["ls", "--root", root, "--json"]).output.strip().splitlines()
    assert {json.loads(line)["kind"] for line in lines} == {"image_features", "pair_text_features"}
    result = runner.invoke(cache_cli, ["clear", "--root", root], input="n\n")
    assert result.exit_code == 1 and len(store.entries()) == 2  # declined: nothing deleted
    result = runner.invoke(cache_cli, ["clear", "--root", root, "--kind", "image_features", "--yes"])
    assert result.exit_code == 0 and "deleted 1" in result.output
    result = runner.invoke(cache_cli, ["clear", "--root", root, "-y"])
    assert result.exit_code == 0 and store.entries() == []


def test_cli_is_registered_and_honours_the_env_root(tmp_path, monkeypatch):
    from czsl_bench.cli import SUBCOMMANDS

    assert SUBCOMMANDS["cache"] == "czsl_bench.cli.cache:cache"
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "envcache"))
    result = CliRunner().invoke(cache_cli, ["ls"])
    assert result.exit_code == 0 and str(tmp_path / "envcache") in result.output
