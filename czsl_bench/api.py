"""The Python API behind ``czsl-bench run``: run methods on datasets, evaluate, write records.

    import czsl_bench
    record = czsl_bench.run("csp", "synthetic", seed=0)          # one RunRecord
    records = czsl_bench.run("clip,csp", "synthetic", seed=[0, 1, 2], setting="both")  # a list

One run = one (method, dataset, seed). Its steps, in order: resolve the config
(czsl_bench.config.resolve) → seed everything → load the dataset (its plugin declares the default
backbone, recipe, feasibility source and name policy) → load the backbone → build the run identity
(czsl_bench.identity) and, with ``skip_existing``, stop if a record with that fingerprint exists →
``method.prepare`` → the shared Trainer if the method trains (the epoch is chosen on closed-world
validation by the config's ``select_metric``, default AUC) → score val and test → the evaluator
(closed world: directly; open world: the feasibility threshold is searched on val and applied to
test) → one :class:`~czsl_bench.records.RunRecord` per setting, written atomically at its path
(czsl_bench.records.record_path). Training is shared by the settings of one run: ``setting="both"``
trains once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from czsl_bench.records import RunRecord

SETTINGS = ("closed", "open")
# Seeds are what np.random.seed accepts (torch takes more); seeding.seed_everything agrees.
SEED_LIMIT = 2**32
MAX_SEEDS = 1000
_SEED = re.compile(r"[0-9]+", re.ASCII)  # ASCII digits only: int() would also take "٣" or "1_0"
_SEED_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)", re.ASCII)


class RunError(RuntimeError):
    """A run failed; the message names the run and the cause on one line."""


@dataclass(frozen=True)
class RunSpec:
    """One (method, dataset, seed) and the settings to evaluate it in."""

    method: str
    dataset: str
    seed: int
    settings: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.method} on {self.dataset} (seed {self.seed}, {'+'.join(self.settings)})"


@dataclass
class RunOptions:
    """Everything about a run that is not its key (shared by all runs of one call)."""

    backbone: str | None = None
    pretrained: str | None = None
    overrides: Sequence[str] | dict[str, Any] | None = None
    config_file: str | Path | None = None
    ablation: str | None = None
    results_dir: str | Path = "results"
    skip_existing: bool = False
    resume: bool = False
    device: str = "auto"
    deterministic: bool = False
    threshold: float | None = None
    data_root: str | Path | None = None
    cache_dir: str | Path | None = None
    write: bool = True
    progress: Any = None
    eval_batch_size: int = 256
    num_workers: int | None = None  # DataLoader workers; None = fit the machine (czsl_bench.loading)
    provenance: dict[str, Any] | None = None  # added to every record's provenance (a sweep's executor)

    def __post_init__(self) -> None:
        # checked here, before any run: the threshold is only read after training
        if self.threshold is not None:
            check_threshold(self.threshold)


def check_threshold(value: Any) -> float:
    """An open-world feasibility threshold must be a finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"threshold {value!r} is not a finite number; pass e.g. 0.4069, or None to "
                         "search it on validation")
    return float(value)


