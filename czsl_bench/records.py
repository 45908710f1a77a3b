"""Run records: one JSON file per run identity (czsl_bench.identity).

A record holds everything needed to read a result later without the code that produced it: its
identity (method, resolved config, backbone and weights hash, dataset version, setting, seed,
protocol, feasibility source, track) and that identity's fingerprint, metrics on validation and
test, the chosen epoch and open-world threshold, timings, parameter counts and the environment.
Published numbers from papers use the same schema with ``source: "paper"`` and a citation
(``results/reported/``), so tables treat both alike; they have no identity.

Paths are human-readable and deterministic::

    <results>/<method>/<dataset>/<arch>-<tag>/<setting>/seed<k>.json                 recipe defaults
    <results>/<method>/<dataset>/<arch>-<tag>/<setting>/<variant|custom>-<cfg8>/seed<k>.json

Files are written atomically (temp file, fsync, ``os.replace``). A record already at the path
with another fingerprint is never overwritten: it is kept beside as ``seed<k>.<fp8>.json``.
Schema version 1 records (keyed by method, variant, dataset, setting, seed only) are read and
migrated in memory, with what they could not know left ``null`` and said in ``notes``; ``czsl-bench
records migrate`` rewrites them. The JSON Schema for external tools ships as
``czsl_bench/data/run_record.schema.json``; ``docs/results.md`` documents every field.

Metrics are fractions in [0, 1] (tables multiply by 100), keyed by split and then by the
evaluator's names: ``best_seen``, ``best_unseen``, ``best_hm``, ``auc``, ``attr_acc``, ``obj_acc``,
``hm_seen``, ``hm_unseen``, ``bias``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable, Iterable

SCHEMA_VERSION = 2

SETTINGS = ("closed", "open")
SPLITS = ("val", "test")
SOURCES = ("run", "paper")

# The evaluator's metric names; all but `bias` (a calibration offset) are accuracies in [0, 1].
METRICS = ("best_seen", "best_unseen", "best_hm", "auc", "attr_acc", "obj_acc", "hm_seen", "hm_unseen", "bias")
HIGHER_IS_BETTER = {name: True for name in METRICS if name != "bias"}
FRACTION_METRICS = tuple(name for name in METRICS if name != "bias")

# Folder names under results/ that are not method names: the papers' published rows and the
# project's committed reference runs (never written by a user's run).
RESERVED_NAMES = ("reported", "reference")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# The packages whose versions change results; recorded in every run's environment.
TRACKED_PACKAGES = ("czsl-bench", "torch", "torchvision", "open_clip_torch", "numpy", "scipy", "pandas")


class RecordError(ValueError):
    """A record is malformed: missing or ill-typed fields, or an unknown schema version."""


@dataclass
class RunRecord:
    """One run (or one published row) of one method on one dataset in one setting.

    ``seed`` is None for published rows, which report a mean over ``n_seeds`` runs (with
    ``metrics_std`` where the paper gives it). ``variant`` names an ablation (``None`` = the
    method as published). ``config``, ``environment`` and ``timings`` are free-form mappings whose
    keys are documented in ``docs/results.md``.
    """

    method: str
    dataset: str
    setting: str
    seed: int | None
    metrics: dict[str, dict[str, float]]
    variant: str | None = None
    source: str = "run"
    protocol: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    backbone: dict[str, Any] = field(default_factory=dict)
    metrics_std: dict[str, dict[str, float]] = field(default_factory=dict)
    n_seeds: int | None = None
    n_images: dict[str, int] = field(default_factory=dict)
    chosen_epoch: int | None = None
    open_threshold: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    citation: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields changed from the recipe
    created: str = field(default_factory=lambda: _utc_now())
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`RecordError` with one line naming the bad field and what it must be."""
        for name in ("method", "dataset"):
            check_name(getattr(self, name), name)
        if self.variant is not None:
            check_name(self.variant, "variant")
        if self.setting not in SETTINGS:
            raise RecordError(f"setting is {self.setting!r}; it must be one of {', '.join(SETTINGS)}")
        if self.source not in SOURCES:
            raise RecordError(f"source is {self.source!r}; it must be one of {', '.join(SOURCES)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise RecordError(f"seed is {self.seed!r}; it must be a non-negative int (or null for published rows)")
        if self.source == "run" and self.seed is None:
            raise RecordError("a run record needs a seed; only published rows (source 'paper') may omit it")
        if self.source == "paper" and not self.citation:
            raise RecordError("a published row (source 'paper') needs a citation")
        if not isinstance(self.schema_version, int) or self.schema_version < 1:
            raise RecordError(f"schema_version is {self.schema_version!r}; it must be a positive int")
        if self.schema_version > SCHEMA_VERSION:
            raise RecordError(
                f"schema_version {self.schema_version} is newer than this czsl-bench understands "
                f"({SCHEMA_VERSION}); upgrade czsl-bench to read it"
            )
        _check_metrics(self.metrics, "metrics", require_split=True)
        _check_metrics(self.metrics_std, "metrics_std", require_split=False)
        for split_name, std_values in self.metrics_std.items():
            missing = set(std_values) - set(self.metrics.get(split_name, {}))
            if missing:
                raise RecordError(f"metrics_std.{split_name} has {sorted(missing)} without a mean in metrics")
        if self.open_threshold is not None and not _is_number(self.open_threshold):
            raise RecordError(f"open_threshold is {self.open_threshold!r}; it must be a number or null")
        if self.chosen_epoch is not None and (isinstance(self.chosen_epoch, bool) or not isinstance(self.chosen_epoch, int)):
            raise RecordError(f"chosen_epoch is {self.chosen_epoch!r}; it must be an int or null")
        if self.source == "run" and self.schema_version >= 2:
            if not self.identity:
                raise RecordError("a run record needs an identity (schema 2); is it a published row?")
            from czsl_bench.identity import RunIdentity

            try:
                ident = RunIdentity.from_dict(self.identity)
            except ValueError as exc:
                raise RecordError(str(exc)) from None
            if self.fingerprint != ident.fingerprint:
                raise RecordError(f"fingerprint {self.fingerprint!r} does not match its identity "
                                  f"({ident.fingerprint}): the file was edited; re-run it")
            if (ident.method, ident.setting, ident.seed) != (self.method, self.setting, self.seed):
                raise RecordError("identity names another method, setting or seed than the record")
        for mapping_name in ("config", "backbone", "n_images", "timings", "params", "environment",
                             "provenance", "identity", "overrides"):
            if not isinstance(getattr(self, mapping_name), dict):
                raise RecordError(f"{mapping_name} must be a JSON object, got {type(getattr(self, mapping_name)).__name__}")
        for key, value in self.params.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RecordError(f"params.{key} is {value!r}; it must be a non-negative int")
        for key, value in self.timings.items():
            if not _is_number(value) or value < 0:
                raise RecordError(f"timings.{key} is {value!r}; it must be a non-negative number of seconds")

    # -- identity -------------------------------------------------------------------------------
    @property
    def key(self) -> tuple:
        """What makes two records the same result: the fingerprint for runs; (method, variant,
        dataset, setting, source) for published rows."""
        if self.source == "run":
            return ("run", self.fingerprint)
        return (self.method, self.variant, self.dataset, self.setting, self.seed, self.source)

    @property
    def run_identity(self):
        """The :class:`~czsl_bench.identity.RunIdentity` of a run record (None for paper rows)."""
        from czsl_bench.identity import RunIdentity

        return RunIdentity.from_dict(self.identity) if self.identity else None

    @property
    def group_fingerprint(self) -> str | None:
        """The identity without the seed: records sharing it are seeds of one configuration."""
        ident = self.run_identity
        return ident.group_fingerprint if ident is not None else None

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, keys in a stable order (schema_version first)."""
        data = {"schema_version": self.schema_version}
        for f in dataclasses.fields(self):
            if f.name != "schema_version":
                data[f.name] = getattr(self, f.name)
        data["higher_is_better"] = {m: HIGHER_IS_BETTER[m] for m in METRICS if m in HIGHER_IS_BETTER}
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """The record as JSON text (NaN and infinities are refused: JSON has no such numbers)."""
        try:
            return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False,
                              default=_json_default) + "\n"
        except ValueError as exc:
            raise RecordError(f"record {self.describe()} holds a value JSON cannot store: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """Build and validate a record from a parsed JSON object."""
        if not isinstance(data, dict):
            raise RecordError(f"a record must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        data.pop("higher_is_better", None)  # derived, written for external readers
        if "schema_version" not in data:
            raise RecordError("schema_version is missing; is this a czsl-bench run record?")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:  # before migrating: a schema-1 file missing fields says which, not a KeyError
            raise RecordError(f"missing field(s) {', '.join(missing)}")
        if data["schema_version"] == 1:
            data = migrate_v1(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecordError(f"unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise RecordError(str(exc)) from None

    @classmethod
    def from_json(cls, text: str) -> "RunRecord":
        """Parse and validate a record from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
        except RecursionError:
            raise RecordError("not a record: JSON nested too deeply to read") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        variant = f"[{self.variant}]" if self.variant else ""
        seed = f"seed {self.seed}" if self.seed is not None else self.source
        return f"{self.method}{variant} on {self.dataset} ({self.setting}, {seed})"


# -- validation helpers ----------------------------------------------------------------------------


def check_name(value: Any, what: str) -> str:
    """A method/dataset/variant name must be a safe single path component."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise RecordError(
            f"{what} {value!r} is not a valid name: use letters, digits and . _ + - "
            "(no slashes or spaces, not starting with a dot)"
        )
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metrics(metrics: Any, where: str, require_split: bool) -> None:
    if not isinstance(metrics, dict):
        raise RecordError(f"{where} must be a JSON object of split -> metric -> value")
    if require_split and not metrics:
        raise RecordError(f"{where} is empty; a record needs metrics for at least one of {', '.join(SPLITS)}")
    for split_name, values in metrics.items():
        if split_name not in SPLITS:
            raise RecordError(f"{where} has split {split_name!r}; splits are {', '.join(SPLITS)}")
        if not isinstance(values, dict):
            raise RecordError(f"{where}.{split_name} must be a JSON object of metric -> value")
        for name, value in values.items():
            if name not in METRICS:
                raise RecordError(f"{where}.{split_name} has unknown metric {name!r}; known: {', '.join(METRICS)}")
            if not _is_number(value):
                raise RecordError(f"{where}.{split_name}.{name} is {value!r}; it must be a finite number")
            if name in FRACTION_METRICS and not 0.0 <= value <= 1.0:
                raise RecordError(
                    f"{where}.{split_name}.{name} is {value}; metrics are fractions in [0, 1] "
                    "(divide percentages by 100)"
                )


def _json_default(value: Any) -> Any:
    # numpy / torch scalars and paths sneak into configs and metrics; store them as plain JSON.
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        from czsl_bench.config import config_to_dict

        return config_to_dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# -- schema 1 -> 2 -----------------------------------------------------------------------------------


def migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record as schema 2, in memory: its identity built from what it stored.

    Schema 1 kept no dataset version (``identity.dataset.version`` stays null) and no list of
    changed config fields; ``notes`` says so. A migrated record's fingerprint therefore differs
    from a fresh run's until ``czsl-bench records migrate --dataset-version`` fills the version in.
    """
    from czsl_bench.identity import RunIdentity, weights_identity

    data = dict(data)
    data["schema_version"] = SCHEMA_VERSION
    if data.get("source", "run") != "run":
        return data
    backbone = data.get("backbone") or {}
    provenance = data.get("provenance") or {}
    try:
        ident = RunIdentity(
            method=data["method"], config=data.get("config") or {},
            backbone={"arch": backbone.get("arch"), "pretrained": backbone.get("pretrained"),
                      "weights_hash": weights_identity(backbone.get("weights_hash"), backbone.get("pretrained"))},
            dataset={"name": data["dataset"], "version": None}, setting=data["setting"], seed=data["seed"],
            protocol=data.get("protocol"),
            feasibility=provenance.get("feasibility") if data["setting"] == "open" else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"schema 1 record cannot be migrated: {exc}") from None
    unknown = ident.unknown_fields()
    note = f"migrated from schema 1; unknown: {', '.join(unknown) or 'nothing'}"
    data["identity"] = ident.to_dict()
    data["fingerprint"] = ident.fingerprint
    data["notes"] = f"{data['notes']}; {note}" if data.get("notes") else note
    data["provenance"] = {**provenance, "migrated_from_schema": 1}
    return data


# -- paths ------------------------------------------------------------------------------------------


def record_path(results_dir: str | Path, identity: Any, variant: str | None = None,
                overrides: dict[str, Any] | None = None) -> Path:
    """Where the record of ``identity`` (a :class:`~czsl_bench.identity.RunIdentity`) lives.

    ``<results_dir>/<method>/<dataset>/<arch>-<tag>/<setting>/seed<k>.json`` when the config is
    the recipe's defaults (``overrides`` empty); otherwise a folder ``<variant>-<cfg8>`` (or
    ``custom-<cfg8>``) named by the config's short fingerprint before ``seed<k>.json``.
    """
    from czsl_bench.identity import backbone_label

    method, dataset = identity.method, identity.dataset.get("name")
    check_name(method, "method")
    check_name(dataset, "dataset")
    if method in RESERVED_NAMES:
        raise RecordError(f"method name {method!r} is reserved for results/{method}/; rename the method")
    if identity.setting not in SETTINGS:
        raise RecordError(f"setting is {identity.setting!r}; it must be one of {', '.join(SETTINGS)}")
    seed = identity.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RecordError(f"seed is {seed!r}; it must be a non-negative int")
    bb = re.sub(r"[^A-Za-z0-9._+-]", "-", backbone_label(identity.backbone))
    base = Path(results_dir) / method / dataset / bb / identity.setting
    if overrides:
        label = check_name(variant, "variant") if variant else "custom"
        base = base / f"{label}-{identity.config_fingerprint}"
    return base / f"seed{seed}.json"


def reported_path(reported_dir: str | Path, method: str, dataset: str, setting: str,
                  variant: str | None = None) -> Path:
    """Where a published row lives: ``<reported_dir>/<method>__<dataset>__<setting>.json``, with
    ``__<variant>`` before ``.json`` for a published ablation row."""
    check_name(method, "method")
    check_name(dataset, "dataset")
    if setting not in SETTINGS:
        raise RecordError(f"setting is {setting!r}; it must be one of {', '.join(SETTINGS)}")
    suffix = f"__{check_name(variant, 'variant')}" if variant is not None else ""
    return Path(reported_dir) / f"{method}__{dataset}__{setting}{suffix}.json"


def path_for(record: RunRecord, results_dir: str | Path) -> Path:
    """The deterministic path of ``record`` under ``results_dir`` (runs) or itself (paper rows)."""
    if record.source == "paper":
        return reported_path(results_dir, record.method, record.dataset, record.setting, record.variant)
    return record_path(results_dir, record.run_identity, record.variant, record.overrides)


# -- writing and reading ----------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so readers see the old file or the complete new one, never half
    (:mod:`czsl_bench.atomic`: temp file in the target folder, fsync, rename, umask honoured)."""
    from czsl_bench.atomic import atomic_write_text as write

    return write(path, text)


def write_record(record: RunRecord, results_dir: str | Path) -> Path:
    """Validate ``record`` and write it atomically at its deterministic path; returns the path.

    A record already there that is another run (another fingerprint) is kept, renamed to
    ``seed<k>.<its fp8>.json``; one written by a newer czsl-bench (a newer schema) is never
    touched: :class:`RecordError` says which version wrote it.
    """
    record.validate()
    path = path_for(record, results_dir)
    existing = _peek(path)
    if existing is not None:
        version = existing.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            wrote = ((existing.get("environment") or {}).get("packages") or {}).get("czsl-bench", "a newer version")
            raise RecordError(f"refusing to overwrite {path}: it is a schema {version} record written by "
                              f"czsl-bench {wrote}; this czsl-bench writes schema {SCHEMA_VERSION}. "
                              "Upgrade czsl-bench or use another --results-dir")
        old_fp = existing.get("fingerprint")
        if record.source == "run" and old_fp and old_fp != record.fingerprint:
            keep = path.with_name(f"{path.stem}.{str(old_fp)[:8]}.json")
            os.replace(path, keep)
            warnings.warn(f"{path} held another run (fingerprint {old_fp}); kept it as {keep.name}", stacklevel=2)
    atomic_write_text(path, record.to_json())
    object.__setattr__(record, "source_path", path)
    return path


def _peek(path: Path) -> dict[str, Any] | None:
    """The raw JSON object at ``path`` (None when absent or unreadable): what a writer checks."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_record(path: str | Path) -> RunRecord:
    """Read one record; a malformed file raises :class:`RecordError` naming the file."""
    path = Path(path)
    try:
        record = _read(path)
    except RecordError as exc:
        raise RecordError(f"{path}: {exc}") from None
    object.__setattr__(record, "source_path", path)
    return record


def _read(path: Path) -> RunRecord:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecordError("not UTF-8 text") from None
    try:
        return RunRecord.from_json(text)
    except RecursionError:
        # json recurses per nesting level: a damaged or hostile file ("[" x 200,000) must be one
        # unreadable record, not a crash that ends `table` or a whole --skip-existing sweep
        raise RecordError("JSON nested too deeply to be a run record") from None


def migrate_file(path: Path, results_dir: str | Path, dataset_versions: dict[str, str | None] | None = None,
                 data_root: str | Path | None = None, dry_run: bool = False) -> tuple[Path | None, str]:
    """Rewrite one schema-1 record as schema 2 under ``results_dir``; (new path or None if it is
    not schema 1, a note). ``dataset_versions`` (a memo dict) fills the dataset version in from
    the copy loadable now; None leaves it unknown."""
    from czsl_bench.identity import RunIdentity

    raw = _peek(Path(path))
    if raw is None or raw.get("schema_version") != 1 or raw.get("source", "run") != "run":
        return None, "not a schema 1 run record"
    record = read_record(path)
    if "record copied, not re-run" in (record.notes or ""):
        # schema-1 `ablate` copied a record for every grid point with the same config; schema 2
        # finds a point's records by config, so the copy is redundant (its original is migrated)
        if not dry_run:
            os.unlink(path)
        return None, "redundant copy removed"
    note = "dataset version unknown"
    if dataset_versions is not None:
        name = record.dataset
        if name not in dataset_versions:
            from czsl_bench.api import load_dataset

            try:
                dataset_versions[name] = load_dataset(name, data_root).version
            except Exception as exc:  # noqa: BLE001 - the dataset may simply not be here
                raise RecordError(f"cannot load dataset {name} to fill its version in ({exc})") from None
        data = record.identity | {"dataset": {"name": name, "version": dataset_versions[name]}}
        ident = RunIdentity.from_dict(data)
        record = dataclasses.replace(
            record, identity=ident.to_dict(), fingerprint=ident.fingerprint,
            notes=(record.notes or "").replace("unknown: dataset.version",
                                               "dataset.version filled in at migration from the copy on disk"))
        note = f"dataset version {dataset_versions[name]}"
    if record.variant is not None:
        # schema 1 stored no list of changed fields; an ablation's are what its declaration changes
        changed = _ablation_overrides(record)
        record = dataclasses.replace(record, overrides=changed, variant=record.variant if changed else None)
    new_path = path_for(record, results_dir)
    if not dry_run:
        write_record(record, results_dir)
        if Path(path).resolve() != new_path.resolve():
            os.unlink(path)
    return new_path, note


def _ablation_overrides(record: RunRecord) -> dict[str, Any]:
    from czsl_bench.api import changed_fields, dataset_plugin
    from czsl_bench.config import resolve
    from czsl_bench.registry import METHODS

    try:
        resolved = resolve(METHODS.get(record.method), dataset_plugin(record.dataset).recipe, None, record.variant)
    except Exception as exc:  # noqa: BLE001 - without the plugin the change is unknown
        raise RecordError(f"cannot resolve ablation {record.variant!r} of {record.method} ({exc})") from None
    return changed_fields(resolved)


def find_existing(results_dir: str | Path, identity: Any, variant: str | None = None,
                  overrides: dict[str, Any] | None = None) -> RunRecord | None:
    """The record of exactly ``identity`` (same fingerprint) at its path, or None:
    what ``--skip-existing`` asks before running."""
    path = record_path(results_dir, identity, variant, overrides)
    try:
        record = read_record(path)
    except (OSError, RecordError):
        return None
    if record.fingerprint != identity.fingerprint:
        return None
    object.__setattr__(record, "source_path", path)
    return record


def _warn_skip(path: Path, reason: str) -> None:
    warnings.warn(f"skipping malformed record {path}: {reason}", stacklevel=3)


def load_records(
    directory: str | Path,
    *,
    exclude: Iterable[str] = (),
    on_error: Callable[[Path, str], None] | None = None,
) -> list[RunRecord]:
    """Every record under ``directory`` (recursive ``*.json``), sorted by path.

    A malformed file is reported through ``on_error(path, one_line_reason)`` (default: a
    warning) and skipped, so one bad file never hides the others. Folder names in ``exclude``
    directly under ``directory`` (e.g. ``"reported"``), hidden files and hidden folders are not
    read. A missing directory gives an empty list.
    """
    directory = Path(directory)
    report = on_error or _warn_skip
    excluded = {directory / name for name in exclude}
    records: list[RunRecord] = []
    if not directory.is_dir():
        return records
    for path in sorted(directory.rglob("*.json")):
        relative = path.relative_to(directory)
        if any(parent in excluded for parent in path.parents) or any(part.startswith(".") for part in relative.parts):
            continue  # temp files and hidden folders (e.g. results/.checkpoints) hold no records
        try:
            record = _read(path)
        except (OSError, RecordError, RecursionError) as exc:
            report(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        object.__setattr__(record, "source_path", path)  # not serialised: where it was read from
        records.append(record)
    return records


# -- environment ------------------------------------------------------------------------------------


def package_versions(packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed version of each package, or "not installed"."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision(path: str | Path | None = None) -> dict[str, Any]:
    """The commit of the checkout holding ``path`` (default: this package) and whether it is dirty.

    Gives ``{"commit": "unknown", "dirty": None}`` outside a git checkout or without git.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=20,
        )
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def describe_device(device: Any = None) -> dict[str, Any]:
    """The compute device: ``{"type": "cuda", "name": "NVIDIA H100 ...", "cuda": "12.8"}`` or cpu.

    Imports torch only if it is already imported (a run has it loaded; the CLI's cheap paths
    must not pay for it).
    """
    info: dict[str, Any] = {"type": "cpu", "name": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is None:
        if device is not None:
            info["type"] = str(device)
        return info
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    info["type"] = dev.type
    info["torch_threads"] = torch.get_num_threads()
    info.update(_cpu_kernels(torch))
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["count"] = torch.cuda.device_count()
    info["deterministic"] = bool(torch.are_deterministic_algorithms_enabled())
    return info


def _cpu_kernels(torch: Any) -> dict[str, Any]:
    """What decides which CPU kernels torch runs, so two records that differ in the last digits
    can be told apart (docs/results.md, Reproducibility): the CPU model, the instruction set torch
    dispatches to, and the BLAS / oneDNN builds it carries."""
    info: dict[str, Any] = dict(_cpu_model())
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        pass
    try:
        config = torch.__config__.show()
    except (AttributeError, RuntimeError):
        return info
    for key, pattern in (("blas", r"(Intel\(R\) oneAPI Math Kernel Library Version \S+|OpenBLAS[^\n,]*)"),
                         ("onednn", r"MKL-DNN (v[\d.]+)")):
        match = re.search(pattern, config)
        if match:
            info[key] = match.group(1).strip()
    return info


def _cpu_model() -> dict[str, str]:
    """``cpu_model`` and ``cpu_vendor`` (MKL picks other kernels on AMD than on Intel).
    platform.processor() is empty on most Linux systems; /proc/cpuinfo names the part."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "vendor_id") and key not in fields:
                    fields[key] = value.strip()
                if len(fields) == 2:
                    break
    except OSError:
        pass
    out = {"cpu_model": fields.get("model name") or platform.processor() or platform.machine()}
    if "vendor_id" in fields:
        out["cpu_vendor"] = fields["vendor_id"]
    return out


def environment(device: Any = None) -> dict[str, Any]:
    """What produced a run: package versions, git revision, device, Python and platform."""
    return {
        "packages": package_versions(),
        "git": git_revision(),
        "device": describe_device(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- schema file -------------------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a record file, as shipped in ``czsl_bench/data/run_record.schema.json``."""
    text = resources.files("czsl_bench").joinpath("data/run_record.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
