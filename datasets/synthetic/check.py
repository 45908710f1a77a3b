"""``czsl-bench data check synthetic``: the generated world is checked like a real dataset.

The world lives on disk like any dataset and can be damaged like one, so it gets the same
inspection (pair files, metadata, paths, images, counts; ``datasets/check.py``), with two
differences: the expected counts come from the world's own ``world.json``, and every file is
compared with the ``checksums.sha256`` written with it (instead of the canonical split files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..check import SHOW, CheckReport, Finding, inspect_dataset
from ..plugin import Stat
from .store import CHECKSUMS_FILE, WORLD_FILE, WorldCheck, verify_world
from .world import GENERATOR_VERSION

PROVENANCE = "world"  # the count source column: world.json


@dataclass
class GeneratedWorld:
    """What ``inspect_dataset`` needs to know about a generated world (as a plugin would say it)."""

    name: str
    root: Path
    stats: dict[str, Stat] = field(default_factory=dict)
    canonical_note: str = ""

    def canonical_root(self) -> Path:
        return self.root / ".no-canonical-copies"  # a world has none; its checksums are its own

    def fix_hint(self, root: Path) -> str:
        return (f"to fix: delete {root}; the next load generates the world again (`czsl-bench data prepare "
                f"{self.name} --root {root}` does it now)")


def expected_stats(info: dict) -> dict[str, Stat]:
    """The counts a loader must find, computed from world.json by the loader's own rules."""
    from ..czsl_format import CZSLDataset

    pairs = {k: [tuple(p.split()) for p in v] for k, v in info["pairs"].items()}
    ds = CZSLDataset("synthetic", Path("."), pairs["train"], pairs["val_seen"] + pairs["val_unseen"],
                     pairs["test_seen"] + pairs["test_unseen"], {})
    stats = {k: Stat(v, PROVENANCE) for k, v in ds.stats().items() if not k.endswith("_images")}
    for split in ("train", "val", "test"):
        stats[f"{split}_images"] = Stat(int(info["images"][split]), PROVENANCE)
    return stats


def check_world(name: str, root: Path, images: str = "header", strict: bool = True) -> CheckReport:
    """The ``data check`` report of the world at ``root``."""
    root = Path(root)
    world = GeneratedWorld(name, root)
    if not root.exists():
        report = CheckReport(name, root, image_mode=images)
        report.findings.append(Finding(
            "error", f"{name}: no world has been generated at {root} yet",
            f"it is generated on first use; `czsl-bench data prepare {name} --root {root}` generates it now"))
        return report
    verified = verify_world(root, images=images != "none", current_version=GENERATOR_VERSION)
    if verified.info is not None:
        try:
            world.stats = expected_stats(verified.info)
        except (KeyError, TypeError, ValueError, AttributeError):
            verified.problems.append((WORLD_FILE, "lacks the split pairs or image counts"))
    report, _ = inspect_dataset(world, root, images=images, strict=strict)
    report.checksum_source = f"files against the world's {CHECKSUMS_FILE}"
    report.checksums = _checksum_rows(verified)
    _world_findings(report, world, verified, strict)
    return report


def _checksum_rows(verified: WorldCheck) -> list[tuple[str, str]]:
    rows = [(rel, status) for rel, status in sorted(verified.checked.items()) if not rel.startswith("images/")]
    image_status = [status for rel, status in verified.checked.items() if rel.startswith("images/")]
    if image_status:
        bad = len(image_status) - image_status.count("match")
        rows.append((f"images/ ({len(image_status):,} files)", "match" if not bad else f"{bad:,} DIFFER"))
    return rows


def _world_findings(report: CheckReport, world: GeneratedWorld, verified: WorldCheck, strict: bool) -> None:
    fix = world.fix_hint(world.root)
    if verified.problems:
        first = [f"{rel}: {why}" for rel, why in verified.problems[:SHOW]]
        report.findings.insert(0, Finding(
            "error", f"{world.name}: {len(verified.problems):,} file(s) of the world at {world.root} differ from "
            f"what its generation wrote (first: {first[0]})", fix, first))
    if verified.version:
        report.findings.append(Finding(
            "error" if strict else "warning",
            f"{world.name}: the world at {world.root} was {verified.version}: its images and numbers differ from "
            "this version's", fix + "; pass --no-strict to use it anyway"))
    if verified.unverifiable:
        report.findings.append(Finding("warning", f"{world.name}: the world at {world.root}: {verified.unverifiable}",
                                       fix.replace("to fix: ", "to get checksums: ")))