@dataclass
class Outcome:
    """What happened to one :class:`RunSpec`: records, or skipped, or an error line."""

    spec: RunSpec
    records: list[RunRecord] = field(default_factory=list)
    skipped: bool = False
    error: str | None = None
    seconds: float = 0.0
    skipped_paths: list[str] = field(default_factory=list)  # the records a skip found (same fingerprint)


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
def split_names(value: str | Iterable[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]`` (order kept, duplicates dropped)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        item = str(item).strip()
        if item and item not in out:
            out.append(item)
    return out


def parse_seeds(value: int | str | Iterable[int]) -> list[int]:
    """``0``, ``"0,1,2"``, ``"0-4"`` or ``[0, 1]`` → a list of distinct seeds in ``[0, 2**32)``.

    At most :data:`MAX_SEEDS` of them: a typo such as ``0-100000`` is refused at once instead of
    planning a sweep that cannot finish.
    """
    if isinstance(value, bool):
        raise ValueError(f"seed {value!r} is not an integer")
    seeds: dict[int, None] = {}  # insertion-ordered set: order kept, duplicates dropped in O(1)

    def check(seed: int) -> int:
        if seed < 0:
            raise ValueError(f"seed {seed} is negative; seeds are integers in [0, {SEED_LIMIT - 1}]")
        if seed >= SEED_LIMIT:
            raise ValueError(f"seed {seed} is too large; seeds are integers in [0, {SEED_LIMIT - 1}] "
                             "(the range NumPy's seeding accepts)")
        return seed

    def add(seed: int) -> None:
        seeds[check(seed)] = None
        if len(seeds) > MAX_SEEDS:
            raise ValueError(f"more than {MAX_SEEDS} seeds in one call; run fewer (e.g. --seed 0-9)")

    if isinstance(value, numbers.Integral):
        add(int(value))
    elif isinstance(value, str):
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            single, span = _SEED.fullmatch(part), _SEED_RANGE.fullmatch(part)
            if single:
                add(_digits(part))
            elif span:
                lo, hi = _digits(span[1]), _digits(span[2])
                if lo > hi:
                    raise ValueError(f"seed range {part!r} is empty (LOW > HIGH); write it as {hi}-{lo}")
                if hi - lo + 1 > MAX_SEEDS:  # before expanding: a huge range must cost nothing
                    raise ValueError(f"seed range {part!r} has {hi - lo + 1} seeds, more than {MAX_SEEDS} "
                                     "in one call; run fewer (e.g. --seed 0-9)")
                check(hi)
                for seed in range(lo, hi + 1):
                    add(seed)
            elif part.startswith("-") and _SEED.fullmatch(part[1:]):
                add(-_digits(part[1:]))
            elif "-" in part[1:]:
                raise ValueError(f"seed range {part!r} is not LOW-HIGH; write e.g. --seed 0-4")
            else:
                raise ValueError(f"seed {part!r} is not an integer; write e.g. --seed 0,1,2")
    else:
        try:
            items = iter(value)
        except TypeError:
            raise ValueError(f"seed {value!r} is not an integer or a list of integers; "
                             "write e.g. 0 or [0, 1]") from None
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (numbers.Integral, str)):
                raise ValueError(f"seed {item!r} is not an integer; write e.g. [0, 1, 2]")
            if isinstance(item, str) and not _SEED.fullmatch(item.strip()):
                raise ValueError(f"seed {item!r} is not an integer; write e.g. --seed 0,1,2")
            add(_digits(item.strip()) if isinstance(item, str) else int(item))
    if not seeds:
        raise ValueError("no seed given; write e.g. --seed 0,1,2")
    return list(seeds)


def _digits(text: str) -> int:
    # int() of thousands of digits is slow and then refused with Python's own message; anything
    # this long is out of range anyway
    digits = text.lstrip("0") or "0"
    if len(digits) > 20:
        raise ValueError(f"seed {digits[:12]}... ({len(digits)} digits) is too large; seeds are integers "
                         f"in [0, {SEED_LIMIT - 1}] (the range NumPy's seeding accepts)")
    return int(digits)


def parse_setting(setting: str) -> tuple[str, ...]:
    if setting == "both":
        return SETTINGS
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r} is not closed, open or both")
    return (setting,)


