"""The standard ``compositional-split-natural`` loader shared by every dataset.

On-disk layout (docs/datasets.md), relative to a dataset root::

    compositional-split-natural/{train,val,test}_pairs.txt   one "<attr> <obj>" per line
    metadata_compositional-split-natural.t7                   torch-saved list of plain dicts
    images/<record['image']>                                  the image files
    descriptions.json                                         optional: {"attr obj": [text, ...]}

Rules reproduced from the reference loaders (czsl / CSP / PLID / Troika, docs/datasets.md-§3):

* ``attrs`` / ``objs`` are the sorted unions of the names in the three pair files (not the metadata);
* closed-world pairs = sorted union of the three files; open-world pairs = attrs x objs, attr-major;
* an image belongs to the split named by its metadata ``set`` field (never to the split whose pair
  file happens to contain its pair); records with ``attr == 'NA'``, ``set == 'NA'`` or a pair in no
  pair file are skipped; any ``set`` other than train/val goes to test.
* seen mask = pair in train_pairs; candidate mask (docs/evaluation.md) = train pairs plus the
  split's own pairs in the closed world, all pairs in the open world.

Nothing here is specific to one dataset: the real-dataset plugins and the embedded synthetic world
all build a :class:`CZSLDataset` with :meth:`CZSLDataset.from_root`. This module imports torch;
plugin modules import it lazily so that listing plugins stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import operator
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

from czsl_bench.atomic import atomic_write_bytes
from czsl_bench.hashing import sha256_file

SPLIT_DIR = "compositional-split-natural"
METADATA_FILE = "metadata_compositional-split-natural.t7"
IMAGE_DIR = "images"
DESCRIPTIONS_FILE = "descriptions.json"
SPLITS = ("train", "val", "test")
WORLDS = ("closed", "open")
REQUIRED_KEYS = ("image", "attr", "obj", "set")

Pair = tuple[str, str]
log = logging.getLogger(__name__)


def pair_file(root: Path, split: str) -> Path:
    """Path of ``<root>/compositional-split-natural/<split>_pairs.txt``."""
    return Path(root) / SPLIT_DIR / f"{split}_pairs.txt"


# --------------------------------------------------------------------------------------------
# Errors: every message says what is wrong, where, and how to fix it, on one line.
# --------------------------------------------------------------------------------------------
class DatasetError(ValueError):
    """A dataset on disk is missing, incomplete or malformed (one line: what, where, how to fix)."""


class ImageDecodeError(OSError):
    """An image file cannot be read or decoded; the message names the file.

    DataLoader workers re-create exceptions in the main process as ``type(exc)(long_message)``,
    where the long message embeds the worker's whole traceback. The constructor recovers the
    original one-line message from it, so the user still sees one line naming the file.
    """

    def __init__(self, message: str = "", *args: Any):
        if "Original Traceback" in message:
            _, sep, tail = message.rpartition(f"{type(self).__name__}: ")
            if sep:
                message = tail.strip().splitlines()[0] if tail.strip() else message
        super().__init__(message, *args)

    def __str__(self) -> str:  # OSError's default str would format (errno, strerror) tuples
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class LineProblem:
    """One malformed line of a pair file."""

    path: Path
    lineno: int
    line: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.reason} (line {self.line!r})"


class PathEscapeError(DatasetError):
    """A path named by a data file leaves the dataset root (absolute, ``..``, or a symlink out)."""


# --------------------------------------------------------------------------------------------
# Paths named by data files: resolved, and refused when they leave the dataset root
# --------------------------------------------------------------------------------------------
# Metadata keys whose values are paths (relative to images/, resp. _images/ for UT-Zappos).
PATH_KEYS = ("image", "_image")
# Top-level folders that may themselves be symlinks (images kept on another disk); everything
# below them, and every other path, must resolve inside the root.
LINKABLE_DIRS = (IMAGE_DIR, "_images")
ESCAPE_FIX = ("a data file may only name files inside the dataset root: replace it with the official "
              "file (`czsl-bench data prepare` installs it)")
SYMLINK_FIX = ("replace the symlink by the file itself (a link of the whole images/ folder to another "
               "disk is fine)")


def lexical_escape(rel: str) -> str | None:
    """Why the relative path ``rel`` would leave its folder without touching the disk, or None."""
    if not rel:
        return "an empty path"
    if "\x00" in rel:
        return "a NUL byte"
    # pathlib drops everything before an absolute component: root / "/etc/passwd" is /etc/passwd.
    # Backslashes count as separators too (a metadata file written on Windows); drive letters
    # mean nothing on POSIX, where "C:/x" is a folder named "C:" inside the root.
    if rel[0] in "/\\":
        return "an absolute path"
    if ".." in rel and ".." in rel.replace("\\", "/").split("/"):
        return "a '..' component"
    return None


def escape_message(what: str, rel: str, root: Path, reason: str, fix: str = "") -> str:
    """The one line for a path that leaves the root: which record, which path, why, how to fix."""
    return f"{what} names {rel!r}, which leaves the dataset root {root} ({reason}); {fix or ESCAPE_FIX}"


def escape_fix(reason: str) -> str:
    """How to fix a path that leaves the root, by why it does."""
    return SYMLINK_FIX if reason.endswith("through a symlink") else ESCAPE_FIX


class RootGuard:
    """Resolves paths that come from data files and refuses those that leave ``root``.

    A path escapes when it is absolute, has a ``..`` component, or resolves (symlinks followed)
    outside the root. The real locations of :data:`LINKABLE_DIRS` count as inside, so a dataset
    whose ``images/`` folder is a link to another disk stays usable. The lexical test costs no
    system call; :meth:`escape` adds one ``realpath``.
    """

    def __init__(self, root: str | os.PathLike, linkable: Sequence[str] = LINKABLE_DIRS):
        self.root = Path(root)
        bases = {os.path.realpath(self.root)}
        bases.update(os.path.realpath(self.root / name) for name in linkable)
        self._prefixes = tuple(b if b.endswith(os.sep) else b + os.sep for b in bases)

    def contains(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (already resolved) lies inside the root."""
        real = os.fspath(path)
        return any(real.startswith(p) or real + os.sep == p for p in self._prefixes)

    def escape(self, base: str | os.PathLike, rel: str) -> str | None:
        """Why ``base/rel`` leaves the root, or None when it stays inside."""
        reason = lexical_escape(rel)
        if reason is not None:
            return reason
        real = os.path.realpath(os.path.join(base, rel))
        return None if self.contains(real) else f"it resolves to {real} through a symlink"

    def resolve(self, base: str | os.PathLike, rel: str, what: str) -> Path:
        """``base/rel``, or :class:`PathEscapeError` naming ``what`` (e.g. the metadata record)."""
        reason = self.escape(base, rel)
        if reason is not None:
            raise PathEscapeError(escape_message(what, rel, self.root, reason, escape_fix(reason)))
        return Path(base) / rel


