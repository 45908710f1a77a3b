"""Generate the synthetic CZSL world on disk in the standard format, and the web corpus.

Layout written (docs/datasets.md, the same the MIT-States loader reads)::

    <root>/images/<attr>_<obj>/<set>_<index>.png
    <root>/compositional-split-natural/{train,val,test}_pairs.txt
    <root>/metadata_compositional-split-natural.t7   # list of {image, attr, obj, set} dicts
    <root>/descriptions.json                          # {"attr obj": [sentences]}
    <root>/checksums.sha256                           # sha256 of every file above (sha256sum -c)
    <root>/world.json                                 # config, seed, families, feasibility, counts

Every image is a pure function of (generator version, seed, split, index), so the output does not
depend on the number of worker processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .render import render
from .splits import PairSplit, natural_split
from .store import (CHECKSUMS_FILE, OWNER_FILE, WORLD_FILE, clean_stale_partials, discard_world, doc_checksum, verify_world,
                    write_checksums, write_owner)
from .text import descriptions, noisy_caption
from .world import DEFAULT_WORLD, GENERATOR_VERSION, World

log = logging.getLogger(__name__)

SPLIT_DIR = "compositional-split-natural"
METADATA = "metadata_compositional-split-natural.t7"
_STREAM = {"train": 1, "val": 2, "test": 3, "web": 4}

# name -> (training images per seen pair, images per pair in val and test)
SIZES: dict[str, tuple[int, int]] = {"small": (8, 4), "default": (30, 15), "large": (100, 40)}


@dataclass(frozen=True)
class SyntheticConfig:
    """What determines the generated world (everything here enters the cache key).

    ``size`` is a preset name (``small``, ``default``, ``large``) or a number of training
    images per seen pair (val/test then get half as many per pair, at least 1).
    """

    seed: int = 0
    size: str | int = "default"
    image_size: int = 64
    val_unseen_frac: float = 0.15
    test_unseen_frac: float = 0.20
    workers: int | None = field(default=None, compare=False)  # not part of the world

    def __post_init__(self):
        if isinstance(self.size, str) and self.size.isdigit():
            object.__setattr__(self, "size", int(self.size))
        if isinstance(self.size, str) and self.size not in SIZES:
            raise ValueError(f"synthetic size {self.size!r} is unknown; use one of {sorted(SIZES)} "
                             "or a number of training images per pair")
        if isinstance(self.size, int) and self.size < 1:
            raise ValueError(f"synthetic size must be at least 1 image per pair, got {self.size}")
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"synthetic image_size must be in [16, 512], got {self.image_size}")

    @property
    def images_per_pair(self) -> tuple[int, int]:
        """(training images per seen pair, val/test images per pair)."""
        if isinstance(self.size, int):
            return self.size, max(1, self.size // 2)
        return SIZES[self.size]

    def key(self) -> dict:
        train_n, eval_n = self.images_per_pair
        return {"generator_version": GENERATOR_VERSION, "seed": self.seed, "image_size": self.image_size,
                "train_per_pair": train_n, "eval_per_pair": eval_n,
                "val_unseen_frac": self.val_unseen_frac, "test_unseen_frac": self.test_unseen_frac}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:12]

    def pair_split(self, world: World = DEFAULT_WORLD) -> PairSplit:
        return natural_split(world.feasible_pairs, self.seed, self.val_unseen_frac, self.test_unseen_frac)


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[stream], index])


def _render_to_file(job: tuple) -> str:
    """Render one image to its PNG file; returns the file's sha256 (for checksums.sha256)."""
    attr, obj, image_size, seed, stream, index, path = job
    img = render(attr, obj, image_size, _rng(seed, stream, index))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _render_array(job: tuple) -> np.ndarray:
    attr, obj, image_size, seed, index = job
    return render(attr, obj, image_size, _rng(seed, "web", index))


def _workers(n: int | None) -> int:
    return max(1, n if n is not None else min(2, os.cpu_count() or 1))