def dataset_status(data_root: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(datasets present on disk, {missing dataset: how to get it}) over the DATASETS registry."""
    from czsl_bench.registry import DATASETS

    present, missing = [], {}
    for name in DATASETS.names():
        try:
            plugin = dataset_plugin(name)
        except (LookupError, TypeError, ValueError) as exc:
            missing[name] = str(exc)
            continue
        if plugin.is_available(data_root):
            present.append(name)
        else:
            missing[name] = plugin.fix_hint(data_root)
    return present, missing


def dataset_plugin(name: str) -> Any:
    """The :class:`~czsl_bench.datasets.plugin.DatasetPlugin` registered as ``name``, checked
    against the contract; a folder path gives a plugin for that folder in the standard layout."""
    from czsl_bench.datasets.plugin import folder_dataset, validate_plugin
    from czsl_bench.registry import DATASETS

    if is_dataset_path(name):
        return folder_dataset(name)
    return validate_plugin(DATASETS.get(name), name)


def is_dataset_path(name: str) -> bool:
    """``--dataset`` names a folder (rather than a registered dataset) when it looks like a path."""
    return "/" in name or "\\" in name or name.startswith(("~", "."))


def plan(method: str | Iterable[str], dataset: str | Iterable[str], seed: int | str | Iterable[int] = 0,
         setting: str = "closed", data_root: str | Path | None = None
         ) -> tuple[list[RunSpec], dict[str, str]]:
    """Expand the run grid; ``dataset="all"`` means every dataset present on disk.

    Returns the specs and, for ``all``, the datasets that were left out with how to get them.
    Unknown method or dataset names raise one line with the known names.
    """
    from czsl_bench.registry import DATASETS, METHODS

    methods = split_names(method)
    if not methods:
        raise ValueError("no method given; e.g. `czsl-bench run clip --dataset synthetic`")
    for name in methods:
        METHODS.get(name)  # unknown name → RegistryError listing the known ones
    datasets = split_names(dataset)
    missing: dict[str, str] = {}
    if datasets == ["all"]:
        datasets, missing = dataset_status(data_root)
        if not datasets:
            raise ValueError("no dataset is present on disk; `czsl-bench data prepare NAME` fetches one")
    elif not datasets:
        raise ValueError("no dataset given; e.g. --dataset synthetic")
    else:
        known = DATASETS.names()
        for name in datasets:
            if is_dataset_path(name):
                dataset_plugin(name)  # a missing folder: one line now, not per run
            elif name not in known:
                DATASETS.get(name)  # raises with close matches
    seeds = parse_seeds(seed)
    settings = parse_setting(setting)
    specs = [RunSpec(m, d, s, settings) for m in methods for d in datasets for s in seeds]
    return specs, missing


# ----------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------
def run(method: str | Iterable[str], dataset: str | Iterable[str], seed: int | str | Iterable[int] = 0,
        setting: str = "closed", backbone: str | None = None, pretrained: str | None = None,
        overrides: Sequence[str] | dict[str, Any] | None = None, results_dir: str | Path = "results",
        skip_existing: bool = False, **options: Any) -> RunRecord | list[RunRecord]:
    """Run, evaluate and record; see the module docstring.

    Returns the one :class:`RunRecord` when the call asks for exactly one (method, dataset,
    seed, setting), else the list of all records in grid order. Raises :class:`RunError` on the
    first failed run. Further keyword options: those of :class:`RunOptions` (``ablation``,
    ``resume``, ``device``, ``deterministic``, ``threshold``, ``data_root``, ``cache_dir``,
    ``config_file``, ``write``, ``progress``).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(RunOptions)}
    if unknown:
        raise TypeError(f"run() got unknown option(s) {', '.join(sorted(unknown))}")
    opts = RunOptions(backbone=backbone, pretrained=pretrained, overrides=overrides,
                      results_dir=results_dir, skip_existing=skip_existing, **options)
    specs, _ = plan(method, dataset, seed, setting, opts.data_root)
    records: list[RunRecord] = []
    for spec in specs:
        outcome = execute(spec, opts)
        if outcome.error is not None:
            raise RunError(f"{spec.describe()} failed: {outcome.error}")
        records.extend(outcome.records)
    return records[0] if len(records) == 1 else records


def execute(spec: RunSpec, opts: RunOptions) -> Outcome:
    """Run one spec; errors become ``Outcome.error`` (one line) instead of propagating."""
    started = time.perf_counter()
    try:
        records, skipped = _run_spec(spec, opts)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one run's failure must not stop a sweep; the CLI reports it
        from czsl_bench import distributed

        if distributed.current() is not None:
            raise  # [ddp] fail fast: a rank going on alone would mismatch the others' collectives
        return Outcome(spec, error=_one_line(exc), seconds=time.perf_counter() - started)
    return Outcome(spec, records, skipped=skipped, seconds=time.perf_counter() - started,
                   skipped_paths=[str(getattr(r, "source_path", "")) for r in records] if skipped else [])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if not isinstance(exc, (ValueError, LookupError, OSError)) or not msg \
        else msg


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def resolve_method_config(method_cls: Any, dataset: str, overrides: Sequence[str] | dict[str, Any] | None = None,
                          ablation: str | None = None, config_file: str | Path | None = None) -> Any:
    """The run's :class:`~czsl_bench.config.Resolved` config for ``dataset`` (a name or plugin):
    the dataset's recipe defaults < config file < ablation < ``--set``."""
    from czsl_bench.config import resolve

    plugin = dataset_plugin(dataset) if isinstance(dataset, str) else dataset
    return resolve(method_cls, plugin.recipe, config_file, ablation, overrides)


