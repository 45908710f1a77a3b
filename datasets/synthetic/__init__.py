"""The embedded synthetic CZSL world: the default dataset on a machine with no real data.

15 attributes in three families (colour, pattern, state) x 14 objects in four families, 181
feasible compositions, rendered procedurally (numpy + PIL) and written in the standard
``compositional-split-natural`` format, so the same loader reads it as MIT-States. See
``docs/synthetic-world.md``.

    from czsl_bench.datasets.synthetic import plugin, SyntheticConfig, web_corpus
    ds = plugin.load()                                   # generated and cached on first use
    ds = plugin.load(config=SyntheticConfig(size="small", image_size=32))
    images, captions, pairs = web_corpus(1000, seed=1, exclude_pairs=heldout_pairs())
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..plugin import DatasetPlugin
from .generate import (SIZES, SyntheticConfig, default_cache_dir, ensure_world, generate, image_plan,
                       web_corpus)
from .splits import PairSplit, natural_split
from .text import describe, descriptions, noisy_caption
from .world import DEFAULT_WORLD, GENERATOR_VERSION, WEB_CORPUS_VERSION, WEB_RARE_WORDS, World

if TYPE_CHECKING:
    from ..check import CheckReport
    from ..czsl_format import CZSLDataset
    from ..prepare import PrepareReport

__all__ = [
    "DEFAULT_WORLD", "ENV_OVERRIDES", "GENERATOR_VERSION", "WEB_CORPUS_VERSION", "WEB_RARE_WORDS", "SIZES", "PairSplit", "SyntheticConfig", "SyntheticPlugin", "World",
    "config_from_env", "default_cache_dir", "describe", "descriptions", "ensure_world", "generate", "heldout_pairs", "image_plan",
    "load", "natural_split", "noisy_caption", "plugin", "web_corpus",
]


# Environment overrides, so `czsl-bench run ... --dataset synthetic` can pick a size without a flag:
# CZSL_SYNTHETIC_SIZE=small|default|large|<n>, CZSL_SYNTHETIC_IMAGE_SIZE=<px>, CZSL_SYNTHETIC_SEED=<int>.
ENV_OVERRIDES = {"CZSL_SYNTHETIC_SIZE": "size", "CZSL_SYNTHETIC_IMAGE_SIZE": "image_size",
                 "CZSL_SYNTHETIC_SEED": "seed"}


def config_from_env() -> SyntheticConfig:
    """The default :class:`SyntheticConfig` with the ``CZSL_SYNTHETIC_*`` environment overrides."""
    values: dict[str, Any] = {}
    for var, name in ENV_OVERRIDES.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        if name != "size" and not raw.isdigit():
            raise ValueError(f"{var}={raw!r} is not a non-negative integer; unset it or give a number")
        values[name] = raw if name == "size" else int(raw)
    return SyntheticConfig(**values)


def heldout_pairs(config: SyntheticConfig = SyntheticConfig(), world: World = DEFAULT_WORLD) -> list[tuple[str, str]]:
    """The unseen validation and test pairs of ``config``'s split: what the web corpus leaves
    out so that zero-shot recognition of them is a real test of composition."""
    split = config.pair_split(world)
    return sorted(split.val_unseen + split.test_unseen)


class SyntheticPlugin(DatasetPlugin):
    """The ``synthetic`` dataset plugin (entry point ``czsl_bench.datasets: synthetic``)."""

    name = "synthetic"
    title = "Synthetic CZSL world (procedurally rendered, embedded)"
    default_backbone = ("czsl-tiny-vit", "synthetic")  # the tiny CLIP pretrained on the world's web split
    cpu_sized = True
    recipe = "synthetic"
    # never the world's true feasibility, which would leak the answer
    feasibility = "backbone-token-embeddings"

    def config(self, **overrides: Any) -> SyntheticConfig:
        """A :class:`SyntheticConfig` with ``overrides`` (e.g. ``size="small"``, ``image_size=32``)."""
        return replace(SyntheticConfig(), **overrides)

    def resolve_root(self, root: str | os.PathLike | None = None,
                     config: SyntheticConfig | None = None) -> Path:
        """Explicit ``root`` > ``$CZSL_CACHE/synthetic/<config-hash>`` > ``~/.cache/czsl-bench/...``."""
        config = config or config_from_env()
        return Path(root).expanduser() if root else default_cache_dir() / config.hash()

    def load(self, root: str | os.PathLike | None = None, config: SyntheticConfig | None = None,
             **overrides: Any) -> CZSLDataset:
        """Generate the world on first use (atomically, safe with concurrent callers) and load it.

        An explicit ``root`` that already holds a world is read as it is; otherwise the world
        for ``config`` (default: seed 0, size ``default``, 64 px, or the ``CZSL_SYNTHETIC_*``
        environment overrides) is generated there.
        """
        from ..czsl_format import CZSLDataset

        config = replace(config or config_from_env(), **overrides)
        # root=None tells ensure_world the folder is the cache's, so a damaged world is regenerated
        root = ensure_world(Path(root).expanduser() if root else None, config)
        return CZSLDataset.from_root(root, name=self.name)

    def is_available(self, root: str | os.PathLike | None = None) -> bool:
        """Always true: the world is generated on first use (about 15 s on 2 cores)."""
        return True

    def fix_hint(self, root: str | os.PathLike | None = None) -> str:
        return ("the synthetic world is generated on first use; pass a new or empty --root, or one that "
                "already holds a world (it has a world.json)")

    def check(self, root: str | os.PathLike | None = None, images: str = "header", strict: bool = True,
              config: SyntheticConfig | None = None) -> CheckReport:
        """``data check`` of the generated world: files against its checksums, counts against its
        world.json, generator version, plus every check a real dataset gets; never raises for bad data."""
        from .check import check_world

        return check_world(self.name, self.resolve_root(root, config), images=images, strict=strict)

    def prepare(self, root: str | os.PathLike | None = None, config: SyntheticConfig | None = None,
                strict: bool = True, log: Callable[[str], None] = print, urls: dict | None = None,
                sha256: dict | None = None, **_: Any) -> PrepareReport:
        """Generate the world now (``data prepare synthetic``); a damaged cached world is regenerated."""
        from ..prepare import PrepareReport

        if urls or sha256:
            raise ValueError("the synthetic world is generated, not downloaded: --url and --sha256 do not apply")
        config = config or config_from_env()
        target = ensure_world(Path(root).expanduser() if root else None, config)
        log(f"synthetic: world {config.hash()} ready at {target}")
        report = PrepareReport(self.name, target)
        report.check = self.check(target, images="exists", strict=strict)
        return report

    def world_info(self, root: str | os.PathLike) -> dict:
        """The ``world.json`` of a generated world (config, feasibility, split pairs, counts), verified."""
        from ..czsl_format import DatasetError
        from .store import read_world_json

        info, problem = read_world_json(Path(root))
        if info is None:
            raise DatasetError(f"synthetic: {Path(root) / 'world.json'} is {problem}; run `czsl-bench data check "
                               f"synthetic --root {root}`, or delete the folder to generate the world again")
        return info

    def info(self) -> dict[str, Any]:
        """Name, vocabulary sizes and default cache location (JSON-friendly)."""
        cfg = SyntheticConfig()
        return {"name": self.name, "title": self.title, "generator_version": GENERATOR_VERSION,
                "attrs": len(DEFAULT_WORLD.attrs), "objs": len(DEFAULT_WORLD.objs),
                "feasible_pairs": len(DEFAULT_WORLD.feasible_pairs), "sizes": dict(SIZES),
                "default_root": str(self.resolve_root(None, cfg)), "docs": "docs/synthetic-world.md",
                **self.declarations()}



plugin = SyntheticPlugin()


def load(root: str | os.PathLike | None = None, config: SyntheticConfig | None = None, **overrides: Any):
    """Module-level shortcut for :meth:`SyntheticPlugin.load`."""
    return plugin.load(root, config, **overrides)