def _map(fn, jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) < 64:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, jobs, chunksize=max(16, len(jobs) // (8 * workers))))


def image_plan(config: SyntheticConfig, world: World = DEFAULT_WORLD) -> list[dict]:
    """The metadata rows (one per image) the config generates, in file order."""
    split = config.pair_split(world)
    train_n, eval_n = config.images_per_pair
    rows: list[dict] = []
    for set_name, pairs, n in (("train", split.train, train_n), ("val", split.val, eval_n),
                               ("test", split.test, eval_n)):
        for a, o in pairs:
            for _ in range(n):
                i = len(rows)
                rows.append({"image": f"{a}_{o}/{set_name}_{i:06d}.png", "attr": a, "obj": o,
                             "set": set_name, "index": i})
    return rows


def generate(root: str | os.PathLike, config: SyntheticConfig = SyntheticConfig(),
             world: World = DEFAULT_WORLD) -> Path:
    """Write the world to ``root`` atomically (temp dir, then rename) and return ``root``.

    If ``root`` already holds a complete world (a ``world.json``), nothing is written: a
    concurrent caller that lost the race discards its own copy. Partial folders of generations
    that were killed are removed first (see ``store.clean_stale_partials``).
    """
    import torch  # heavy; only needed to write the .t7 metadata

    root = Path(root)
    if (root / WORLD_FILE).is_file():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists but holds no synthetic world (no world.json); pass a new or empty "
                         "directory, or delete this one")
    root.parent.mkdir(parents=True, exist_ok=True)
    # in the synthetic cache every partial folder is ours; elsewhere only those with our owner record
    for folder, size in clean_stale_partials(root.parent, require_owner=root.parent != default_cache_dir()):
        log.info("removed %s (%.1f MiB), left by a synthetic world generation that was killed", folder, size / 2**20)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write_owner(tmp)
        split = config.pair_split(world)
        rows = image_plan(config, world)
        for a, o in {(r["attr"], r["obj"]) for r in rows}:
            (tmp / "images" / f"{a}_{o}").mkdir(parents=True, exist_ok=True)
        jobs = [(r["attr"], r["obj"], config.image_size, config.seed, r["set"], r["index"],
                 str(tmp / "images" / r["image"])) for r in rows]
        digests = {f"images/{r['image']}": d for r, d in zip(rows, _map(_render_to_file, jobs, _workers(config.workers)))}

        (tmp / SPLIT_DIR).mkdir()
        for name, pairs in (("train", split.train), ("val", split.val), ("test", split.test)):
            (tmp / SPLIT_DIR / f"{name}_pairs.txt").write_text("".join(f"{a} {o}\n" for a, o in pairs))
        metadata = [{"image": r["image"], "attr": r["attr"], "obj": r["obj"], "set": r["set"]} for r in rows]
        torch.save(metadata, tmp / METADATA)
        (tmp / "descriptions.json").write_text(json.dumps(descriptions(world), indent=1))
        for rel in [f"{SPLIT_DIR}/{s}_pairs.txt" for s in ("train", "val", "test")] + [METADATA, "descriptions.json"]:
            digests[rel] = _sha256(tmp / rel)
        info = world_info(config, world, split, rows)
        info["checksums"] = {"file": CHECKSUMS_FILE, "sha256": write_checksums(tmp, digests)}
        info["checksum"] = doc_checksum(info)
        (tmp / OWNER_FILE).unlink()
        (tmp / WORLD_FILE).write_text(json.dumps(info, indent=1))  # last: marks completeness
        try:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # an empty folder the caller made for us
            os.rename(tmp, root)
        except OSError:
            if not (root / "world.json").is_file():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def world_info(config: SyntheticConfig, world: World, split: PairSplit, rows: list[dict]) -> dict:
    """The ``world.json`` document: config, vocabulary, feasibility, split statistics."""
    counts = {s: sum(r["set"] == s for r in rows) for s in ("train", "val", "test")}
    fmt = lambda ps: [f"{a} {o}" for a, o in ps]  # noqa: E731
    return {
        "name": "synthetic",
        "generator_version": GENERATOR_VERSION,
        "config": {k: v for k, v in asdict(config).items() if k != "workers"},
        "config_key": config.key(),
        "config_hash": config.hash(),
        "world": world.to_json(),
        "pairs": {"train": fmt(split.train), "val_seen": fmt(split.val_seen),
                  "val_unseen": fmt(split.val_unseen), "test_seen": fmt(split.test_seen),
                  "test_unseen": fmt(split.test_unseen)},
        "images": counts,
        "images_per_pair": dict(zip(("train", "eval"), config.images_per_pair)),
    }