def resolve_grid(specs: Iterable[RunSpec], overrides: Sequence[str] | dict[str, Any] | None = None,
                 ablation: str | None = None, config_file: str | Path | None = None) -> dict[tuple[str, str], Any]:
    """The resolved config of every (method, dataset) of ``specs``, keyed so; raises the first
    :class:`~czsl_bench.config.ConfigError` (one line) before anything runs."""
    from czsl_bench.registry import METHODS

    out: dict[tuple[str, str], Any] = {}
    for spec in specs:
        key = (spec.method, spec.dataset)
        if key not in out:
            out[key] = resolve_method_config(METHODS.get(spec.method), spec.dataset, overrides, ablation, config_file)
    return out


def default_backbone(dataset: Any, backbone: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """The backbone of a run: explicit values, else the dataset plugin's declared default.

    ``--backbone`` alone keeps the dataset's weights tag when it names the dataset's default
    architecture and means ``openai`` otherwise; ``--pretrained none`` gives random weights.
    """
    plugin = dataset_plugin(dataset) if isinstance(dataset, str) else dataset
    default_arch, default_tag = plugin.default_backbone
    arch = backbone or default_arch
    if pretrained is not None:
        tag: str | None = pretrained
    else:
        tag = default_tag if arch == default_arch else "openai"
    return arch, (None if tag in (None, "", "none") else tag)


def load_dataset(plugin: Any, data_root: str | Path | None = None) -> Any:
    """Load ``plugin`` (a name or a plugin) from ``data_root`` (default: the plugin's root)."""
    plugin = dataset_plugin(plugin) if isinstance(plugin, str) else plugin
    return plugin.load(data_root)


def run_identity(method: str, config: Any, plugin: Any, dataset: Any, backbone: Any, arch: str,
                 tag: str | None, setting: str, seed: int, world_size: int | None = None) -> Any:
    """The :class:`~czsl_bench.identity.RunIdentity` of one run in one setting (``world_size``:
    the processes that will train it, where a planner knows better than this process's
    environment; None = this process's group)."""
    from czsl_bench.config import config_to_dict
    from czsl_bench.evaluation.metrics import PROTOCOL_VERSION
    from czsl_bench.identity import RunIdentity, weights_identity

    return RunIdentity(
        method=method, config=config_to_dict(config),
        backbone={"arch": arch, "pretrained": tag, "weights_hash": weights_identity(backbone.weights_hash, tag)},
        dataset={"name": plugin.name, "version": dataset.version}, setting=setting, seed=seed,
        protocol=PROTOCOL_VERSION, feasibility=plugin.feasibility if setting == "open" else None,
        track=_method_track(method), world_size=_world_size(method, world_size), method_version=_method_version(method),
        inputs=_method_inputs(method, config, dataset))


def _method_inputs(method: str, config: Any, dataset: Any) -> dict[str, Any]:
    """The content hashes a method declares for its own input files (``Method.identity_inputs``)."""
    from czsl_bench.registry import METHODS

    hook = getattr(METHODS.get(method), "identity_inputs", None)
    return dict(hook(config, dataset)) if callable(hook) else {}


def _method_version(method: str) -> str:
    """The code version a method declares (``Method.version``): part of the identity, so records
    of a method's older numerics are never taken for the current code's."""
    from czsl_bench.registry import METHODS

    return str(getattr(METHODS.get(method), "version", "1"))


def _world_size(method: str, planned: int | None = None) -> int:
    """[ddp] Processes that train the run together (``planned``, else this process's group); 1 for
    a method that does not train (it has nothing to split: every rank would compute the one
    single-process result)."""
    from czsl_bench import distributed
    from czsl_bench.registry import METHODS

    cls = METHODS.get(method)
    world = distributed.world_size() if planned is None else planned
    return world if cls.training_step is not _base_training_step() else 1


def _method_track(method: str) -> str:
    """The evaluation track a method declares (``Method.track``): ``inductive`` unless it adapts at
    test time; records of different tracks never share a table cell (part of the identity)."""
    from czsl_bench.registry import METHODS

    return getattr(METHODS.get(method), "track", "inductive")


def training_fingerprint(identity: Any) -> str:
    """What a checkpoint must agree with to be resumed: the identity without the evaluation
    fields (setting, protocol, feasibility), so both settings of a run share one training."""
    from czsl_bench.hashing import short_hash

    data = identity.to_dict()
    for name in ("setting", "protocol", "feasibility"):
        data.pop(name)
    return short_hash(data)


@dataclass
class PreparedRun:
    """One run up to scoring: what :func:`setup_run` and :func:`prepare_and_train` build. Used by
    the harness and by ``explain`` (which must see exactly the model a run scores)."""

    spec: RunSpec
    plugin: Any
    method_cls: Any
    resolved: Any  # czsl_bench.config.Resolved
    variant: str | None
    device: Any
    seed_info: Any
    dataset: Any
    arch: str
    tag: str | None
    backbone: Any
    cache: Any
    progress: Any
    identities: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    method: Any = None
    ctx: Any = None
    fit: Any = None

    @property
    def config(self) -> Any:
        return self.resolved.config

    @property
    def changed(self) -> dict[str, Any]:
        return changed_fields(self.resolved)


def changed_fields(resolved: Any) -> dict[str, Any]:
    """The config fields a run changed itself (config file, ablation, ``--set``), not those a
    config derived from them: what a record stores as ``overrides``, labels its row and names its
    folder with."""
    return {k: v for k, v in resolved.changed.items() if not resolved.sources[k].startswith("derived")}


def setup_run(spec: RunSpec, opts: RunOptions, lap: Any = None) -> PreparedRun:
    """Resolve the config, seed, load the dataset and the backbone, build the identity per setting."""
    from czsl_bench.backbone import resolve_device
    from czsl_bench.method import check_method_class
    from czsl_bench.registry import METHODS
    from czsl_bench.seeding import seed_everything

    lap = lap or (lambda name: None)
    method_cls = METHODS.get(spec.method)
    check_method_class(method_cls, f"method {spec.method!r}")
    plugin = dataset_plugin(spec.dataset)
    resolved = resolve_method_config(method_cls, plugin, opts.overrides, opts.ablation, opts.config_file)
    variant = opts.ablation if changed_fields(resolved) else None  # an ablation equal to the defaults is the plain run
    from czsl_bench import distributed

    device = distributed.init(resolve_device(opts.device))  # [ddp] joins torchrun's group, if any
    seed_info = seed_everything(spec.seed, opts.deterministic)
    dataset = load_dataset(plugin, opts.data_root)
    lap("load_dataset")
    arch, tag = default_backbone(plugin, opts.backbone, opts.pretrained)
    backbone = _load_backbone(arch, tag, device)
    cache = _feature_cache(opts.cache_dir)
    lap("load_backbone")
    identities = {s: run_identity(spec.method, resolved.config, plugin, dataset, backbone, arch, tag, s, spec.seed)
                  for s in spec.settings}
    return PreparedRun(spec, plugin, method_cls, resolved, variant, device, seed_info, dataset, arch, tag,
                       backbone, cache, opts.progress, identities)


def prepare_and_train(run: PreparedRun, opts: RunOptions, settings: Sequence[str], lap: Any = None) -> PreparedRun:
    """``method.prepare``, then the shared Trainer if the method trains (checkpoints keyed by the
    training fingerprint; ``opts.resume`` continues one)."""
    from czsl_bench.method import NullProgress, RunContext
    from czsl_bench.training import Trainer

    lap = lap or (lambda name: None)
    progress = run.progress or NullProgress()
    method = run.method_cls(run.config)
    ctx = RunContext(dataset_name=run.plugin.name, dataset=run.dataset, backbone=run.backbone, config=run.config,
                     seed=run.spec.seed, device=run.device, setting="+".join(settings), cache=run.cache,
                     progress=progress, eval_batch_size=opts.eval_batch_size, num_workers=opts.num_workers or 0,
                     workers=opts.num_workers,
                     name_policy=run.plugin.name_policy)
    method.prepare(ctx)
    lap("prepare")
    val_closed = ctx.split("val", "closed")

    def validate(m: Any) -> dict[str, float]:
        metrics = _metrics(_evaluate(m, ctx, val_closed))
        extra = getattr(m, "validation_metrics", None)  # e.g. a loss the method selects its epoch on
        if callable(extra):
            import torch

            with torch.no_grad():
                metrics.update({k: float(v) for k, v in extra(ctx, val_closed).items()})
        return metrics

    fit = None
    if method.trains:
        train_fp = training_fingerprint(run.identities[settings[0]])
        trainer = Trainer(device=run.device, seed=run.spec.seed, validate=validate, progress=progress,
                          checkpoint_dir=_checkpoint_dir(opts, run.spec, train_fp), resume=opts.resume,
                          fingerprint=train_fp)
        fit = trainer.fit(method, ctx)
    method.train_mode(False)
    lap("fit")
    run.method, run.ctx, run.fit = method, ctx, fit
    return run


def _run_spec(spec: RunSpec, opts: RunOptions) -> tuple[list[RunRecord], bool]:
    from czsl_bench.method import NullProgress, parameter_counts
    from czsl_bench.records import RunRecord, environment, find_existing, write_record

    timings: dict[str, float] = {}
    t_start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - clock, 3)
        clock = now

    run = setup_run(spec, opts, lap)
    existing = {}
    if opts.skip_existing:
        for s, ident in run.identities.items():
            found = find_existing(opts.results_dir, ident, run.variant, run.changed)
            if found is not None:
                existing[s] = found
    from czsl_bench import distributed

    if distributed.current() is not None:  # [ddp] rank 0's view of the disk decides for every rank
        found = distributed.broadcast_object(sorted(existing))
        existing = {s: existing.get(s) for s in found}
    todo = [s for s in spec.settings if s not in existing]
    if not todo:
        return ([existing[s] for s in spec.settings] if distributed.is_main() else []), True

    prepare_and_train(run, opts, todo, lap)
    if not distributed.is_main():
        return [], False  # [ddp] rank 0 alone evaluates and writes the record (docs/distributed.md)
    method, ctx, fit, progress = run.method, run.ctx, run.fit, run.progress or NullProgress()
    params = parameter_counts(method, run.backbone)
    base = dict(method=spec.method, dataset=run.plugin.name, seed=spec.seed, variant=run.variant,
                config=_config_dict(run.config), overrides=run.changed,
                backbone={"arch": run.arch, "pretrained": run.tag, **_backbone_info(run.backbone)},
                chosen_epoch=fit.chosen_epoch if fit is not None else None, params=params)
    env = environment(run.device)
    records: dict[str, RunRecord] = dict(existing)
    for setting in todo:
        clock = time.perf_counter()
        with progress.task(f"evaluate {setting} world (val, test)", total=1) as task:
            if setting == "closed":
                val = _evaluate(method, ctx, ctx.split("val", "closed"))
                test = _evaluate(method, ctx, ctx.split("test", "closed"))
                threshold, provenance = None, {}
            else:
                val, test, threshold, source = _evaluate_open(method, ctx, run.plugin, opts.threshold)
                provenance = {"feasibility": source}
            task.advance()
        lap(f"evaluate_{setting}")
        run_timings = {k: v for k, v in timings.items() if not k.startswith("evaluate_") or k == f"evaluate_{setting}"}
        run_timings["total"] = round(time.perf_counter() - t_start, 3)
        if fit is not None:
            run_timings.update(fit.input_timings())
        ident = run.identities[setting]
        if test.protocol != ident.protocol:
            raise RuntimeError(f"the evaluator reported protocol {test.protocol}, the identity {ident.protocol}")
        record = RunRecord(
            **base, setting=setting, protocol=test.protocol,
            metrics={"val": _metrics(val), "test": _metrics(test)},
            n_images={"val": val.n_images, "test": test.n_images},
            open_threshold=threshold, timings=run_timings, provenance={**provenance, **(opts.provenance or {})},
            identity=ident.to_dict(), fingerprint=ident.fingerprint,
            environment={**env, "seeding": {"seed": run.seed_info.seed, "deterministic": run.seed_info.deterministic},
                         "training": fit.to_dict() if fit is not None else None,
                         **({"method": info} if (info := method.record_info()) else {})},
        )
        if opts.write:
            write_record(record, opts.results_dir)
        records[setting] = record
    return [records[s] for s in spec.settings], False