def escaping_records(records: Sequence[dict[str, Any]]) -> list[tuple[int, str, str, str]]:
    """``(record index, key, path, reason)`` for every metadata path that lexically leaves the root."""
    out = []
    for key in PATH_KEYS:
        if key != "image" and not any(map(operator.contains, records, itertools.repeat(key))):
            continue  # no record has it (only UT-Zappos has '_image')
        values = [rec.get(key) for rec in records]
        if _may_escape([v for v in values if v.__class__ is str]):
            for i, value in enumerate(values):
                reason = lexical_escape(value) if isinstance(value, str) else None
                if reason is not None:
                    out.append((i, key, value, reason))
    return sorted(out)


def _may_escape(paths: list[str]) -> bool:
    """False only when :func:`lexical_escape` accepts every path (exact: it never misses one).

    Every load runs this over every record (63k on MIT-States), so it scans all paths at once in
    C instead of calling lexical_escape per path; only paths containing ``..`` (50 real MIT-States
    file names do) are looked at one by one.
    """
    if not paths:
        return False
    # "/" sorts before digits and letters: the startswith scan runs only when some path begins
    # with punctuation
    if "" in paths or (min(paths) < "0" and any(map(str.startswith, paths, itertools.repeat("/")))):
        return True
    text = "\n".join(paths)
    if "\x00" in text or "\\" in text:
        return True
    return ".." in text and any(lexical_escape(p) is not None for p in paths if ".." in p)