def default_cache_dir() -> Path:
    """``$CZSL_CACHE/synthetic`` or ``~/.cache/czsl-bench/synthetic``."""
    base = os.environ.get("CZSL_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "czsl-bench") / "synthetic"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def ensure_world(root: str | os.PathLike | None = None, config: SyntheticConfig = SyntheticConfig(),
                 world: World = DEFAULT_WORLD, verify: bool = True) -> Path:
    """Return a directory holding the world for ``config``, generating it on first use.

    ``verify`` checks every file of an existing world against its checksums (about 0.3 s for
    the default world). A damaged world in the cache (``root=None``) is reported, deleted and
    generated again; at an explicit ``root`` it raises a one-line ``DatasetError`` instead, since
    that folder is the user's. A world without checksums (an older czsl-bench) is regenerated in
    the cache and read as it is, with a warning, at an explicit root.
    """
    cached = root is None
    root = Path(root) if root is not None else default_cache_dir() / config.hash()
    if verify and (root / WORLD_FILE).is_file():
        check = verify_world(root, current_version=GENERATOR_VERSION)
        if not check.ok:
            if cached:
                log.warning("synthetic world %s is damaged or stale (%s); deleting it and generating it again",
                            root, check.summary())
                discard_world(root)
            elif check.problems:
                from ..czsl_format import DatasetError

                raise DatasetError(
                    f"synthetic: the world at {root} is damaged ({len(check.problems):,} file(s): {check.summary()}); "
                    f"run `czsl-bench data check synthetic --root {root}` for the full report, or delete the "
                    "folder to generate it again")
            else:
                log.warning("synthetic world %s: %s; delete the folder to generate it again", root, check.summary())
    return generate(root, config, world)


def web_corpus(n_images: int, seed: int, image_size: int = 64, exclude_pairs=(),
               world: World = DEFAULT_WORLD, workers: int | None = None
               ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Image-caption pairs from the same world, for pretraining the embedded backbone.

    Compositions cycle through the feasible pairs not in ``exclude_pairs`` in a seeded random
    order, so the corpus is balanced. Captions are noisy (``text.noisy_caption``).
    Returns ``(images uint8 [N, H, W, 3], captions, pairs)``.
    """
    exclude = {tuple(p.split()) if isinstance(p, str) else tuple(p) for p in exclude_pairs}
    unknown = exclude - set(world.feasible_pairs)
    if unknown:
        raise ValueError(f"exclude_pairs has pairs that are not feasible in the world: {sorted(unknown)[:3]}")
    allowed = [p for p in world.feasible_pairs if p not in exclude]
    if not allowed:
        raise ValueError("exclude_pairs removes every feasible pair; nothing left for the web corpus")
    rng = np.random.default_rng([seed, _STREAM["web"]])
    order = np.concatenate([rng.permutation(len(allowed)) for _ in range(-(-n_images // len(allowed)))])
    pairs = [allowed[i] for i in order[:n_images]]
    captions = [noisy_caption(a, o, rng) for a, o in pairs]
    jobs = [(a, o, image_size, seed, i) for i, (a, o) in enumerate(pairs)]
    images = _map(_render_array, jobs, _workers(workers))
    arr = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return arr, captions, pairs