@dataclass
class CellPlan:
    """What a run of one spec would produce, known before running it: the identity, record path
    and fingerprint per setting, the training checkpoint folder, and which records already exist."""

    spec: RunSpec
    variant: str | None
    identities: dict[str, Any]  # setting -> RunIdentity
    paths: dict[str, Path]  # setting -> where its record is written
    existing: dict[str, bool]  # setting -> a record with that fingerprint is there
    checkpoint: Path | None  # the Trainer's folder (None: the method does not train)

    @property
    def done(self) -> bool:
        return all(self.existing.values())


def identify(specs: Sequence[RunSpec], opts: RunOptions, loaded: dict[Any, Any] | None = None,
             world_size: int | None = None) -> list[CellPlan]:
    """The :class:`CellPlan` of each spec, as :func:`execute` would compute it, without running:
    each dataset and backbone is loaded once (on the CPU: the weights hash does not depend on the
    device), so planning a grid costs one load per dataset and backbone, not one per cell.
    ``loaded`` keeps those loads across calls (an ablation grid plans one call per point).
    ``world_size``: [ddp] the processes each run will train on (the Slurm executor's
    ``--nproc-per-task``; None = this process's group); above 1, a method that does not train or
    a ``batch_size`` not divisible by it is a :class:`ValueError` (one line)."""
    from czsl_bench.records import find_existing, record_path
    from czsl_bench.registry import METHODS

    loaded = {} if loaded is None else loaded
    datasets: dict[str, Any] = loaded.setdefault("datasets", {})
    backbones: dict[tuple[str, str | None], Any] = loaded.setdefault("backbones", {})
    plans = []
    for spec in specs:
        method_cls = METHODS.get(spec.method)
        plugin = dataset_plugin(spec.dataset)
        resolved = resolve_method_config(method_cls, plugin, opts.overrides, opts.ablation, opts.config_file)
        explicit = changed_fields(resolved)
        variant = opts.ablation if explicit else None
        if spec.dataset not in datasets:
            datasets[spec.dataset] = load_dataset(plugin, opts.data_root)
        arch, tag = default_backbone(plugin, opts.backbone, opts.pretrained)
        if (arch, tag) not in backbones:
            backbones[(arch, tag)] = _load_backbone(arch, tag, "cpu")
        trains = method_cls.training_step is not _base_training_step()
        if world_size is not None and world_size > 1:
            _check_world(spec.method, trains, resolved.config, world_size)
        identities = {s: run_identity(spec.method, resolved.config, plugin, datasets[spec.dataset],
                                      backbones[(arch, tag)], arch, tag, s, spec.seed, world_size)
                      for s in spec.settings}
        checkpoint = (_checkpoint_dir(opts, spec, training_fingerprint(identities[spec.settings[0]]))
                      if trains else None)
        plans.append(CellPlan(
            spec, variant, identities,
            paths={s: record_path(opts.results_dir, i, variant, explicit) for s, i in identities.items()},
            existing={s: find_existing(opts.results_dir, i, variant, explicit) is not None
                      for s, i in identities.items()},
            checkpoint=checkpoint))
    return plans