# --------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------
def parse_pair_file(path: str | os.PathLike) -> tuple[list[Pair], list[LineProblem], list[LineProblem]]:
    """Parse a ``*_pairs.txt`` file.

    Returns ``(pairs, errors, warnings)``: pairs in file order without duplicates; errors are lines
    that are not exactly two whitespace-separated names (the reference loaders would crash or
    mis-read them); warnings are duplicate lines (harmless: the loaders take set unions).
    Raises :class:`DatasetError` when the file cannot be read at all.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"missing pair file {path}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read pair file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        line = raw.split(b"\n")[lineno - 1].decode("utf-8", "replace")
        return [], [LineProblem(path, lineno, line, "not valid UTF-8")], []
    pairs: list[Pair] = []
    seen: dict[Pair, int] = {}
    errors: list[LineProblem] = []
    warnings: list[LineProblem] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != 2:
            reason = "empty line" if not fields else f"expected '<attr> <obj>', found {len(fields)} field(s)"
            errors.append(LineProblem(path, lineno, line, reason))
            continue
        pair = (fields[0], fields[1])
        if pair in seen:
            warnings.append(LineProblem(path, lineno, line, f"duplicate of line {seen[pair]}"))
            continue
        seen[pair] = lineno
        pairs.append(pair)
    return pairs, errors, warnings


def read_pair_file(path: str | os.PathLike, fix: str = "") -> list[Pair]:
    """Pairs of a ``*_pairs.txt`` file in file order; :class:`DatasetError` on the first bad line."""
    try:
        pairs, errors, _ = parse_pair_file(path)
    except DatasetError as exc:
        raise DatasetError(_with_fix(str(exc), fix)) from None
    if errors:
        more = f" (and {len(errors) - 1} more malformed line(s))" if len(errors) > 1 else ""
        raise DatasetError(_with_fix(f"malformed pair file: {errors[0]}{more}", fix))
    return pairs


# 2: a header line with the sha256 of the records that follow it (format 1 had no checksum)
METADATA_CACHE_FORMAT = 2


def _metadata_cache_dir() -> Path | None:
    """``<czsl cache>/metadata`` (see czsl_bench.cache), or None when ``CZSL_METADATA_CACHE=0``."""
    if os.environ.get("CZSL_METADATA_CACHE", "1").lower() in ("0", "off", "false", "no"):
        return None
    from czsl_bench.cache import default_cache_root

    return default_cache_root() / "metadata"


def _read_metadata_cache(cache_dir: Path, digest: str, source: Path) -> list[dict[str, str]] | None:
    """The cached records, or None on a miss; a damaged entry is reported, deleted and a miss.

    The checksum matters: the records decide which split each image is in, so one flipped byte
    (``"val"`` -> ``"vam"``, which the loader puts in test) would silently change test numbers.
    """
    path = cache_dir / f"{digest}.json"
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    header, _, body = raw.partition(b"\n")
    try:
        head = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        head = None
    if isinstance(head, dict) and head.get("format") != METADATA_CACHE_FORMAT:
        return None  # written by another version: replaced without a word
    problem = None
    if not isinstance(head, dict):
        problem = "unreadable header"
    elif head.get("sha256") != digest:
        problem = "it belongs to another metadata file"
    elif head.get("records_sha256") != hashlib.sha256(body).hexdigest():
        problem = "checksum mismatch"
    else:
        try:
            records = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            records = None
        if isinstance(records, list):
            return records
        problem = "not a list of records"
    log.warning("metadata cache file %s is damaged (%s); deleting it and re-reading %s", path, problem, source)
    path.unlink(missing_ok=True)
    return None


def _write_metadata_cache(cache_dir: Path, digest: str, records: list[dict[str, str]]) -> None:
    body = json.dumps(records).encode("ascii")  # ensure_ascii: even lone surrogates round-trip
    head = {"format": METADATA_CACHE_FORMAT, "sha256": digest, "records_sha256": hashlib.sha256(body).hexdigest()}
    try:
        atomic_write_bytes(cache_dir / f"{digest}.json", json.dumps(head).encode() + b"\n" + body)
    except OSError:
        pass  # the cache only saves time; a read-only cache folder must not break loading


def load_metadata(path: str | os.PathLike, fix: str = "", cache: bool = True) -> list[dict[str, str]]:
    """Load ``metadata_compositional-split-natural.t7`` safely and validate its structure.

    The file must be a list of plain dicts with string values for ``image``, ``attr``, ``obj`` and
    ``set`` (docs/datasets.md). It is read with ``torch.load(weights_only=True)``, which refuses to
    build arbitrary Python objects; anything else becomes a one-line :class:`DatasetError`.

    ``torch.load`` of the MIT-States file takes about 0.9 s (its safe unpickler is pure Python), so
    validated records are also kept as JSON under ``<czsl cache>/metadata/<sha256 of the file>.json``;
    a file with other bytes has another key, so a changed or broken file is always re-read and
    re-validated. ``cache=False`` or ``CZSL_METADATA_CACHE=0`` turns this off.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(_with_fix(f"missing metadata file {path}", fix))
    cache_dir = _metadata_cache_dir() if cache else None
    digest = None
    if cache_dir is not None:
        digest = sha256_file(path)
        cached = _read_metadata_cache(cache_dir, digest, path)
        if cached is not None:
            _validate_records(cached, path, fix)
            return cached
    records = _torch_load_metadata(path, fix)
    _validate_records(records, path, fix)
    if cache_dir is not None and digest is not None:
        _write_metadata_cache(cache_dir, digest, records)
    return records


