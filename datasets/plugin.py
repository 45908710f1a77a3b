"""The dataset-plugin contract behind the ``czsl_bench.datasets`` entry points.

Every dataset plugin is a :class:`DatasetPlugin`. It declares what the harness needs to run a
method on it without knowing its name: the default backbone, whether it is CPU-sized, the
source of its open-world feasibility, the recipe family whose method defaults it takes and how
its primitive names become words; and it implements ``load`` / ``check`` / ``info`` /
``is_available``. :class:`StandardDataset` implements all of that for a dataset in the
standard ``compositional-split-natural`` format (the three real datasets, and any folder passed
as ``--dataset /path/to/root``), so a third-party plugin in that format is a few lines.
Importing this module is cheap: torch loads only when data is touched.

Root resolution, first match wins: an explicit ``root`` argument (``--data-root`` / ``--root``),
then ``$CZSL_DATA/<name>``, then the default ``$XDG_CACHE_HOME/czsl-bench/data/<name>``
(``~/.cache/czsl-bench/data/<name>`` when ``XDG_CACHE_HOME`` is unset).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .check import CheckReport
    from .czsl_format import CZSLDataset
    from .prepare import PrepareReport

ENV_DATA_ROOT = "CZSL_DATA"
CANONICAL_DIR = Path(__file__).resolve().parent / "canonical"
DOCS_HINT = "docs/datasets.md"


def default_data_home() -> Path:
    """``$XDG_CACHE_HOME/czsl-bench/data`` (``~/.cache/czsl-bench/data`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "czsl-bench" / "data"


# The recipe families whose per-dataset defaults methods declare (``Config.defaults(recipe)``):
# the three real benchmarks' published recipes and the CPU-sized one of the embedded world.
RECIPES = ("mit-states", "ut-zappos", "cgqa", "synthetic")
# Open-world feasibility: the GloVe vectors the papers used (shipped, hash-pinned) or the CompCos
# formula over the backbone's token embeddings (any other dataset; docs/evaluation.md).
FEASIBILITY_SOURCES = ("glove-reference", "backbone-token-embeddings")
DEFAULT_BACKBONE = ("ViT-L-14-quickgelu", "openai")


class DatasetPlugin:
    """The contract of a dataset plugin (subclass it; docs/datasets.md, "Adding a dataset").

    Class attributes, all overridable per instance:

    * ``name``, ``title``
    * ``default_backbone``: ``(open_clip arch, pretrained tag or None)`` a run uses without ``--backbone``
    * ``cpu_sized``: the whole benchmark runs on a laptop CPU in minutes
    * ``feasibility``: one of :data:`FEASIBILITY_SOURCES`
    * ``recipe``: one of :data:`RECIPES`, the family of method defaults the dataset takes
    * ``name_policy``: how names become prompt words (:mod:`czsl_bench.names`)
    """

    name: str = ""
    title: str = ""
    default_backbone: tuple[str, str | None] = DEFAULT_BACKBONE
    cpu_sized: bool = False
    feasibility: str = "backbone-token-embeddings"
    recipe: str = "mit-states"
    name_policy: str = "dots"

    def load(self, root: str | os.PathLike | None = None) -> CZSLDataset:
        raise NotImplementedError(f"dataset plugin {self.name!r} does not implement load(root)")

    def resolve_root(self, root: str | os.PathLike | None = None) -> Path:
        """Explicit ``root`` > ``$CZSL_DATA/<name>`` > ``~/.cache/czsl-bench/data/<name>``."""
        if root is not None and str(root) != "":
            return Path(root).expanduser()
        env = os.environ.get(ENV_DATA_ROOT)
        if env:
            return Path(env).expanduser() / self.name
        return default_data_home() / self.name

    def is_available(self, root: str | os.PathLike | None = None) -> bool:
        """Whether the data is on disk (cheap: no file is read)."""
        path = self.resolve_root(root)
        return path.is_dir() and any(path.iterdir())

    def fix_hint(self, root: str | os.PathLike | None = None) -> str:
        return f"put the dataset in the standard layout at {self.resolve_root(root)} (see {DOCS_HINT})"

    canonical_note: str = ""
    # published counts a copy must reproduce (none by default; `data check` compares them)
    stats: Mapping[str, Any] = MappingProxyType({})

    def canonical_root(self) -> Path:
        """Folder of the split files shipped for this dataset (none by default: its own root)."""
        return self.resolve_root()

    def check(self, root: str | os.PathLike | None = None, images: str = "header",
              strict: bool = True) -> CheckReport:
        """A ``data check`` report. The default checks the standard layout without published counts."""
        from .check import inspect_dataset

        report, _ = inspect_dataset(self, self.resolve_root(root), images=images, strict=False)
        return report

    def declarations(self) -> dict[str, Any]:
        """The contract's declared fields (``data info`` and ``list`` show them)."""
        arch, tag = self.default_backbone
        return {"default_backbone": {"arch": arch, "pretrained": tag}, "cpu_sized": self.cpu_sized,
                "feasibility": self.feasibility, "recipe": self.recipe, "name_policy": self.name_policy}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "root": str(self.resolve_root()), **self.declarations()}

    def __repr__(self) -> str:
        return f"<dataset plugin {self.name!r} ({self.title})>"


def validate_plugin(plugin: Any, name: str) -> DatasetPlugin:
    """The plugin registered as ``name``, checked against the contract (one line if it is off)."""
    if not isinstance(plugin, DatasetPlugin):
        raise TypeError(f"dataset plugin {name!r} is a {type(plugin).__name__}; it must be an instance of "
                        "czsl_bench.datasets.plugin.DatasetPlugin (docs/datasets.md, 'Adding a dataset')")
    if plugin.recipe not in RECIPES:
        raise ValueError(f"dataset plugin {name!r} declares recipe {plugin.recipe!r}; use one of {', '.join(RECIPES)}")
    if plugin.feasibility not in FEASIBILITY_SOURCES:
        raise ValueError(f"dataset plugin {name!r} declares feasibility {plugin.feasibility!r}; use one of "
                         f"{', '.join(FEASIBILITY_SOURCES)}")
    from czsl_bench.names import NAME_POLICIES

    if plugin.name_policy not in NAME_POLICIES:
        raise ValueError(f"dataset plugin {name!r} declares name_policy {plugin.name_policy!r}; use one of "
                         f"{', '.join(NAME_POLICIES)}")
    arch_tag = plugin.default_backbone
    if not (isinstance(arch_tag, tuple) and len(arch_tag) == 2 and isinstance(arch_tag[0], str)):
        raise ValueError(f"dataset plugin {name!r}: default_backbone must be (arch, tag or None), got {arch_tag!r}")
    return plugin


@dataclass(frozen=True)
class Source:
    """One downloadable file: mirrors in order of preference, and its checksum when known."""

    key: str  # short name used in messages and in `data prepare --url KEY=URL`
    urls: tuple[str, ...]
    filename: str
    sha256: str | None = None  # None: no published checksum (recorded after the first download)
    size: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Stat:
    """A count the loaded dataset must reproduce, with where the number comes from."""

    value: int
    provenance: str = "verified"  # "verified" (recounted from the files) or "published" (paper tables)


@dataclass(repr=False)
class StandardDataset(DatasetPlugin):
    """A dataset in the ``compositional-split-natural`` format (subclass per dataset)."""

    name: str
    title: str
    citation: str = ""
    homepage: str = ""
    stats: dict[str, Stat] = field(default_factory=dict)  # empty: no published counts to reproduce
    default_backbone: tuple[str, str | None] = DEFAULT_BACKBONE
    cpu_sized: bool = False
    feasibility: str = "backbone-token-embeddings"
    recipe: str = "mit-states"
    name_policy: str = "dots"
    sources: tuple[Source, ...] = ()
    manual_steps: tuple[str, ...] = ()  # how to obtain the data by hand, one short step each
    canonical_note: str = ""  # caveat shown when the user's split files differ from the shipped ones
    size_note: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)

    # -- where the data lives -----------------------------------------------------------------
    def default_root(self) -> Path:
        """The documented default: ``~/.cache/czsl-bench/data/<name>`` (XDG_CACHE_HOME respected)."""
        return default_data_home() / self.name

    def canonical_root(self) -> Path:
        """Folder of the split files shipped with the package (``datasets/canonical/<name>``)."""
        return CANONICAL_DIR / self.name

    def fix_hint(self, root: str | os.PathLike | None = None) -> str:
        """How to obtain the data, appended to every error about missing or broken files."""
        root = self.resolve_root(root)
        if not self.sources and not self.manual_steps:
            return f"put the dataset in the standard layout at {root} (see {DOCS_HINT})"
        steps = "; ".join(self.manual_steps)
        return (f"to fix: run `czsl-bench data prepare {self.name} --root {root}` (downloads and "
                f"reorganises the data, needs network) or by hand: {steps} (see {DOCS_HINT})")

    # -- the three operations -----------------------------------------------------------------
    def load(self, root: str | os.PathLike | None = None, strict: bool = True,
             check_images: bool = True) -> CZSLDataset:
        """Load the dataset; a broken copy raises the first ``data check`` error as one line.

        ``strict`` requires the published counts (attributes, objects, pairs, candidates, images):
        results on a non-standard copy are not comparable with published numbers.
        ``check_images`` verifies that every split image exists before returning.
        """
        from .check import inspect_dataset
        from .czsl_format import DatasetError

        report, dataset = inspect_dataset(self, self.resolve_root(root), images="exists" if check_images else "none",
                                          strict=strict and bool(self.stats), fail_fast=True)
        errors = report.errors()
        if errors:
            raise DatasetError(errors[0].line())
        for finding in report.warnings():
            warnings.warn(finding.line(), stacklevel=2)
        assert dataset is not None
        return dataset

    def check(self, root: str | os.PathLike | None = None, images: str = "header",
              strict: bool = True) -> CheckReport:
        """Full report on a copy (see ``czsl-bench data check``); never raises for bad data."""
        from .check import inspect_dataset

        report, _ = inspect_dataset(self, self.resolve_root(root), images=images,
                                    strict=strict and bool(self.stats))
        return report

    def prepare(self, root: str | os.PathLike | None = None, fetch: Callable[[str, Path], None] | None = None,
                urls: dict[str, str] | None = None, sha256: dict[str, str] | None = None,
                keep_archives: bool = True, splits_from: str = "package", strict: bool = True,
                log: Callable[[str], None] = print) -> PrepareReport:
        """Download (``fetch`` injectable), verify and reorganise the data into the standard layout."""
        from .prepare import prepare_dataset

        return prepare_dataset(self, self.resolve_root(root), fetch=fetch, urls=urls, sha256=sha256,
                               keep_archives=keep_archives, splits_from=splits_from, strict=strict, log=log)

    def prepare_layout(self, root: Path, archives: dict[str, Path], log: Callable[[str], None]) -> None:
        """Dataset-specific reorganisation after downloading (overridden per dataset)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Name, citation, sources, default root and published statistics (JSON-friendly)."""
        return {
            "name": self.name, "title": self.title, "citation": self.citation, "homepage": self.homepage,
            "default_root": str(self.default_root()), "root": str(self.resolve_root()),
            "stats": {k: {"value": s.value, "provenance": s.provenance} for k, s in self.stats.items()},
            "sources": [{"key": s.key, "urls": list(s.urls), "sha256": s.sha256, "size": s.size,
                         "note": s.note} for s in self.sources],
            "manual_steps": list(self.manual_steps), "size": self.size_note, **self.declarations(),
            **self.extra_info,
        }


def pair_stats(attrs: int, objs: int, train: int, val_seen: int, val_unseen: int, test_seen: int,
               test_unseen: int, images: tuple[int, int, int], image_provenance: str = "verified") -> dict[str, Stat]:
    """The docs/datasets.md table for one dataset; derived counts are computed, not retyped."""
    stats = {
        "attrs": Stat(attrs), "objs": Stat(objs), "train_pairs": Stat(train),
        "val_seen_pairs": Stat(val_seen), "val_unseen_pairs": Stat(val_unseen),
        "test_seen_pairs": Stat(test_seen), "test_unseen_pairs": Stat(test_unseen),
        # unseen(val) ∩ unseen(test) = ∅ on all three datasets (verified), so the union adds up
        "closed_pairs": Stat(train + val_unseen + test_unseen),
        "val_candidates": Stat(train + val_unseen), "test_candidates": Stat(train + test_unseen),
        "open_pairs": Stat(attrs * objs),
    }
    for split, n in zip(("train", "val", "test"), images):
        stats[f"{split}_images"] = Stat(n, image_provenance)
    return stats


def folder_dataset(root: str | os.PathLike) -> StandardDataset:
    """A plugin for a folder in the standard layout (``run --dataset /path/to/root``).

    Its name is the folder's name; it has no published counts, takes the MIT-States recipe and
    the default real-data backbone, and computes feasibility from the backbone's token embeddings.
    """
    import re

    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"--dataset {root}: no such folder; give a dataset name "
                                f"(`czsl-bench list`) or a folder in the standard layout ({DOCS_HINT})")
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", path.name).lstrip(".-") or "dataset"
    return _FolderDataset(name=name, title=f"folder {path}", homepage=str(path), root=path)


@dataclass(repr=False)
class _FolderDataset(StandardDataset):
    root: Path | None = None

    def resolve_root(self, root: str | os.PathLike | None = None) -> Path:
        return Path(root).expanduser() if root else Path(self.root)

    def default_root(self) -> Path:
        return Path(self.root)

    def canonical_root(self) -> Path:
        return Path(self.root)
