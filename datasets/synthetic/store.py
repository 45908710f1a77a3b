"""The generated world on disk: its checksums, their verification, and stale partial folders.

A world folder carries ``checksums.sha256`` (``sha256sum -c`` format: every file but
``world.json`` and itself); ``world.json`` records the sha256 of that file and a checksum of its
own content, so one chain verifies every byte a load reads.

A generation writes into a hidden sibling folder (``.<name>.tmp-<pid>-<hex>``) holding an owner
record (host, pid, process start time) and renames it into place when complete. A generation
killed with ``kill -9`` leaves that folder behind; :func:`clean_stale_partials` removes the ones
whose owner process is gone (on the next generation and in ``czsl-bench cache clear``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

CHECKSUMS_FILE = "checksums.sha256"
WORLD_FILE = "world.json"
OWNER_FILE = ".czsl-owner.json"
# ".<world name>.tmp-<pid>-<8 hex>" while generating, ".<world name>.damaged-<pid>-<8 hex>" while a
# damaged world is being deleted
PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|damaged)-(?P<pid>\d+)-[0-9a-f]{8}$")
# A folder without a usable owner record (another host on a shared file system, an older
# czsl-bench, or killed before writing it) is stale only once it has been left alone this long.
STALE_AFTER_S = 6 * 3600


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def doc_checksum(doc: dict) -> str:
    """sha256 of ``doc`` without its own ``checksum`` field, as canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_checksums(root: Path, digests: dict[str, str]) -> str:
    """Write ``checksums.sha256`` (relative path -> sha256, sorted) and return its own sha256."""
    text = "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))
    (root / CHECKSUMS_FILE).write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------
@dataclass
class WorldCheck:
    """What :func:`verify_world` found; ``problems`` are ``(file, what is wrong)``."""

    root: Path
    info: dict | None = None  # world.json, when readable
    problems: list[tuple[str, str]] = field(default_factory=list)
    unverifiable: str = ""  # why the world cannot be verified at all (no checksums: an older czsl-bench)
    version: str = ""  # the generator version that wrote it, when it differs from this one
    checked: dict[str, str] = field(default_factory=dict)  # file -> "match" | "DIFFERS" | "missing" | ...

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unverifiable and not self.version

    def summary(self, show: int = 3) -> str:
        """One line: the first problems and their number."""
        if self.unverifiable:
            return self.unverifiable
        items = [f"{rel}: {why}" for rel, why in self.problems[:show]]
        if self.version:
            items.insert(0, self.version)
        more = f", {len(self.problems) - show:,} more" if len(self.problems) > show else ""
        return "; ".join(items) + more


def read_world_json(root: Path) -> tuple[dict | None, str]:
    """``(world.json, "")`` or ``(None, why it is unusable)``; checks its own checksum when it has one."""
    try:
        info = json.loads((Path(root) / WORLD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    if not isinstance(info, dict):
        return None, "not a JSON object"
    if "checksum" in info and info["checksum"] != doc_checksum(info):
        return None, "checksum mismatch"
    return info, ""


def verify_world(root: str | os.PathLike, images: bool = True, current_version: str | None = None) -> WorldCheck:
    """Check every file of the world at ``root`` against the checksums written with it.

    ``images=False`` skips the image files (the text files alone take milliseconds; the 5,430
    images of the default world about 0.3 s). ``current_version``: report a world written by
    another generator version.
    """
    from ..czsl_format import lexical_escape

    root = Path(root)
    check = WorldCheck(root)
    info, problem = read_world_json(root)
    if info is None:
        check.problems.append((WORLD_FILE, problem))
        return check
    check.info = info
    version = info.get("generator_version")
    if current_version is not None and version != current_version:
        check.version = f"generated by synthetic generator {version}, this czsl-bench writes {current_version}"
    sums = info.get("checksums")
    if not isinstance(sums, dict) or "checksum" not in info:
        check.unverifiable = ("it carries no checksums (generated by an older czsl-bench), so it cannot be "
                              "verified")
        return check
    try:
        text = (root / CHECKSUMS_FILE).read_bytes()
    except OSError:
        check.problems.append((CHECKSUMS_FILE, "missing"))
        return check
    if hashlib.sha256(text).hexdigest() != sums.get("sha256"):
        check.problems.append((CHECKSUMS_FILE, "checksum mismatch"))
        return check
    for line in text.decode("utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        if lexical_escape(rel) is not None:  # verified by checksum, but it is still a data file
            check.problems.append((rel, "names a path outside the world"))
            continue
        if not images and rel.startswith("images/"):
            continue
        try:
            status = "match" if sha256_file(root / rel) == digest else "DIFFERS"
        except FileNotFoundError:
            status = "missing"
        except OSError as exc:
            status = f"unreadable ({exc.strerror or exc})"
        check.checked[rel] = status
        if status != "match":
            check.problems.append((rel, "checksum mismatch" if status == "DIFFERS" else status))
    return check


def discard_world(root: Path) -> None:
    """Delete a world folder; renamed first, so a concurrent caller never sees half of it."""
    trash = root.parent / f".{root.name}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(root, trash)
    except FileNotFoundError:
        return  # another process got there first
    write_owner(trash)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Partial folders and their owners
# --------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a reused pid from its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def write_owner(folder: Path) -> None:
    """Record which process fills ``folder``, for :func:`clean_stale_partials`."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
             "created": time.time(), "tool": "czsl-bench synthetic"}
    (folder / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True


def _read_owner(folder: Path) -> dict | None:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def partial_is_stale(folder: Path, now: float | None = None) -> bool:
    """Whether the partial ``folder``'s owner is gone (a killed generation), so it can be removed."""
    owner = _read_owner(folder)
    if owner is not None and owner.get("host") == socket.gethostname():
        pid = owner["pid"]
        if not _pid_alive(pid):
            return True
        start = _process_start(pid)
        return owner.get("start") is not None and start is not None and start != owner["start"]
    try:
        age = (now or time.time()) - folder.stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def clean_stale_partials(parent: str | os.PathLike, require_owner: bool = False) -> list[tuple[Path, int]]:
    """Remove the partial world folders under ``parent`` whose generation died; ``(folder, bytes)``.

    ``require_owner``: only folders with an owner record count as ours (outside the synthetic
    cache, in a folder the user chose, nothing else is ever touched).
    """
    parent = Path(parent)
    removed: list[tuple[Path, int]] = []
    try:
        candidates = [p for p in parent.iterdir() if PARTIAL_RE.match(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for folder in candidates:
        if require_owner and _read_owner(folder) is None:
            continue
        if not partial_is_stale(folder):
            continue
        size = _tree_size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append((folder, size))
    return removed


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
