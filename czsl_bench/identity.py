"""Run identity: everything that changes a run's numbers, and its canonical fingerprint.

A record is the same result as another exactly when their identities are equal. The identity
holds the method and its fully resolved config (every field, defaults included), the backbone
(architecture, weights tag and the hash of the loaded weights), the dataset (name and content
version: a hash of its vocabulary, split pairs and split image lists), the setting, the seed,
the evaluator's protocol version, the open-world feasibility source, the evaluation track
(``inductive`` for every method here; a test-time-adaptive method would say ``transductive``) and
the content hashes of input files a method reads besides the dataset (``inputs``: PLID's
description bank; absent for methods without any).

The method also declares a code version (``Method.version``, ``method_version`` here): a change
to a method's numerics bumps it, so every record of the older code gets another fingerprint and
is never skipped, averaged or resumed as if it were the new one.

What is *not* in it: the variant (ablation) name, which only labels a configuration (ClusPro's
``full``, ``mu-0.99`` and ``k-5`` are one configuration), paths, timings and the environment
(package versions and the machine are recorded beside it; docs/results.md says how far they
move the numbers).

``fingerprint`` hashes the whole identity; ``group_fingerprint`` leaves out the seed: records
that share it are seeds of one configuration and the only ones a table may average.
Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from czsl_bench.hashing import canonical_json, short_hash

IDENTITY_VERSION = 2  # 2: method_version (identity v1 records are read as method_version "1")
#: ``Method.version`` of every method before versions were recorded (identity version 1).
DEFAULT_METHOD_VERSION = "1"
TRACKS = ("inductive", "transductive")
UNKNOWN = None  # a field a migrated (schema v1) record could not know


@dataclass(frozen=True)
class RunIdentity:
    """Everything that changes the numbers of one run (see the module docstring)."""

    method: str
    config: dict[str, Any]
    backbone: dict[str, Any]  # {"arch", "pretrained", "weights_hash"}
    dataset: dict[str, Any]  # {"name", "version"}
    setting: str
    seed: int
    protocol: str | None
    feasibility: str | None = None  # open world only
    track: str = "inductive"
    world_size: int = 1  # processes that trained it together (data-parallel); 1 = one process
    method_version: str = DEFAULT_METHOD_VERSION  # Method.version: the method's code version
    version: int = IDENTITY_VERSION
    # content hashes of the method's own input files (``Method.identity_inputs``), e.g. PLID's
    # description bank {"text_bank": sha256}; left out of the dict when empty, so records of
    # methods without such inputs keep the fingerprints they always had
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.track not in TRACKS:
            raise ValueError(f"track is {self.track!r}; it must be one of {', '.join(TRACKS)}")
        if not isinstance(self.method_version, str) or not self.method_version:
            raise ValueError(f"method_version is {self.method_version!r}; it must be a non-empty string")
        if self.version != IDENTITY_VERSION:
            raise ValueError(f"identity version is {self.version!r}; this czsl-bench reads version "
                             f"{IDENTITY_VERSION} (older ones are migrated when a record is read)")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not data["inputs"]:
            data.pop("inputs")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunIdentity":
        if not isinstance(data, dict):
            raise ValueError(f"identity must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"identity has unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"identity: {exc}") from None

    @property
    def fingerprint(self) -> str:
        """Hash of the whole identity: equal fingerprints, equal numbers (same machine)."""
        return short_hash(self.to_dict())

    @property
    def group_fingerprint(self) -> str:
        """Hash of the identity without the seed: the records a table may average."""
        return short_hash(self.without_seed())

    @property
    def config_fingerprint(self) -> str:
        """Hash of the method config alone (names a non-default configuration's folder)."""
        return short_hash(self.config, 8)

    def without_seed(self) -> dict[str, Any]:
        data = self.to_dict()
        data.pop("seed")
        return data

    def unknown_fields(self) -> list[str]:
        """Dotted names of the fields a migrated record could not know (value None)."""
        return [name for name, value in flatten(self.to_dict()).items()
                if value is UNKNOWN and name not in _OPTIONAL]

    def describe_backbone(self) -> str:
        return backbone_label(self.backbone)


# Random weights are drawn from the run seed (the harness seeds before it loads the backbone), so
# they are a function of (arch, seed), both already in the identity; their hash would differ per
# seed and keep the seeds of one random-weight configuration from ever sharing a table cell. The
# record's `backbone.weights_hash` still holds the hash of the weights a run actually used.
RANDOM_INIT = "random-init-from-run-seed"


def weights_identity(weights_hash: str | None, pretrained: str | None) -> str | None:
    """What the identity says about the weights: their hash, or :data:`RANDOM_INIT` for random ones."""
    return RANDOM_INIT if pretrained is None else weights_hash


# Fields whose None is a real value, not a gap: no feasibility in the closed world, random weights.
_OPTIONAL = {"feasibility", "backbone.pretrained"}


def upgrade_identity(data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """An identity dict of an older identity version as the current one: (dict, note or None).

    Version 1 had no ``method_version``; every method was at its first code version then, so a
    version-1 identity is the same run as a version-2 one with ``method_version`` ``"1"``. A
    method whose numerics have since changed declares a later version, so its old records get
    fingerprints that no new run has.
    """
    if not isinstance(data, dict) or data.get("version", IDENTITY_VERSION) != 1:
        return data, None
    if "method_version" in data:
        raise ValueError("identity version 1 has no method_version field; the file was edited")
    upgraded = {**data, "method_version": DEFAULT_METHOD_VERSION, "version": IDENTITY_VERSION}
    return upgraded, (f"identity v1 read as v{IDENTITY_VERSION}: method_version taken as "
                      f"{DEFAULT_METHOD_VERSION!r} (written before method versions were recorded)")


def backbone_label(backbone: dict[str, Any]) -> str:
    """``arch-tag`` (``arch-random`` for random weights; a path tag is reduced to its file stem)."""
    arch = str(backbone.get("arch") or "unknown")
    tag = backbone.get("pretrained")
    if tag is None:
        tag = "random"
    tag = str(tag)
    if "/" in tag or "\\" in tag:
        tag = "file-" + tag.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0]
    return f"{arch}-{tag}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key in sorted(value):
            out.update(flatten(value[key], f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = value
    return out


def differing_fields(identities: list[dict[str, Any]]) -> list[str]:
    """Dotted field names whose values are not the same in all ``identities``."""
    flat = [flatten(i) for i in identities]
    names = sorted(set().union(*flat)) if flat else []
    return [n for n in names if len({canonical_json(f.get(n)) for f in flat}) > 1]
