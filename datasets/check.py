"""``czsl-bench data check``: is a copy of a dataset complete, well-formed and the standard one?

One inspection serves both the report and loading: :meth:`StandardDataset.load` runs it in
fail-fast mode and raises the first error's line, so a broken dataset fails with exactly the
message that ``data check`` prints.

Errors (the copy is not usable; exit 1): missing files, malformed pair-file lines, a metadata file
that is truncated or not plain data, paths that leave the dataset root (absolute, ``..``, symlinks
out), missing or unreadable images, counts that differ from the
published statistics (``--no-strict`` turns these into warnings). Warnings: split files that differ
byte-wise from the canonical ones, metadata records whose pair is in no split file (the standard
loaders drop them silently), duplicate pair lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from czsl_bench.hashing import sha256_file

from .czsl_format import (
    IMAGE_DIR,
    METADATA_FILE,
    SPLITS,
    CZSLDataset,
    DatasetError,
    ImageDecodeError,
    PathEscapeError,
    RootGuard,
    assign_records,
    decode_image,
    escape_fix,
    escaping_images_message,
    load_descriptions,
    load_metadata,
    missing_images_message,
    pair_file,
    parse_pair_file,
    resolve_image_path,
    scan_images,
)

if TYPE_CHECKING:
    from .plugin import StandardDataset

IMAGE_MODES = ("none", "exists", "header", "decode")
SHOW = 5  # how many paths / lines a finding lists


@dataclass
class Finding:
    level: str  # "error" | "warning"
    message: str  # what and where
    fix: str = ""  # how to fix
    details: list[str] = field(default_factory=list)  # the first few offending paths or lines

    def line(self) -> str:
        """The one-line form used by loading errors and the report."""
        return f"{self.message}; {self.fix}" if self.fix else self.message


@dataclass
class CountRow:
    key: str
    found: int | None
    expected: int | None
    provenance: str

    @property
    def ok(self) -> bool:
        return self.expected is None or self.found == self.expected


@dataclass
class CheckReport:
    """Structured result of ``data check``; ``str(report)`` is the printed report."""

    name: str
    root: Path
    findings: list[Finding] = field(default_factory=list)
    counts: list[CountRow] = field(default_factory=list)
    checksums: list[tuple[str, str]] = field(default_factory=list)  # (file, "match" | "differs" | ...)
    images_checked: int = 0
    image_mode: str = "none"
    checksum_source: str = "split files against the canonical copies"

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def usable(self) -> bool:
        """True when the copy can be loaded and gives the published counts."""
        return not self.errors()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "root": str(self.root), "usable": self.usable,
            "findings": [vars(f) for f in self.findings],
            "counts": [{**vars(c), "ok": c.ok} for c in self.counts],
            "checksums": [{"file": f, "status": s} for f, s in self.checksums],
            "images_checked": self.images_checked, "image_mode": self.image_mode,
        }

    def render(self) -> str:
        out = [f"data check {self.name}: {self.root}"]
        if self.counts:
            out.append("")
            out.append(f"  {'count':<20} {'found':>9} {'expected':>9}  source")
            for c in self.counts:
                found = "-" if c.found is None else f"{c.found:,}"
                expected = "-" if c.expected is None else f"{c.expected:,}"
                mark = "ok" if c.ok else "MISMATCH"
                out.append(f"  {c.key:<20} {found:>9} {expected:>9}  {c.provenance:<9} {mark}")
        if self.checksums:
            out.append("")
            out.append(f"  {self.checksum_source} (sha256):")
            for name, status in self.checksums:
                out.append(f"    {name:<52} {status}")
        if self.image_mode != "none" and self.images_checked:
            out.append("")
            out.append(f"  images checked ({self.image_mode}): {self.images_checked:,}")
        for finding in self.findings:
            out.append("")
            out.append(f"{finding.level.upper()}: {finding.line()}")
            out.extend(f"    {d}" for d in finding.details)
        out.append("")
        n_err, n_warn = len(self.errors()), len(self.warnings())
        verdict = "usable" if self.usable else "NOT usable"
        out.append(f"{self.name}: {verdict} ({n_err} error(s), {n_warn} warning(s))")
        return "\n".join(out)

    __str__ = render


class _FailFast(Exception):
    """Stops an inspection at its first error (loading needs only one message)."""


def canonical_checksums(plugin: StandardDataset) -> dict[str, str]:
    """``relative path -> sha256`` of the canonical files shipped for ``plugin``."""
    sums = plugin.canonical_root().parent / "sha256sums.txt"
    out: dict[str, str] = {}
    if sums.is_file():
        for line in sums.read_text().splitlines():
            digest, _, rel = line.partition("  ")
            if rel.startswith(plugin.name + "/"):
                out[rel[len(plugin.name) + 1:]] = digest
    return out


def inspect_dataset(plugin: StandardDataset, root: Path, images: str = "header", strict: bool = True,
                    fail_fast: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> tuple[CheckReport, CZSLDataset | None]:
    """Inspect ``root`` as a copy of ``plugin``'s dataset; returns the report and, if loadable, the dataset.

    ``images``: "none", "exists" (a directory listing per folder), "header" (PIL identifies every
    file; the ``data check`` default) or "decode" (full decode, slow).
    """
    if images not in IMAGE_MODES:
        raise ValueError(f"unknown image check {images!r}; use one of {', '.join(IMAGE_MODES)}")
    root = Path(root).expanduser()
    report = CheckReport(plugin.name, root, image_mode=images)
    fix = plugin.fix_hint(root)

    def add(level: str, message: str, fix_: str = "", details: list[str] | None = None) -> None:
        report.findings.append(Finding(level, message, fix_, details or []))
        if fail_fast and level == "error":
            raise _FailFast

    try:
        dataset = _inspect(plugin, root, images, strict, report, add, fix, progress)
    except _FailFast:
        return report, None
    return report, (dataset if report.usable else None)


def _inspect(plugin: StandardDataset, root: Path, images: str, strict: bool, report: CheckReport,
             add: Callable[..., None], fix: str,
             progress: Callable[[int, int], None] | None) -> CZSLDataset | None:
    name = plugin.name
    if not root.is_dir():
        add("error", f"{name}: dataset root {root} does not exist", fix)
        return None

    # 1. pair files
    pairs: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        path = pair_file(root, split)
        if not path.is_file():
            add("error", f"{name}: missing pair file {path}", fix)
            continue
        try:
            parsed, errors, dupes = parse_pair_file(path)
        except DatasetError as exc:
            add("error", f"{name}: {exc}", fix)
            continue
        if errors:
            more = f" (and {len(errors) - 1} more malformed line(s))" if len(errors) > 1 else ""
            add("error", f"{name}: malformed pair file: {errors[0]}{more}",
                "each line must be '<attr> <obj>' (two names, no spaces inside a name); restore the "
                f"official file (the canonical copy is in {plugin.canonical_root()})",
                [str(e) for e in errors[:SHOW]])
            continue
        if dupes:
            add("warning", f"{name}: {len(dupes)} duplicate line(s) in {path} (first: {dupes[0]})",
                "the loader keeps the first occurrence; the official files have none", [str(d) for d in dupes[:SHOW]])
        pairs[split] = parsed

    # 2. metadata
    records = None
    try:
        records = load_metadata(root / METADATA_FILE)
    except PathEscapeError as exc:
        add("error", f"{name}: {exc}")  # its own fix; downloading again would not help
    except DatasetError as exc:
        add("error", f"{name}: {exc}", fix)

    # 3. canonical checksums (informative: equal counts with different bytes is still usable)
    expected_sums = canonical_checksums(plugin)
    for rel, digest in sorted(expected_sums.items()):
        path = root / rel
        if not path.is_file():
            report.checksums.append((rel, "missing"))
            continue
        report.checksums.append((rel, "match" if sha256_file(path) == digest else "DIFFERS"))
    differing = [rel for rel, status in report.checksums if status == "DIFFERS"]
    if differing:
        add("warning", f"{name}: {len(differing)} file(s) differ from the canonical copies: {', '.join(differing)}",
            "results may not be comparable with published numbers; the canonical files are in "
            f"{plugin.canonical_root()}" + (f" ({plugin.canonical_note})" if plugin.canonical_note else ""))

    if len(pairs) < len(SPLITS):
        return None
    if records is None:
        # still compare the pair counts, which need only the pair files
        pairs_only = CZSLDataset(name, root, pairs["train"], pairs["val"], pairs["test"], {})
        found = pairs_only.stats()
        for key, stat in plugin.stats.items():
            if not key.endswith("_images"):
                report.counts.append(CountRow(key, found.get(key), stat.value, stat.provenance))
        _count_finding(report, add, name, strict)
        return None

    # 4. records -> splits, orphans
    assignment = assign_records(records, pairs["train"], pairs["val"], pairs["test"])
    if assignment.orphans:
        examples = [f"record {i}: {r['image']} ({r['attr']} {r['obj']}, set {r['set']})"
                    for i, r in assignment.orphans[:SHOW]]
        add("warning", f"{name}: {len(assignment.orphans):,} metadata record(s) with set train/val/test have a "
            f"pair in no split file (first: {examples[0]})",
            "the standard loaders drop these images (CSP/PLID keep them in the open world); use the "
            "official split files and metadata together", examples)
    if assignment.off_split:
        examples = [f"record {i}: {r['image']} ({r['attr']} {r['obj']}, set {r['set']})"
                    for i, r in assignment.off_split[:SHOW]]
        add("warning", f"{name}: {len(assignment.off_split):,} metadata record(s) have a pair that is not in "
            f"their own split's pair file (first: {examples[0]})",
            "the standard loaders keep them; check that the split files and the metadata belong together", examples)
    with_images = {(a, o) for _, a, o in assignment.images["train"]}
    empty = [p for p in pairs["train"] if p not in with_images]
    if empty:
        # the original C-GQA release had 133 such pairs (czsl#3): a model cannot learn them
        examples = [f"{a} {o}" for a, o in empty[:SHOW]]
        add("warning", f"{name}: {len(empty):,} train pair(s) have no training image (first: {examples[0]})",
            "an old or partial release? (the original C-GQA had 133 such pairs; use the updated release)",
            examples)
    try:
        descriptions = load_descriptions(root / "descriptions.json")
    except DatasetError as exc:
        add("error", f"{name}: {exc}")
        descriptions = None
    dataset = CZSLDataset(name, root, pairs["train"], pairs["val"], pairs["test"], assignment.images, descriptions)

    # 5. counts against the published statistics
    found = dataset.stats()
    for key, stat in plugin.stats.items():
        report.counts.append(CountRow(key, found.get(key), stat.value, stat.provenance))
    _count_finding(report, add, name, strict)

    # 6. images
    if images != "none":
        image_root = root / IMAGE_DIR
        all_images = dataset.all_images()
        if not image_root.is_dir():
            add("error", f"{name}: image folder {image_root} does not exist", fix)
            return dataset
        guard = RootGuard(root)
        scan = scan_images(image_root, all_images, guard)
        missing = scan.missing
        report.images_checked = len(all_images)
        if scan.escaping:
            add("error", escaping_images_message(name, root, scan.escaping, len(all_images)),
                escape_fix(scan.escaping[0][1]), [f"{rel}: {reason}" for rel, reason in scan.escaping[:SHOW]])
        if missing:
            add("error", missing_images_message(name, image_root, missing, len(all_images)), fix,
                missing[:SHOW])
        if images in ("header", "decode"):
            skip = set(missing) | {rel for rel, _ in scan.escaping}
            unreadable = []
            for k, rel in enumerate(all_images):
                if progress is not None and k % 1000 == 0:
                    progress(k, len(all_images))
                if rel in skip:
                    continue
                try:
                    path = resolve_image_path(image_root, rel, guard)
                except PathEscapeError as exc:  # replaced by a symlink since the listing
                    add("error", f"{name}: {exc}")
                    continue
                problem = _image_problem(path, full=images == "decode")
                if problem:
                    unreadable.append(f"{rel}: {problem}")
            if unreadable:
                add("error", f"{name}: {len(unreadable):,} of {len(all_images):,} split images cannot be read "
                    f"(first: {unreadable[0]})",
                    "download these files again (`czsl-bench data prepare` skips files that are already "
                    "complete)", unreadable[:SHOW])
    return dataset


def _count_finding(report: CheckReport, add: Callable[..., None], name: str, strict: bool) -> None:
    wrong = [c for c in report.counts if not c.ok]
    if wrong:
        text = ", ".join(f"{c.key} {c.found:,} (expected {c.expected:,})" for c in wrong)
        add("error" if strict else "warning", f"{name}: counts differ from the published statistics: {text}",
            "use the official split files and metadata (`czsl-bench data prepare "
            f"{name}` installs them); pass strict=False / --no-strict to use a non-standard copy anyway")


def _image_problem(path: Path, full: bool) -> str:
    """'' when the image is readable, else a short reason (PIL's own text, one line)."""
    from PIL import Image, UnidentifiedImageError

    if full:
        try:
            decode_image(path)
        except ImageDecodeError as exc:
            return str(exc).split(" (", 1)[-1].split(");", 1)[0]
        return ""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.size  # noqa: B018 - identifying the format reads the header
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except (OSError, ValueError, SyntaxError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ""
