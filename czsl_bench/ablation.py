"""Ablation grids as a Python API (``czsl-bench ablate`` is a thin layer over it).

    from czsl_bench.ablation import run_ablation
    result = run_ablation("cluspro", "synthetic", seeds=[0, 1, 2])
    print(result.tables["closed"])        # a ResultTable; render it with czsl_bench.tables.render

A method declares its grid with ``Method.ablations()`` (name -> config overrides; aliases such as
``mu`` work). Each grid point resolves to a config; points with the same config are one
configuration (ClusPro's ``full``, ``mu-0.99`` and ``k-5``) and train once. A point may be another
registered method with the same config (``Method.ablation_equivalents()``: ClusPro's ``base`` is
``cluspro-base``), whose records it then uses. Nothing is copied: the ablation table finds each
point's records by (method, config fingerprint), so one record serves every point it equals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from czsl_bench.hashing import short_hash


@dataclass(frozen=True)
class AblationPoint:
    """One row of an ablation grid on one dataset."""

    name: str
    method: str  # whose records hold it: the method itself, or an equivalent registered method
    ablation: str | None  # what `run --ablation` to pass (None: the method's plain configuration)
    config: dict[str, Any]
    config_fingerprint: str
    runs_as: str  # the point whose run it shares (itself when it is the first of its config)


@dataclass
class AblationResult:
    points: list[AblationPoint]
    outcomes: list[Any] = field(default_factory=list)  # api.Outcome per (trained point, seed)
    tables: dict[str, Any] = field(default_factory=dict)  # setting -> ResultTable
    plot: Path | None = None

    @property
    def failed(self) -> int:
        return sum(o.error is not None for o in self.outcomes)


def ablation_grid(method: str, dataset: str, overrides: Sequence[str] | dict[str, Any] | None = (),
                  only: Iterable[str] | None = None) -> list[AblationPoint]:
    """The grid ``method`` declares, resolved for ``dataset`` (its recipe) with ``overrides``."""
    from czsl_bench.api import dataset_plugin
    from czsl_bench.config import ConfigError, config_to_dict, resolve
    from czsl_bench.registry import METHODS

    cls = METHODS.get(method)
    grid = cls.ablations()
    if not grid:
        raise ConfigError(f"method {method!r} declares no ablations; nothing to run")
    names = list(grid)
    if only:
        wanted = [n for n in only if n]
        unknown = [n for n in wanted if n not in grid]
        if unknown:
            raise ConfigError(f"unknown ablation(s) {', '.join(unknown)}; {method} has {', '.join(names)}")
        names = [n for n in names if n in wanted]
    recipe = dataset_plugin(dataset).recipe
    equivalents = getattr(cls, "ablation_equivalents", lambda: {})()
    plain = config_to_dict(resolve(cls, recipe, None, None, overrides).config)
    points: list[AblationPoint] = []
    first_of: dict[tuple[str, str], str] = {}
    for name in names:
        config = config_to_dict(resolve(cls, recipe, None, name, overrides).config)
        owner, ablation = method, name
        if config == plain:
            ablation = None
        elif name in equivalents:
            other = METHODS.get(equivalents[name])
            if config_to_dict(resolve(other, recipe, None, None, overrides).config) == config:
                owner, ablation = equivalents[name], None
        fp = short_hash(config, 8)
        runs_as = first_of.setdefault((owner, fp), name)
        points.append(AblationPoint(name, owner, ablation, config, fp, runs_as))
    return points


def run_ablation(method: str, dataset: str, seeds: int | str | Iterable[int] = (0, 1, 2), setting: str = "closed",
                 only: Iterable[str] | None = None, overrides: Sequence[str] | None = (),
                 results_dir: str | Path = "results", plot: str | Path | None = None,
                 **options: Any) -> AblationResult:
    """Train every distinct configuration of the grid (finished runs are skipped by fingerprint),
    then build the ablation table per setting and, where the method declares sweeps, the plot.
    ``options`` are :class:`~czsl_bench.api.RunOptions` fields (backbone, pretrained, device, ...);
    ``on_outcome(point, outcome)`` is called after each run."""
    from czsl_bench import api

    on_outcome = options.pop("on_outcome", None)
    points = ablation_grid(method, dataset, overrides, only)
    result = AblationResult(points)
    for point in points:
        if point.runs_as != point.name:
            continue
        opts = api.RunOptions(overrides=list(overrides or ()), ablation=point.ablation, results_dir=results_dir,
                              skip_existing=True, **options)
        specs, missing = api.plan(point.method, dataset, seeds, setting, opts.data_root)
        for name, how in missing.items():
            raise FileNotFoundError(f"dataset {name} is not on disk; {how}")
        for spec in specs:
            outcome = api.execute(spec, opts)
            result.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(point, outcome)
    records = _records(results_dir, points, dataset)
    for s in api.parse_setting(setting):
        table = ablation_table(records, method, {dataset: points}, s)
        if not table.empty:
            result.tables[s] = table
    result.plot = ablation_plot(method, dataset, records, points, plot or _default_plot(results_dir, method, dataset),
                                setting=api.parse_setting(setting)[0])
    return result


def _records(results_dir: str | Path, points: list[AblationPoint], dataset: str) -> list[Any]:
    from czsl_bench.records import RESERVED_NAMES, load_records

    owners = {p.method for p in points}
    return [r for r in load_records(results_dir, exclude=RESERVED_NAMES, on_error=lambda p, why: None)
            if r.method in owners and r.dataset == dataset]


def _default_plot(results_dir: str | Path, method: str, dataset: str) -> Path:
    return Path(results_dir) / method / dataset / "ablation-auc.png"


def point_records(records: Iterable[Any], point: AblationPoint) -> list[Any]:
    """The run records of ``point``: its method's records with its config (any variant label)."""
    return [r for r in records if r.source == "run" and r.method == point.method and r.identity
            and short_hash(r.identity.get("config"), 8) == point.config_fingerprint]


def ablation_table(records: Iterable[Any], method: str, points: dict[str, list[AblationPoint]],
                   setting: str = "closed", **kwargs: Any) -> Any:
    """The ablation table of ``method`` (one row per grid point, in grid order) from the records
    of each dataset's ``points``; published ablation rows are added with ``with_reported``."""
    from czsl_bench.tables import build_ablation_table

    records = list(records)
    labelled = []
    order: list[str] = []
    for dataset, pts in points.items():
        for point in pts:
            if point.name not in order:
                order.append(point.name)
            for rec in point_records([r for r in records if r.dataset == dataset], point):
                labelled.append((point.name, rec))
    papers = [r for r in records if r.source == "paper" and r.method == method]
    return build_ablation_table(labelled, method, setting, variant_order=order, papers=papers, **kwargs)


def ablation_plot(method: str, dataset: str, records: list[Any], points: list[AblationPoint],
                  target: str | Path, setting: str = "closed") -> Path | None:
    """The AUC-vs-sweep PNG for the sweeps the method declares (None when it declares none)."""
    from czsl_bench.plots import ablation_sweep_figure
    from czsl_bench.registry import METHODS

    sweeps = getattr(METHODS.get(method), "ablation_sweeps", lambda: {})()
    if not sweeps:
        return None
    labelled = [(p.name, r) for p in points for r in point_records(records, p)]
    try:
        return ablation_sweep_figure(labelled, method, dataset, sweeps, Path(target), setting=setting)
    except ValueError:
        return None
