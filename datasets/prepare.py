"""``czsl-bench data prepare``: download, verify and reorganise a dataset into the standard layout.

Resumable at every stage:

* downloads go to ``<root>/_downloads/<file>.part`` and continue with an HTTP Range request; a
  finished file is verified (sha256 where one is published, otherwise against the checksum recorded
  in ``<root>/.czsl-prepare.json`` at its first download) and then skipped on the next run;
* extraction skips members whose target already exists with the same size; every file is written
  to a temporary name first and moved into place, so an interrupted run never leaves a half file
  under its final name.

The network step is injectable (``fetch(url, part_path)``), which is how the tests run the whole
preparation on archives they build locally.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from czsl_bench.atomic import atomic_file, atomic_write_bytes
from czsl_bench.hashing import sha256_file

from .check import CheckReport, inspect_dataset
from .czsl_format import METADATA_FILE, SPLIT_DIR, SPLITS, DatasetError, RootGuard, load_metadata

if TYPE_CHECKING:
    from .plugin import Source, StandardDataset

STATE_FILE = ".czsl-prepare.json"
DOWNLOAD_DIR = "_downloads"
Fetch = Callable[[str, Path], None]
Log = Callable[[str], None]


@dataclass
class PrepareReport:
    name: str
    root: Path
    downloaded: list[str] = field(default_factory=list)  # source keys fetched in this run
    reused: list[str] = field(default_factory=list)  # source keys already complete and verified
    check: CheckReport | None = None


# --------------------------------------------------------------------------------------------
# State and downloads
# --------------------------------------------------------------------------------------------
def _read_state(root: Path) -> dict:
    path = root / STATE_FILE
    if not path.is_file():
        return {"downloads": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"downloads": {}}  # a damaged state file only costs re-verification


def _write_state(root: Path, state: dict) -> None:
    atomic_write_bytes(root / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())


def http_fetch(url: str, part: Path, log: Log = print, timeout: float = 60.0) -> None:
    """Download ``url`` into ``part``, continuing a partial file with an HTTP Range request."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "czsl-bench (dataset preparation)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - fixed https/http URLs
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: the part file is already complete
            return
        raise OSError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise OSError(f"download of {url} failed: {getattr(exc, 'reason', exc)}") from None
    with response:
        resumed = bool(have) and getattr(response, "status", None) == 206  # file:// has no status
        total = response.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else None
        done = have if resumed else 0
        next_report = done + (100 << 20)
        with open(part, "ab" if resumed else "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if done >= next_report:
                    log(f"  {done / 2**20:,.0f} MiB" + (f" of {total / 2**20:,.0f} MiB" if total else ""))
                    next_report += 100 << 20


def download(source: Source, dest_dir: Path, state: dict, fetch: Fetch, urls: list[str],
             sha256: str | None, log: Log) -> tuple[Path, bool]:
    """Make ``dest_dir/source.filename`` complete and verified; returns (path, fetched_now)."""
    dest = dest_dir / source.filename
    recorded = state["downloads"].get(source.key, {}).get("sha256")
    expected = sha256 or recorded
    if dest.is_file():
        digest = sha256_file(dest)
        if expected is None or digest == expected:
            state["downloads"][source.key] = {"file": source.filename, "sha256": digest}
            log(f"{source.key}: {dest} already complete (sha256 {digest[:12]}…), skipped")
            return dest, False
        log(f"{source.key}: {dest} does not match its checksum; downloading again")
        dest.unlink()
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        log(f"{source.key}: downloading {url}" + (" (resuming)" if part.exists() else ""))
        try:
            fetch(url, part)
        except OSError as exc:
            failures.append(str(exc) if url in str(exc) else f"{url}: {exc}")
            continue
        digest = sha256_file(part)
        if sha256 is not None and digest != sha256:
            part.unlink()
            failures.append(f"{url}: sha256 {digest} does not match the expected {sha256}")
            continue
        os.replace(part, dest)
        state["downloads"][source.key] = {"file": source.filename, "sha256": digest}
        return dest, True
    raise DatasetError(
        f"could not download {source.key} ({source.filename}): " + "; ".join(failures)
        + f"; check the network, pass another mirror with --url {source.key}=URL, or put the file at {dest} "
        "yourself and run prepare again"
    )


# --------------------------------------------------------------------------------------------
# The orchestration
# --------------------------------------------------------------------------------------------
def prepare_dataset(plugin: StandardDataset, root: Path, fetch: Fetch | None = None,
                    urls: dict[str, str] | None = None, sha256: dict[str, str] | None = None,
                    keep_archives: bool = True, splits_from: str = "package", strict: bool = True,
                    log: Log = print) -> PrepareReport:
    """Download what is missing, verify it, reorganise it, then run ``data check`` (existence only).

    ``urls`` / ``sha256`` override a source's mirror list / checksum by key (e.g. a new mirror);
    ``splits_from``: "package" installs the shipped canonical split files and metadata (no
    download), "upstream" downloads and verifies the TMN split tarball instead.
    """
    if splits_from not in ("package", "upstream"):
        raise ValueError(f"splits_from must be 'package' or 'upstream', not {splits_from!r}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    fetch = fetch or (lambda url, part: http_fetch(url, part, log=log))
    urls, sha256 = dict(urls or {}), dict(sha256 or {})
    unknown = set(urls) | set(sha256)
    unknown -= {s.key for s in plugin.sources}
    if unknown:
        raise ValueError(f"unknown source key(s) {', '.join(sorted(unknown))} for {plugin.name}; "
                         f"known: {', '.join(s.key for s in plugin.sources)}")
    state = _read_state(root)
    report = PrepareReport(plugin.name, root)
    archives: dict[str, Path] = {}
    for source in plugin.sources:
        if source.key == "splits" and splits_from == "package" and _package_has_splits(plugin):
            continue
        mirrors = [urls[source.key]] if source.key in urls else list(source.urls)
        path, fetched = download(source, root / DOWNLOAD_DIR, state, fetch, mirrors,
                                 sha256.get(source.key, source.sha256), log)
        _write_state(root, state)
        (report.downloaded if fetched else report.reused).append(source.key)
        archives[source.key] = path
    plugin.prepare_layout(root, archives, log)
    state["layout_done"] = True
    _write_state(root, state)
    if not keep_archives:
        shutil.rmtree(root / DOWNLOAD_DIR, ignore_errors=True)
    report.check, _ = inspect_dataset(plugin, root, images="exists", strict=strict)
    return report


def _package_has_splits(plugin: StandardDataset) -> bool:
    canonical = plugin.canonical_root()
    return (canonical / METADATA_FILE).is_file() and all(
        (canonical / SPLIT_DIR / f"{s}_pairs.txt").is_file() for s in SPLITS)


# --------------------------------------------------------------------------------------------
# Layout steps shared by the plugins
# --------------------------------------------------------------------------------------------
def _split_members() -> list[str]:
    return [f"{SPLIT_DIR}/{s}_pairs.txt" for s in SPLITS] + [METADATA_FILE]


def install_split_files(plugin: StandardDataset, root: Path, tarball: Path | None, tar_prefix: str,
                        log: Log = print) -> None:
    """Put the pair files and metadata into ``root``: from the split tarball when one was
    downloaded, else from the canonical copies shipped with the package (verified by sha256)."""
    from .check import canonical_checksums

    expected = canonical_checksums(plugin)
    guard = RootGuard(root)
    if tarball is not None:
        with tarfile.open(tarball, "r:gz") as tar:
            for rel in _split_members():
                member = f"{tar_prefix}/{rel}"
                try:
                    data = tar.extractfile(member)
                except KeyError:
                    data = None
                if data is None:
                    raise DatasetError(f"split tarball {tarball} has no member {member}; it is not the TMN "
                                       "split release, delete it and run prepare again")
                atomic_write_bytes(guard.resolve(root, rel, f"{plugin.name}: split file"), data.read())
        log(f"splits: installed from {tarball.name}")
        return
    canonical = plugin.canonical_root()
    for rel in _split_members():
        src = canonical / rel
        if expected.get(rel) and sha256_file(src) != expected[rel]:
            raise DatasetError(f"shipped split file {src} does not match its checksum; reinstall czsl-bench "
                               "or use --splits-from upstream")
        dest = guard.resolve(root, rel, f"{plugin.name}: split file")
        if dest.is_file() and sha256_file(dest) == sha256_file(src):
            continue
        atomic_write_bytes(dest, src.read_bytes())
    log("splits: installed the canonical split files and metadata shipped with czsl-bench")


def _safe_parts(name: str) -> list[str] | None:
    """Path components of an archive member, or None for absolute / parent-escaping names."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or any(part == ".." for part in path.parts):
        return None
    return [p for p in path.parts if p not in ("", ".")]


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> bool:
    """Extract one member atomically; False when ``dest`` already holds it (same size)."""
    if dest.is_file() and dest.stat().st_size == info.file_size:
        return False
    with zf.open(info) as src, atomic_file(dest) as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return True


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"archive {archive} is not a readable zip ({exc}); delete it and run prepare "
                           "again to download it anew") from None


def extract_zip_tree(archive: Path, prefix: str | None, dest_root: Path,
                     rename_folder: Callable[[str], str] | None = None, log: Log = print,
                     guard: RootGuard | None = None) -> int:
    """Extract the members under ``prefix`` of a zip into ``dest_root`` (prefix stripped).

    ``prefix=None`` strips a single top-level folder when the archive has exactly one.
    ``rename_folder`` maps the first path component (MIT-States: spaces to '_'). Members already
    extracted with the right size are skipped, so an interrupted extraction resumes. A member
    whose target resolves outside ``guard``'s root (default: ``dest_root``), through a symlinked
    folder already on disk, is refused with :class:`PathEscapeError`.
    """
    guard = guard or RootGuard(dest_root, linkable=())
    with _open_zip(archive) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if prefix is None:
            tops = {(_safe_parts(i.filename) or [""])[0] for i in infos}
            multi = [i for i in infos if len(_safe_parts(i.filename) or []) > 1]
            prefix = f"{tops.pop()}/" if len(tops) == 1 and len(multi) == len(infos) else ""
        written = skipped = 0
        for info in infos:
            name = info.filename.replace("\\", "/")
            if not name.startswith(prefix):
                continue
            parts = _safe_parts(name[len(prefix):])
            if not parts:
                if parts is None:
                    log(f"  skipped unsafe archive member {info.filename!r}")
                continue
            if rename_folder is not None and len(parts) > 1:
                parts[0] = rename_folder(parts[0])
            dest = guard.resolve(dest_root, "/".join(parts), f"archive {archive.name}: member {info.filename!r}")
            if _copy_member(zf, info, dest):
                written += 1
            else:
                skipped += 1
    if written + skipped == 0:
        raise DatasetError(f"archive {archive} has no files under {prefix or 'its top level'!r}; it is not "
                           "the expected release, delete it and run prepare again")
    log(f"{archive.name}: extracted {written:,} file(s) into {dest_root}"
        + (f", {skipped:,} already present" if skipped else ""))
    return written


def _link_or_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # a hard link costs no disk; falls back to a copy across devices
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def reorganize_utzappos(root: Path, log: Log = print) -> None:
    """The ``reorganize_utzap.py`` step: ``_images/<_image>`` -> ``images/<image>`` per metadata record."""
    records = load_metadata(root / METADATA_FILE)  # refuses absolute and '..' paths
    guard = RootGuard(root)
    missing: list[str] = []
    made = 0
    for i, rec in enumerate(records):
        original, target = rec.get("_image"), rec["image"]
        if not isinstance(original, str):
            raise DatasetError(f"metadata {root / METADATA_FILE} has no '_image' field; it is not the UT-Zappos "
                               "metadata, reinstall it with `czsl-bench data prepare ut-zappos`")
        # symlinks already on disk could still redirect the link's source or its destination
        what = f"ut-zappos: metadata {root / METADATA_FILE}: record {i}"
        dest = guard.resolve(root / "images", target, f"{what} ('image')")
        if dest.is_file():
            continue
        src = guard.resolve(root / "_images", original, f"{what} ('_image')")
        if not src.is_file():
            missing.append(original)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, dest)
        made += 1
    log(f"ut-zappos: reorganised {made:,} image(s) into {root / 'images'}")
    if missing:
        log(f"ut-zappos: {len(missing):,} original image(s) missing from _images/ (first: {missing[0]})")


def install_bundle_zip(archive: Path, root: Path, log: Log = print) -> None:
    """C-GQA: unzip, then move the folder that holds ``compositional-split-natural`` to ``root``.

    Where the zip nests its content (``cgqa/`` or not) has changed between releases, so the
    dataset folder is found rather than assumed.
    """
    with _open_zip(archive) as zf:
        names = [i.filename.replace("\\", "/") for i in zf.infolist()]
        marker = next((n for n in names if n.endswith(f"{SPLIT_DIR}/train_pairs.txt")), None)
    if marker is None:
        raise DatasetError(f"archive {archive} holds no {SPLIT_DIR}/train_pairs.txt; it is not the C-GQA "
                           "release, delete it and run prepare again")
    prefix = marker[: -len(f"{SPLIT_DIR}/train_pairs.txt")]
    extract_zip_tree(archive, prefix, root, log=log)