def _check_world(method: str, trains: bool, config: Any, world: int) -> None:
    """[ddp] A run planned on ``world`` processes must train and split its global batch evenly."""
    if not trains:
        raise ValueError(f"{method} does not train, so it has nothing to split over {world} processes; "
                         "run it with --nproc-per-task 1 (in a sweep of its own)")
    batch = getattr(config, "batch_size", None)
    if isinstance(batch, int) and batch % world:
        raise ValueError(f"{method}: batch_size {batch} is the global batch of a run on {world} processes and "
                         f"must be divisible by {world}; choose e.g. --set batch_size="
                         f"{max(world, batch - batch % world)}")


def _base_training_step() -> Any:
    from czsl_bench.method import Method

    return Method.training_step


def _config_dict(config: Any) -> dict[str, Any]:
    from czsl_bench.config import config_to_dict

    return config_to_dict(config)


def _checkpoint_dir(opts: RunOptions, spec: RunSpec, fingerprint: str) -> Path | None:
    """``<results>/.checkpoints/<method>/<dataset>/<training fingerprint>``: a checkpoint of another
    configuration, backbone, weights or dataset version can never sit at this run's path."""
    if not opts.write:
        return None
    return Path(opts.results_dir) / ".checkpoints" / spec.method / dataset_plugin(spec.dataset).name / fingerprint