def _torch_load_metadata(path: Path, fix: str) -> Any:
    try:
        records = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses globals that are not plain data; the first line says which one
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported global" in ln or "GLOBAL" in ln), "")
        raise DatasetError(
            _with_fix(
                f"metadata file {path} is not plain data (a pickle that holds Python objects, refused "
                f"by torch.load(weights_only=True){': ' + detail if detail else ''}); it is not the "
                "official file, replace it with the official one",
                fix,
            )
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError,
            AttributeError, MemoryError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(
            _with_fix(
                f"metadata file {path} is truncated or corrupt ({type(exc).__name__}: {reason[:160]}); "
                "download it again",
                fix,
            )
        ) from None
    return records


def _validate_records(records: Any, path: Path, fix: str) -> None:
    if not isinstance(records, list):
        raise DatasetError(
            _with_fix(f"metadata file {path} holds a {type(records).__name__}, expected a list of dicts "
                      "(one per image); replace it with the official file", fix)
        )
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DatasetError(_with_fix(
                f"metadata file {path}: record {i} is a {type(rec).__name__}, expected a dict with keys "
                f"{', '.join(REQUIRED_KEYS)}; replace it with the official file", fix))
        for key in REQUIRED_KEYS:
            value = rec.get(key)
            if not isinstance(value, str):
                problem = "lacks key" if key not in rec else "has a non-string value for key"
                raise DatasetError(_with_fix(
                    f"metadata file {path}: record {i} {problem} {key!r} (record {_short(rec)}); "
                    "replace it with the official file", fix))
    escaping = escaping_records(records)
    if escaping:
        i, key, value, reason = escaping[0]
        more = f"; {len(escaping) - 1:,} more record(s) do too" if len(escaping) > 1 else ""
        raise PathEscapeError(_with_fix(escape_message(f"metadata file {path}: record {i} ({key!r})", value,
                                                       path.parent, reason + more), fix))


def load_descriptions(path: str | os.PathLike) -> dict[Pair, list[str]] | None:
    """Optional ``descriptions.json``: ``{"<attr> <obj>": ["text", ...]}``; None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read descriptions file {path}: {exc}; fix the JSON or delete the file") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"descriptions file {path} must hold a JSON object {{\"attr obj\": [texts]}}")
    out: dict[Pair, list[str]] = {}
    for key, texts in raw.items():
        fields = key.split()
        if len(fields) != 2 or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DatasetError(
                f"descriptions file {path}: entry {key!r} must map '<attr> <obj>' to a list of strings"
            )
        out[(fields[0], fields[1])] = list(texts)
    return out


def _with_fix(message: str, fix: str) -> str:
    return f"{message}; {fix}" if fix else message


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Records -> splits
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """Metadata records sorted into splits by the reference-loader rule (docs/datasets.md)."""

    images: dict[str, list[tuple[str, str, str]]]  # split -> [(image, attr, obj)] in metadata order
    skipped_na: int  # attr == 'NA' or set == 'NA'
    orphans: list[tuple[int, dict[str, str]]]  # (record index, record) with a pair in no pair file
    off_split: list[tuple[int, dict[str, str]]]  # pair known, but not in its own split's pair file


def assign_records(records: Iterable[dict[str, str]], train_pairs: Iterable[Pair],
                   val_pairs: Iterable[Pair], test_pairs: Iterable[Pair]) -> Assignment:
    """Sort metadata records into train/val/test by their ``set`` field.

    The pair filter uses the closed-world union of the three pair files (as czsl does; CSP/PLID
    filter with attrs x objs in the open world, identical whenever no record is an orphan). Records
    whose pair is in the union but not in their own split's file are kept, like the reference
    loaders, and listed in ``off_split`` so that ``data check`` can report them.
    """
    by_split = {"train": set(train_pairs), "val": set(val_pairs), "test": set(test_pairs)}
    union = by_split["train"] | by_split["val"] | by_split["test"]
    images: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SPLITS}
    skipped = 0
    orphans: list[tuple[int, dict[str, str]]] = []
    off_split: list[tuple[int, dict[str, str]]] = []
    for i, rec in enumerate(records):
        attr, obj, set_name = rec["attr"], rec["obj"], rec["set"]
        if attr == "NA" or set_name == "NA":
            skipped += 1
            continue
        pair = (attr, obj)
        if pair not in union:
            orphans.append((i, rec))
            continue
        split = set_name if set_name in ("train", "val") else "test"
        if pair not in by_split[split]:
            off_split.append((i, rec))
        images[split].append((rec["image"], attr, obj))
    return Assignment(images, skipped, orphans, off_split)


# --------------------------------------------------------------------------------------------
# Split and dataset
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Split:
    """One evaluation split in the form the evaluator takes (docs/architecture.md "Datasets")."""

    name: str  # "train" | "val" | "test"
    world: str  # "closed" | "open"
    root: Path  # image root: paths in `images` are relative to it
    images: list[str]
    labels: torch.Tensor  # [N] long: index of the image's pair in `pairs`
    attr_labels: torch.Tensor  # [N] long: index into dataset.attrs
    obj_labels: torch.Tensor  # [N] long: index into dataset.objs
    pairs: list[Pair]  # the score columns: closed_pairs or open_pairs
    pair_attr: torch.Tensor  # [P] long
    pair_obj: torch.Tensor  # [P] long
    seen_mask: torch.Tensor  # [P] bool: pair in train_pairs
    candidate_mask: torch.Tensor  # [P] bool: closed: train ∪ this split's pairs; open: all True

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"Split({self.name!r}, world={self.world!r}, images={len(self.images)}, "
                f"pairs={len(self.pairs)}, seen={int(self.seen_mask.sum())}, "
                f"candidates={int(self.candidate_mask.sum())})")

    def image_path(self, index: int) -> Path:
        """Absolute path of image ``index`` (with the MIT-States space-named-folder fallback)."""
        return resolve_image_path(self.root, self.images[index])

    def dataset(self, transform: Callable[[Any], Any] | None = None) -> SplitImages:
        """A torch ``Dataset`` over this split yielding ``(image tensor, label, image index)``."""
        return SplitImages(self, transform)


@dataclass(eq=False)
class CZSLDataset:
    """A CZSL dataset in the standard format: vocabularies, pair lists and per-split images.

    ``train_pairs`` / ``val_pairs`` / ``test_pairs`` keep the pair-file order (CSP/PLID index their
    training logits by the train file order); ``attrs``, ``objs`` and ``closed_pairs`` are sorted.
    Build one with :meth:`from_root` (a directory in the standard format) or :meth:`from_records`.
    """

    name: str
    root: Path
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    test_pairs: list[Pair]
    split_images: dict[str, list[tuple[str, str, str]]]  # split -> [(image, attr, obj)]
    descriptions: dict[Pair, list[str]] | None = None
    image_root: Path | None = None  # default <root>/images
    _splits: dict[tuple[str, str], Split] = field(default_factory=dict, repr=False)
    _version: str | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        """Content version: sha256 (16 hex) of the split pair lists and of every split's
        (image, attr, obj) list. Part of a run's identity: two copies of a dataset with equal
        versions give a method the same inputs up to the image bytes (``data check`` verifies
        those). Independent of where the copy lives."""
        if self._version is None:
            h = hashlib.sha256()
            for split in ("train", "val", "test"):
                pairs = getattr(self, f"{split}_pairs")
                h.update(f"{split} pairs {len(pairs)}\n".encode())
                h.update("".join(f"{a} {o}\n" for a, o in pairs).encode())
                images = self.split_images.get(split, [])
                h.update(f"{split} images {len(images)}\n".encode())
                h.update("".join(f"{img}\t{a}\t{o}\n" for img, a, o in images).encode())
            self._version = h.hexdigest()[:16]
        return self._version

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.image_root = Path(self.image_root) if self.image_root is not None else self.root / IMAGE_DIR
        for split in SPLITS:
            self.split_images.setdefault(split, [])

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_root(cls, root: str | os.PathLike, name: str | None = None, fix: str = "",
                  check_images: bool = False) -> CZSLDataset:
        """Read a dataset directory in the standard format (see the module docstring).

        ``fix`` is appended to every error message (e.g. how to download the data);
        ``check_images`` additionally verifies that every split image exists (one directory
        listing per folder, about 0.1 s for MIT-States) so that a run fails now, not mid-way.
        """
        root = Path(root).expanduser()
        name = name or root.name
        if not root.is_dir():
            raise DatasetError(_with_fix(f"{name}: dataset root {root} does not exist", fix))
        pairs = {split: read_pair_file(pair_file(root, split), fix) for split in SPLITS}
        records = load_metadata(root / METADATA_FILE, fix)
        assignment = assign_records(records, pairs["train"], pairs["val"], pairs["test"])
        descriptions = load_descriptions(root / DESCRIPTIONS_FILE)
        ds = cls(name, root, pairs["train"], pairs["val"], pairs["test"], assignment.images, descriptions)
        if check_images:
            ds.raise_for_missing_images(fix)
        return ds

    @classmethod
    def from_records(cls, name: str, root: str | os.PathLike, train_pairs: Sequence[Pair],
                     val_pairs: Sequence[Pair], test_pairs: Sequence[Pair],
                     records: Iterable[dict[str, str]],
                     descriptions: dict[Pair, list[str]] | None = None) -> CZSLDataset:
        """Build from in-memory pair lists and metadata records (same rules as :meth:`from_root`)."""
        train, val, test = (list(dict.fromkeys(map(tuple, p))) for p in (train_pairs, val_pairs, test_pairs))
        assignment = assign_records(records, train, val, test)
        return cls(name, Path(root), train, val, test, assignment.images, descriptions)

    # -- vocabularies -------------------------------------------------------------------------
    @cached_property
    def attrs(self) -> list[str]:
        return sorted({a for a, _ in self._all_pairs()})

    @cached_property
    def objs(self) -> list[str]:
        return sorted({o for _, o in self._all_pairs()})

    @cached_property
    def closed_pairs(self) -> list[Pair]:
        return sorted(set(self._all_pairs()))

    @cached_property
    def open_pairs(self) -> list[Pair]:
        return [(a, o) for a in self.attrs for o in self.objs]

    @cached_property
    def attr2idx(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.attrs)}

    @cached_property
    def obj2idx(self) -> dict[str, int]:
        return {o: i for i, o in enumerate(self.objs)}

    def _all_pairs(self) -> list[Pair]:
        return self.train_pairs + self.val_pairs + self.test_pairs

    def pairs(self, world: str = "closed") -> list[Pair]:
        """The score columns of a world: ``closed_pairs`` or ``open_pairs``."""
        _check_world(world)
        return self.closed_pairs if world == "closed" else self.open_pairs

    def pairs_of(self, split: str) -> list[Pair]:
        """The pair file of a split (file order)."""
        _check_split(split)
        return {"train": self.train_pairs, "val": self.val_pairs, "test": self.test_pairs}[split]

    # -- splits -------------------------------------------------------------------------------
    def split(self, name: str, world: str = "closed") -> Split:
        """The :class:`Split` ``name`` scored over the pairs of ``world`` (cached)."""
        _check_split(name)
        _check_world(world)
        key = (name, world)
        if key not in self._splits:
            self._splits[key] = self._build_split(name, world)
        return self._splits[key]

    def _build_split(self, name: str, world: str) -> Split:
        attr2idx, obj2idx = self.attr2idx, self.obj2idx
        n_objs = len(self.objs)
        rows = self.split_images[name]
        attr_idx = [attr2idx[a] for _, a, _ in rows]
        obj_idx = [obj2idx[o] for _, _, o in rows]
        attr_labels = torch.tensor(attr_idx, dtype=torch.long)
        obj_labels = torch.tensor(obj_idx, dtype=torch.long)
        pairs = self.pairs(world)
        if world == "open":
            # attr-major product: index = a * |O| + o, no dictionary over 278k pairs needed
            labels = attr_labels * n_objs + obj_labels
            pair_attr = torch.arange(len(self.attrs)).repeat_interleave(n_objs)
            pair_obj = torch.arange(n_objs).repeat(len(self.attrs))

            def index(p: Pair) -> int:
                return attr2idx[p[0]] * n_objs + obj2idx[p[1]]

            candidate = torch.ones(len(pairs), dtype=torch.bool)
        else:
            pair2idx = {p: i for i, p in enumerate(pairs)}
            labels = torch.tensor([pair2idx[(a, o)] for _, a, o in rows], dtype=torch.long)
            pair_attr = torch.tensor([attr2idx[a] for a, _ in pairs], dtype=torch.long)
            pair_obj = torch.tensor([obj2idx[o] for _, o in pairs], dtype=torch.long)
            index = pair2idx.__getitem__
            candidate = torch.zeros(len(pairs), dtype=torch.bool)
            candidate[[index(p) for p in self.train_pairs]] = True
            if name != "train":
                candidate[[index(p) for p in self.pairs_of(name)]] = True
        seen = torch.zeros(len(pairs), dtype=torch.bool)
        seen[[index(p) for p in self.train_pairs]] = True
        return Split(
            name=name, world=world, root=self.image_root, images=[img for img, _, _ in rows],
            labels=labels, attr_labels=attr_labels, obj_labels=obj_labels, pairs=pairs,
            pair_attr=pair_attr, pair_obj=pair_obj, seen_mask=seen, candidate_mask=candidate,
        )

    # -- images -------------------------------------------------------------------------------
    def all_images(self) -> list[str]:
        """Every split image (train, val, test order), relative to ``image_root``."""
        return [img for split in SPLITS for img, _, _ in self.split_images[split]]

    def missing_images(self) -> list[str]:
        """Split images that are not regular files under ``image_root`` (metadata order)."""
        return find_missing_images(self.image_root, self.all_images())

    def raise_for_missing_images(self, fix: str = "") -> None:
        """Raise the ``data check`` message when any split image is missing or leaves the root."""
        if not self.image_root.is_dir():
            raise DatasetError(_with_fix(f"{self.name}: image folder {self.image_root} does not exist", fix))
        scan = scan_images(self.image_root, self.all_images(), RootGuard(self.root))
        if scan.escaping:
            raise PathEscapeError(f"{escaping_images_message(self.name, self.root, scan.escaping, len(self.all_images()))}"
                                  f"; {escape_fix(scan.escaping[0][1])}")
        missing = scan.missing
        if missing:
            raise DatasetError(_with_fix(missing_images_message(self.name, self.image_root, missing,
                                                                len(self.all_images())), fix))

    def stats(self) -> dict[str, int]:
        """The counts that docs/datasets.md publishes, recomputed from the files."""
        train, val, test = (set(p) for p in (self.train_pairs, self.val_pairs, self.test_pairs))
        return {
            "attrs": len(self.attrs), "objs": len(self.objs),
            "train_pairs": len(train),
            "val_seen_pairs": len(val & train), "val_unseen_pairs": len(val - train),
            "test_seen_pairs": len(test & train), "test_unseen_pairs": len(test - train),
            "closed_pairs": len(self.closed_pairs),
            "val_candidates": len(train | val), "test_candidates": len(train | test),
            "open_pairs": len(self.attrs) * len(self.objs),
            "train_images": len(self.split_images["train"]),
            "val_images": len(self.split_images["val"]),
            "test_images": len(self.split_images["test"]),
        }

    def __repr__(self) -> str:
        return (f"CZSLDataset({self.name!r}, root={str(self.root)!r}, attrs={len(self.attrs)}, "
                f"objs={len(self.objs)}, pairs={len(self.closed_pairs)}, images="
                f"{'/'.join(str(len(self.split_images[s])) for s in SPLITS)})")


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")


def _check_world(world: str) -> None:
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; use 'closed' or 'open'")


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------
def _space_variant(rel: str) -> str | None:
    """MIT-States folders are "adj noun" before the standard s/ /_/g rename; metadata uses '_'."""
    folder, sep, rest = rel.partition("/")
    return f"{folder.replace('_', ' ')}/{rest}" if sep and "_" in folder else None


@functools.lru_cache(maxsize=64)
def _guard_for(image_root: str) -> RootGuard:
    # one guard per image folder: its realpaths are computed once, not once per image read
    return RootGuard(Path(image_root).parent)


def resolve_image_path(image_root: Path, rel: str, guard: RootGuard | None = None) -> Path:
    """``image_root/rel``, or the un-renamed space-named folder when only that one exists.

    Raises :class:`PathEscapeError` when the file lies outside the dataset root (``guard``;
    default: the parent of ``image_root``), e.g. a symlink to a file elsewhere.
    """
    guard = guard or _guard_for(os.fspath(image_root))
    path = Path(image_root) / rel
    if not path.exists():
        alt = _space_variant(rel)
        if alt is not None and (Path(image_root) / alt).exists():
            rel, path = alt, Path(image_root) / alt
    return guard.resolve(image_root, rel, f"split image {rel!r}")


@dataclass(frozen=True)
class ImageScan:
    """What one listing pass over the split images found."""

    missing: list[str]  # no regular file under the image root (metadata order)
    escaping: list[tuple[str, str]]  # (path, why it leaves the dataset root): a symlink out, '..', ...


def scan_images(image_root: Path, rel_paths: Iterable[str], guard: RootGuard | None = None) -> ImageScan:
    """Missing and root-escaping split images, with one listing and one ``realpath`` per folder.

    Only symlinked files cost a ``realpath`` of their own; a regular file in a folder that
    resolves inside the root is inside. ``guard`` defaults to the parent of ``image_root``.
    """
    guard = guard or RootGuard(Path(image_root).parent)
    # folder -> (regular-file names, symlinked names, why the folder itself escapes) or None
    listings: dict[str, tuple[frozenset[str], frozenset[str], str | None] | None] = {}

    def listing(folder: str) -> tuple[frozenset[str], frozenset[str], str | None] | None:
        if folder not in listings:
            path = os.path.join(image_root, folder)
            try:
                with os.scandir(path) as it:
                    entries = [(e.name, e.is_file(), e.is_symlink()) for e in it]
            except (OSError, ValueError):
                listings[folder] = None
            else:
                real = os.path.realpath(path)
                outside = None if guard.contains(real) else f"its folder resolves to {real} through a symlink"
                listings[folder] = (frozenset(n for n, f, _ in entries if f),
                                    frozenset(n for n, _, s in entries if s), outside)
        return listings[folder]

    def found(rel: str) -> str | None | bool:
        """False when absent, None when present inside the root, else why it escapes."""
        folder, _, fname = rel.rpartition("/")
        names = listing(folder)
        if names is None or fname not in names[0]:
            return False
        if names[2] is not None:
            return names[2]
        return guard.escape(image_root, rel) if fname in names[1] else None

    missing: list[str] = []
    escaping: list[tuple[str, str]] = []
    for rel in rel_paths:
        reason = lexical_escape(rel)
        if reason is not None:
            escaping.append((rel, reason))
            continue
        state = found(rel)
        if state is False:
            alt = _space_variant(rel)
            state = found(alt) if alt is not None else False
        if state is False:
            missing.append(rel)
        elif state is not None:
            escaping.append((rel, state))
    return ImageScan(missing, escaping)


def find_missing_images(image_root: Path, rel_paths: Iterable[str]) -> list[str]:
    """Relative paths with no regular file under ``image_root`` (one listing per folder)."""
    return scan_images(image_root, rel_paths).missing


def escaping_images_message(name: str, root: Path, escaping: Sequence[tuple[str, str]], total: int) -> str:
    """The shared one-line message for split images that resolve outside the dataset root."""
    rel, reason = escaping[0]
    return (f"{name}: {len(escaping):,} of {total:,} split images leave the dataset root {root} "
            f"(first: {rel!r}: {reason})")


def missing_images_message(name: str, image_root: Path, missing: Sequence[str], total: int,
                           show: int = 3) -> str:
    """The shared one-line message for missing images (used by loading and ``data check``)."""
    first = ", ".join(missing[:show]) + (", ..." if len(missing) > show else "")
    return (f"{name}: {len(missing):,} of {total:,} split images are missing under {image_root} "
            f"(first: {first})")


def decode_image(path: str | os.PathLike) -> Any:
    """Open an image with PIL as RGB; any failure becomes one :class:`ImageDecodeError` line."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageDecodeError(f"image file {path} is missing; run `czsl-bench data check` for the "
                               "full report, then restore the file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageDecodeError(f"cannot decode image {path} ({reason}); the file is damaged, "
                               "download it again (`czsl-bench data check` lists all such files)") from None


class SplitImages(torch.utils.data.Dataset):
    """A map-style torch ``Dataset`` over a :class:`Split`: ``(image tensor, label, image index)``.

    ``transform`` maps a PIL RGB image to a tensor (use the backbone's eval/train transform);
    without one the image becomes a float tensor in [0, 1]. Decode errors raise one
    :class:`ImageDecodeError` line naming the file, also from DataLoader worker processes.
    """

    def __init__(self, split: Split, transform: Callable[[Any], Any] | None = None):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        try:
            path = self.split.image_path(index)
        except PathEscapeError as exc:
            # as ImageDecodeError the one-line message survives DataLoader worker processes
            raise ImageDecodeError(str(exc)) from None
        image = decode_image(path)
        if self.transform is not None:
            tensor = self.transform(image)
        else:
            from torchvision.transforms.functional import to_tensor

            tensor = to_tensor(image)
        return tensor, int(self.split.labels[index]), int(index)

