"""The dataset-plugin object behind the ``czsl_bench.datasets`` entry points.

A plugin is a thin description of one dataset in the standard format: its name, where its data
lives (root resolution), the statistics it must reproduce, where its files come from and how to
reorganise them. Loading, checking and preparing are shared (``czsl_format``, ``check``,
``prepare``). Importing this module is cheap: torch loads only when data is touched.

Root resolution, first match wins: an explicit ``root`` argument (``--data-root`` / ``--root``),
then ``$CZSL_DATA/<name>``, then the default ``$XDG_CACHE_HOME/czsl-bench/data/<name>``
(``~/.cache/czsl-bench/data/<name>`` when ``XDG_CACHE_HOME`` is unset).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class StandardDataset:
    """A dataset in the ``compositional-split-natural`` format (subclass per dataset)."""

    name: str
    title: str
    citation: str
    homepage: str
    stats: dict[str, Stat]
    sources: tuple[Source, ...] = ()
    manual_steps: tuple[str, ...] = ()  # how to obtain the data by hand, one short step each
    canonical_note: str = ""  # caveat shown when the user's split files differ from the shipped ones
    size_note: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)

    # -- where the data lives -----------------------------------------------------------------
    def default_root(self) -> Path:
        """The documented default: ``~/.cache/czsl-bench/data/<name>`` (XDG_CACHE_HOME respected)."""
        return default_data_home() / self.name

    def resolve_root(self, root: str | os.PathLike | None = None) -> Path:
        """Explicit ``root`` > ``$CZSL_DATA/<name>`` > :meth:`default_root`."""
        if root is not None and str(root) != "":
            return Path(root).expanduser()
        env = os.environ.get(ENV_DATA_ROOT)
        if env:
            return Path(env).expanduser() / self.name
        return self.default_root()

    def canonical_root(self) -> Path:
        """Folder of the split files shipped with the package (``datasets/canonical/<name>``)."""
        return CANONICAL_DIR / self.name

    def fix_hint(self, root: Path) -> str:
        """How to obtain the data, appended to every error about missing or broken files."""
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
                                          strict=strict, fail_fast=True)
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

        report, _ = inspect_dataset(self, self.resolve_root(root), images=images, strict=strict)
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
            "manual_steps": list(self.manual_steps), "size": self.size_note, **self.extra_info,
        }

    def __repr__(self) -> str:
        return f"<dataset plugin {self.name!r} ({self.title})>"


def pair_stats(attrs: int, objs: int, train: int, val_seen: int, val_unseen: int, test_seen: int,
               test_unseen: int, images: tuple[int, int, int], image_provenance: str = "verified") -> dict[str, Stat]:
    """The spec-datasets §4 table for one dataset; derived counts are computed, not retyped."""
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