def _metrics(result: Any) -> dict[str, float]:
    from czsl_bench.records import METRICS

    out = {}
    for name in METRICS:
        value = getattr(result, name, None)
        if value is not None:
            out[name] = float(value)
    return out


def _evaluate(method: Any, ctx: Any, split: Any) -> Any:
    """Score ``split`` with ``method`` and run the evaluator (dense or streamed)."""
    import torch

    from czsl_bench.evaluation import evaluate, evaluate_stream

    from czsl_bench.distributed import local_only

    with torch.no_grad(), local_only():  # [ddp] rank 0 scores alone
        scores = method.score(ctx, split)
    if isinstance(scores, torch.Tensor):
        _check_shape(scores, split, method)
        return evaluate(scores.float().cpu(), split.labels, split.seen_mask, split.candidate_mask,
                        split.pair_attr, split.pair_obj)
    return evaluate_stream(scores, split.labels, split.seen_mask, split.candidate_mask,
                           split.pair_attr, split.pair_obj, n_pairs=len(split.pairs))


def _check_shape(scores: Any, split: Any, method: Any) -> None:
    expected = (len(split), len(split.pairs))
    if tuple(scores.shape) != expected:
        raise ValueError(f"method {method.name!r} returned scores of shape {tuple(scores.shape)} for "
                         f"{split.name}/{split.world}; expected {expected} (images x pairs)")


