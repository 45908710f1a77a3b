"""The synthetic CZSL world: vocabulary, feasibility, split recipe, on-disk format, cache, web corpus."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from czsl_bench.datasets.czsl_format import CZSLDataset
from czsl_bench.datasets.synthetic import (DEFAULT_WORLD, SyntheticConfig, describe, descriptions, generate,
                                           heldout_pairs, image_plan, natural_split, plugin, web_corpus)
from czsl_bench.datasets.synthetic.render import render
from czsl_bench.datasets.synthetic.world import ATTRIBUTE_SYNONYMS, WEB_RARE_WORDS

W = DEFAULT_WORLD
# A world small enough to write in about a second: 2 training images per seen pair, 1 per val/test pair.
TINY = SyntheticConfig(size=2, image_size=32)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "world", TINY)


# -- the world ---------------------------------------------------------------------------------


def test_vocabulary_sizes_and_families():
    assert 10 <= len(W.attrs) <= 20 and 10 <= len(W.objs) <= 20
    assert set(W.attribute_families) == {"colour", "pattern", "state"}
    assert len(W.object_families) >= 2
    assert W.attrs == sorted(W.attrs) and W.objs == sorted(W.objs)
    # names are single tokens for the pair files (split on whitespace)
    assert all(" " not in n and "_" not in n for n in W.attrs + W.objs)


def test_feasibility_has_infeasible_pairs_by_family():
    n_open = len(W.attrs) * len(W.objs)
    feasible = set(W.feasible_pairs)
    assert len(feasible) == 181 and len(feasible) < n_open
    # whole attribute families never apply to whole object families
    assert not W.is_feasible("striped", "apple") and not W.is_feasible("broken", "shirt")
    assert W.is_feasible("red", "apple") and W.is_feasible("wet", "shirt")
    for a in W.attrs:
        fams = {W.obj_family[o] for o in W.objs if (a, o) in feasible}
        assert len(fams) >= 2, f"{a} applies to a single object family: no cross-family diversity"
    for o in W.objs:
        assert sum((a, o) in feasible for a in W.attrs) >= 8
    matrix = np.array(W.feasibility_matrix())
    assert matrix.shape == (len(W.attrs), len(W.objs)) and matrix.sum() == len(feasible)


# -- the split recipe --------------------------------------------------------------------------


def _check_natural_split(split, feasible):
    train, vu, tu = set(split.train), set(split.val_unseen), set(split.test_unseen)
    assert train | vu | tu == set(feasible)
    assert not (train & vu) and not (train & tu) and not (vu & tu)
    assert set(split.val_seen) <= train and set(split.test_seen) <= train
    assert len(split.val_seen) == len(vu) > 0 and len(split.test_seen) == len(tu) > 0
    assert {a for a, _ in train} == {a for a, _ in feasible}  # every primitive seen in training
    assert {o for _, o in train} == {o for _, o in feasible}
    assert min(Counter(a for a, _ in train).values()) >= 2
    assert min(Counter(o for _, o in train).values()) >= 2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_natural_split_properties_hold_for_any_seed(seed):
    split = natural_split(W.feasible_pairs, seed)
    _check_natural_split(split, W.feasible_pairs)
    assert natural_split(W.feasible_pairs, seed) == split  # deterministic


def test_default_split_statistics():
    split = SyntheticConfig().pair_split()
    assert (len(split.train), len(split.val_unseen), len(split.test_unseen)) == (118, 27, 36)
    assert natural_split(W.feasible_pairs, 1) != split  # the seed matters
    rows = image_plan(SyntheticConfig())
    per_set = Counter(r["set"] for r in rows)
    assert per_set == {"train": 118 * 30, "val": 54 * 15, "test": 72 * 15}
    per_pair = Counter((r["set"], r["attr"], r["obj"]) for r in rows)
    assert {n for (s, _, _), n in per_pair.items() if s == "train"} == {30}
    assert {n for (s, _, _), n in per_pair.items() if s != "train"} == {15}
    assert 2000 <= per_set["train"] <= 6000  # "a few thousand" training images


def test_split_refuses_impossible_holdout():
    with pytest.raises(ValueError, match="cannot hold out"):
        natural_split(W.feasible_pairs[:20], 0, val_unseen_frac=0.4, test_unseen_frac=0.5)


@pytest.mark.parametrize("kwargs, match", [({"size": "huge"}, "size 'huge' is unknown"),
                                           ({"size": 0}, "at least 1"), ({"image_size": 8}, "image_size")])
def test_config_errors_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_config_sizes_and_hash():
    assert SyntheticConfig(size="small").images_per_pair == (8, 4)
    assert SyntheticConfig(size="12").images_per_pair == (12, 6)
    assert SyntheticConfig().hash() == SyntheticConfig(workers=1).hash()  # workers do not change pixels
    assert SyntheticConfig().hash() != SyntheticConfig(seed=1).hash()
    assert SyntheticConfig().hash() != SyntheticConfig(image_size=32).hash()


# -- rendering ---------------------------------------------------------------------------------


def test_every_feasible_pair_renders_deterministically():
    for i, (a, o) in enumerate(W.feasible_pairs):
        img = render(a, o, 32, np.random.default_rng([5, i]))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert img.std() > 5  # not blank
    a = render("wet", "apple", 48, np.random.default_rng(3))
    assert np.array_equal(a, render("wet", "apple", 48, np.random.default_rng(3)))
    assert not np.array_equal(a, render("wet", "apple", 48, np.random.default_rng(4)))


def test_descriptions_cover_feasible_pairs_and_depend_on_object_family():
    d = descriptions()
    assert set(d) == {f"{a} {o}" for a, o in W.feasible_pairs}
    assert all(len(v) >= 2 and all(isinstance(s, str) and s for s in v) for v in d.values())
    # the same attribute is described differently on different object families (primitive diversity)
    assert describe("wet", "circle")[0].split("circle", 1)[1] != describe("wet", "apple")[0].split("apple", 1)[1]
    with pytest.raises(ValueError, match="infeasible"):
        describe("striped", "apple")


# -- on disk -----------------------------------------------------------------------------------


def test_written_world_is_in_the_standard_format(tiny_root: Path):
    split_dir = tiny_root / "compositional-split-natural"
    for name in ("train", "val", "test"):
        text = (split_dir / f"{name}_pairs.txt").read_text()
        lines = text.splitlines()
        assert text.endswith("\n") and "\r" not in text and len(lines) == len(set(lines))
        assert all(len(line.split(" ")) == 2 for line in lines)
    meta = torch.load(tiny_root / "metadata_compositional-split-natural.t7", weights_only=True)
    assert isinstance(meta, list) and all(set(r) == {"image", "attr", "obj", "set"} for r in meta)
    assert all((tiny_root / "images" / r["image"]).is_file() for r in meta)
    assert all(r["image"].startswith(f"{r['attr']}_{r['obj']}/") for r in meta)
    info = json.loads((tiny_root / "world.json").read_text())
    assert info["config_hash"] == TINY.hash() and info["world"]["attrs"] == W.attrs
    assert np.array(info["world"]["feasibility"]).sum() == 181
    assert json.loads((tiny_root / "descriptions.json").read_text()) == descriptions()


def test_loader_reads_the_world_with_expected_statistics(tiny_root: Path):
    ds = CZSLDataset.from_root(tiny_root, name="synthetic", check_images=True)
    split = TINY.pair_split()
    assert ds.attrs == W.attrs and ds.objs == W.objs
    assert set(ds.train_pairs) == set(split.train)
    assert set(ds.val_pairs) == set(split.val_seen) | set(split.val_unseen)
    assert set(ds.test_pairs) == set(split.test_seen) | set(split.test_unseen)
    feasible = set(W.feasible_pairs)
    assert set(ds.closed_pairs) <= feasible  # every labelled pair is feasible
    for name, n_per_pair in (("train", 2), ("val", 1), ("test", 1)):
        s = ds.split(name)
        counts = Counter(s.labels.tolist())
        assert set(counts.values()) == {n_per_pair}
        assert len(counts) == len(ds.pairs_of(name))
    test = ds.split("test")
    unseen_images = (~test.seen_mask[test.labels]).sum().item()
    assert unseen_images == len(split.test_unseen) and test.seen_mask.sum().item() == len(split.train)
    val = ds.split("val")
    assert not set(ds.pairs_of("val")) - set(ds.train_pairs) & set(ds.pairs_of("test")) - set(ds.train_pairs)
    assert val.candidate_mask.sum().item() == len(split.train) + len(split.val_unseen)
    assert ds.split("test", world="open").pairs == [(a, o) for a in W.attrs for o in W.objs]
    assert ds.descriptions is not None and len(ds.descriptions) == 181


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "images").rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_and_independent_of_workers(tmp_path: Path, tiny_root: Path):
    again = generate(tmp_path / "again", SyntheticConfig(size=2, image_size=32, workers=1))
    assert _tree_digest(again) == _tree_digest(tiny_root)
    assert generate(again, TINY) == again  # an existing world is not rewritten


def _load_in_child(cache: str, queue) -> None:
    import os

    os.environ["CZSL_CACHE"] = cache
    ds = plugin.load(size=1, image_size=16, workers=1)
    queue.put(str(ds.root))


def test_plugin_caches_by_config_and_is_safe_with_concurrent_callers(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    roots = {queue.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    cfg = SyntheticConfig(size=1, image_size=16)
    expected = tmp_path / "synthetic" / cfg.hash()
    assert roots == {str(expected)}
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [cfg.hash()]  # no temp dirs left
    mtime = (expected / "world.json").stat().st_mtime_ns
    ds = plugin.load(size=1, image_size=16)
    assert ds.root == expected and (expected / "world.json").stat().st_mtime_ns == mtime


def test_registered_as_dataset_plugin():
    from czsl_bench.registry import DATASETS

    assert DATASETS.get("synthetic") is plugin


# -- the web corpus ----------------------------------------------------------------------------


def test_web_corpus_excludes_heldout_pairs_and_is_noisy():
    held = heldout_pairs()
    assert len(held) == 27 + 36
    images, captions, pairs = web_corpus(300, seed=1, image_size=32, exclude_pairs=held, workers=1)
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == len(pairs) == 300
    assert not set(pairs) & set(held) and set(pairs) <= set(W.feasible_pairs)
    assert len(set(pairs)) == 181 - 63  # balanced: every allowed pair occurs
    common = [(c, a, o) for c, (a, o) in zip(captions, pairs) if not {a, o} & WEB_RARE_WORDS]
    canonical = sum(a in c.split() and o in c.split() for c, a, o in common)
    assert 0.2 * len(common) < canonical < 0.8 * len(common)  # synonyms and dropped attributes
    # the vocabulary gap: label words in WEB_RARE_WORDS are almost never what the web says
    rare_said = [w in c.split() for c, pair in zip(captions, pairs) for w in pair if w in WEB_RARE_WORDS]
    assert len(rare_said) > 50 and sum(rare_said) < 0.1 * len(rare_said)
    no_attr = sum(not any(s in c for s in ATTRIBUTE_SYNONYMS[a]) for c, (a, _) in zip(captions, pairs))
    assert no_attr > 0
    assert len(set(captions)) > 150


def test_web_corpus_is_seeded():
    a = web_corpus(20, seed=3, image_size=16, workers=1)
    b = web_corpus(20, seed=3, image_size=16, workers=1)
    c = web_corpus(20, seed=4, image_size=16, workers=1)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


def test_web_corpus_rejects_bad_exclusions():
    with pytest.raises(ValueError, match="not feasible"):
        web_corpus(4, seed=0, exclude_pairs=["striped apple"])
    with pytest.raises(ValueError, match="every feasible pair"):
        web_corpus(4, seed=0, exclude_pairs=W.feasible_pairs)


def test_generate_refuses_a_foreign_non_empty_root(tmp_path: Path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a world")
    with pytest.raises(ValueError, match="holds no synthetic world"):
        generate(tmp_path / "other", SyntheticConfig(size=1, image_size=16))
    (tmp_path / "empty").mkdir()
    assert (generate(tmp_path / "empty", SyntheticConfig(size=1, image_size=16, workers=1)) / "world.json").is_file()
    assert plugin.is_available() is True


def test_environment_overrides_pick_the_size(monkeypatch):
    from czsl_bench.datasets.synthetic import config_from_env

    monkeypatch.setenv("CZSL_SYNTHETIC_SIZE", "small")
    monkeypatch.setenv("CZSL_SYNTHETIC_IMAGE_SIZE", "32")
    assert config_from_env() == SyntheticConfig(size="small", image_size=32)
    assert plugin.resolve_root().name == SyntheticConfig(size="small", image_size=32).hash()
    monkeypatch.setenv("CZSL_SYNTHETIC_SEED", "x")
    with pytest.raises(ValueError, match="CZSL_SYNTHETIC_SEED"):
        config_from_env()