def _evaluate_open(method: Any, ctx: Any, plugin: Any, threshold: float | None) -> tuple[Any, Any, float, str]:
    """Open world: search the feasibility threshold on val, apply it to test (docs/evaluation.md)."""
    from czsl_bench.evaluation.feasibility import open_world_splits

    val_split, test_split = ctx.split("val", "open"), ctx.split("test", "open")
    feasibility, source = open_world_feasibility(plugin, ctx.dataset, ctx.backbone, test_split)
    out = open_world_splits(_score_source(method, ctx, val_split), val_split,
                            _score_source(method, ctx, test_split), test_split, feasibility,
                            threshold=threshold)
    return out.val, out.test, float(out.threshold), source


def _score_source(method: Any, ctx: Any, split: Any) -> Any:
    """A dense tensor, or a re-iterable block source (the reducer may re-read a few rows)."""
    import torch

    from czsl_bench.distributed import local_only

    with torch.no_grad(), local_only():  # [ddp] rank 0 scores alone
        scores = method.score(ctx, split)
    if isinstance(scores, torch.Tensor):
        _check_shape(scores, split, method)
        return scores.float().cpu()

    def blocks():
        with torch.no_grad(), local_only():
            yield from method.score(ctx, split)

    return blocks


def open_world_feasibility(plugin: Any, dataset: Any, backbone: Any, split: Any) -> tuple[Any, str]:
    """The feasibility vector over ``split.pairs`` (attr-major open world) and where it came from,
    as the dataset plugin declares it.

    ``glove-reference``: the GloVe vectors of CSP/Troika/ClusPro shipped for MIT-States, UT-Zappos
    and C-GQA (the papers' numbers depend on them). ``backbone-token-embeddings``: the same
    CompCos formula over the backbone's mean token embeddings of the cleaned names (PLID's
    CLIP-embedding option); never the dataset's true feasibility, which would leak the answer.
    """
    import torch

    from czsl_bench.evaluation.feasibility import compute_feasibility, reference_feasibility
    from czsl_bench.names import clean_name

    name = plugin.name
    if plugin.feasibility == "glove-reference":
        feas = reference_feasibility(name)
        if len(feas) != len(split.pairs):
            raise ValueError(f"the reference feasibility of {name} has {len(feas)} pairs but the open world "
                             f"has {len(split.pairs)}; is the dataset copy the standard one? (czsl-bench data check {name})")
        return feas, "glove-reference"
    clean = lambda n: clean_name(n, plugin.name_policy)  # noqa: E731
    with torch.no_grad():
        attr_emb = backbone.word_embedding([clean(a) for a in dataset.attrs]).float().cpu()
        obj_emb = backbone.word_embedding([clean(o) for o in dataset.objs]).float().cpu()
    seen = torch.nonzero(split.seen_mask).squeeze(1)
    seen_pairs = list(zip(split.pair_attr[seen].tolist(), split.pair_obj[seen].tolist()))
    return compute_feasibility(attr_emb, obj_emb, seen_pairs), "backbone-token-embeddings"


def _load_backbone(arch: str, tag: str | None, device: Any) -> Any:
    from czsl_bench.backbone import load_backbone

    return load_backbone(arch, tag, device)


def _feature_cache(cache_dir: str | Path | None) -> Any:
    try:
        from czsl_bench.cache import FeatureCache
    except ImportError:
        return None
    return FeatureCache(cache_dir) if cache_dir is not None else FeatureCache()


def _backbone_info(backbone: Any) -> dict[str, Any]:
    info = {}
    for name in ("weights_hash",):
        value = getattr(backbone, name, None)
        if value is not None:
            info[name] = value() if callable(value) else value
    return info
