"""The Python API behind ``czsl-bench run``: run methods on datasets, evaluate, write records.

    import czsl_bench
    record = czsl_bench.run("csp", "synthetic", seed=0)          # one RunRecord
    records = czsl_bench.run("clip,csp", "synthetic", seed=[0, 1, 2], setting="both")  # a list

One run = one (method, dataset, seed). Its steps, in order: seed everything → load the dataset
(DATASETS registry) → load the backbone → ``method.prepare`` → ``method.fit`` (shared Trainer;
the epoch is chosen on closed-world validation by the config's ``select_metric``, default AUC)
→ score val and test → the evaluator (closed world: directly; open world: the feasibility
threshold is searched on val and applied to test) → one :class:`~czsl_bench.records.RunRecord`
per setting, written atomically at ``<results_dir>/<method>/<dataset>/<setting>/seed<k>.json``.
Training is shared by the settings of one run: ``setting="both"`` trains once.
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
DEFAULT_BACKBONE = ("ViT-L-14-quickgelu", "openai")
# The embedded world ships its own tiny backbone so every path runs offline on a CPU.
EMBEDDED_BACKBONES = {"synthetic": ("czsl-tiny-vit", "synthetic")}


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
    num_workers: int = 0

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
            plugin = DATASETS.get(name)
        except LookupError as exc:
            missing[name] = str(exc)
            continue
        if name in EMBEDDED_BACKBONES or getattr(plugin, "embedded", False):
            present.append(name)  # generated on first use: always available
            continue
        ok, how = _is_present(plugin, data_root)
        if ok:
            present.append(name)
        else:
            missing[name] = how
    return present, missing


def _is_present(plugin: Any, data_root: str | Path | None) -> tuple[bool, str]:
    available = getattr(plugin, "is_available", None)
    if callable(available):
        return bool(available(data_root)), _fix_hint(plugin, data_root)
    resolve = getattr(plugin, "resolve_root", None)
    if callable(resolve):
        root = Path(resolve(data_root))
        if root.is_dir() and any(root.iterdir()):
            return True, ""
        return False, _fix_hint(plugin, data_root)
    return True, ""  # a plugin that cannot tell: try it, a failure is then reported per run


def _fix_hint(plugin: Any, data_root: str | Path | None) -> str:
    hint = getattr(plugin, "fix_hint", None)
    resolve = getattr(plugin, "resolve_root", None)
    if callable(hint) and callable(resolve):
        return hint(Path(resolve(data_root)))
    return "see docs/datasets.md"


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
            if name not in known:
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
    from czsl_bench.records import is_finished, read_record, record_path

    started = time.perf_counter()
    paths = {s: record_path(opts.results_dir, spec.method, spec.dataset, s, spec.seed, opts.ablation)
             for s in spec.settings}
    if opts.skip_existing and all(is_finished(p) for p in paths.values()):
        return Outcome(spec, [read_record(p) for p in paths.values()], skipped=True)
    todo = tuple(s for s in spec.settings if not (opts.skip_existing and is_finished(paths[s])))
    try:
        records = _run_spec(dataclasses.replace(spec, settings=todo), opts)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one run's failure must not stop a sweep; the CLI reports it
        return Outcome(spec, error=_one_line(exc), seconds=time.perf_counter() - started)
    done = {r.setting: r for r in records}
    ordered = [done[s] if s in done else read_record(paths[s]) for s in spec.settings]
    return Outcome(spec, ordered, seconds=time.perf_counter() - started)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if not isinstance(exc, (ValueError, LookupError, OSError)) or not msg \
        else msg


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def resolve_method_config(method_cls: Any, dataset: str, overrides: Sequence[str] | dict[str, Any] | None,
                          ablation: str | None = None, config_file: str | Path | None = None) -> Any:
    """defaults(dataset) < config file < ablation overrides < ``--set`` overrides."""
    from czsl_bench.config import ConfigError, apply_values, parse_overrides, resolve_config

    cfg = resolve_config(method_cls.Config, dataset, (), config_file)
    if ablation is not None:
        variants = method_cls.ablations()
        if ablation not in variants:
            known = ", ".join(sorted(variants)) or "none"
            raise ConfigError(f"method {method_cls.name!r} has no ablation {ablation!r}; known: {known}")
        cfg = apply_values(cfg, variants[ablation])
    if overrides:
        values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides), method_cls.Config)
        cfg = apply_values(cfg, values)
    return cfg


def default_backbone(dataset: str, backbone: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """The backbone of a run: explicit values, else the dataset's embedded one, else ViT-L/14 OpenAI.

    ``--backbone`` alone keeps the dataset's weights tag when it names the dataset's default
    architecture and means ``openai`` otherwise; ``--pretrained none`` gives random weights.
    """
    default_arch, default_tag = EMBEDDED_BACKBONES.get(dataset, DEFAULT_BACKBONE)
    arch = backbone or default_arch
    if pretrained is not None:
        tag: str | None = pretrained
    else:
        tag = default_tag if arch == default_arch else "openai"
    return arch, (None if tag in (None, "", "none") else tag)


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def load_dataset(name: str, data_root: str | Path | None = None) -> Any:
    from czsl_bench.registry import DATASETS

    plugin = DATASETS.get(name)
    if hasattr(plugin, "load"):
        return plugin.load(data_root)
    if callable(plugin):
        return plugin(data_root)
    raise TypeError(f"dataset plugin {name!r} has no load(root)")


def _run_spec(spec: RunSpec, opts: RunOptions) -> list[RunRecord]:
    import torch

    from czsl_bench.config import config_to_dict
    from czsl_bench.method import NullProgress, RunContext, check_method_class, parameter_counts
    from czsl_bench.records import RunRecord, environment, write_record
    from czsl_bench.registry import METHODS
    from czsl_bench.seeding import seed_everything
    from czsl_bench.training import Trainer

    timings: dict[str, float] = {}
    t_start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - clock, 3)
        clock = now

    method_cls = METHODS.get(spec.method)
    check_method_class(method_cls, f"method {spec.method!r}")
    config = resolve_method_config(method_cls, spec.dataset, opts.overrides, opts.ablation, opts.config_file)
    progress = opts.progress or NullProgress()
    device = resolve_device(opts.device)
    seed_info = seed_everything(spec.seed, opts.deterministic)

    dataset = load_dataset(spec.dataset, opts.data_root)
    lap("load_dataset")
    arch, tag = default_backbone(spec.dataset, opts.backbone, opts.pretrained)
    backbone = _load_backbone(arch, tag, device)
    cache = _feature_cache(opts.cache_dir)
    lap("load_backbone")

    method = method_cls(config)
    ctx = RunContext(dataset_name=spec.dataset, dataset=dataset, backbone=backbone, config=config,
                     seed=spec.seed, device=device, setting="+".join(spec.settings), cache=cache,
                     progress=progress, eval_batch_size=opts.eval_batch_size, num_workers=opts.num_workers)
    method.prepare(ctx)
    lap("prepare")

    val_closed = ctx.split("val", "closed")

    def validate(m: Any) -> dict[str, float]:
        return _metrics(_evaluate(m, ctx, val_closed))

    ctx.trainer = Trainer(device=device, seed=spec.seed, validate=validate, progress=progress,
                          checkpoint_dir=_checkpoint_dir(opts, spec), resume=opts.resume)
    fit = method.fit(ctx)
    method.train_mode(False)
    lap("fit")

    params = parameter_counts(method, backbone)
    base = dict(method=spec.method, dataset=spec.dataset, seed=spec.seed, variant=opts.ablation,
                config=config_to_dict(config),
                backbone={"arch": arch, "pretrained": tag, **_backbone_info(backbone)},
                chosen_epoch=fit.chosen_epoch if fit is not None else None, params=params)
    env = environment(device)
    records: list[RunRecord] = []
    for setting in spec.settings:
        clock = time.perf_counter()
        with progress.task(f"evaluate {setting} world (val, test)", total=1) as task:
            if setting == "closed":
                val = _evaluate(method, ctx, val_closed)
                test = _evaluate(method, ctx, ctx.split("test", "closed"))
                threshold, provenance = None, {}
            else:
                val, test, threshold, source = _evaluate_open(method, ctx, opts.threshold)
                provenance = {"feasibility": source}
            task.advance()
        lap(f"evaluate_{setting}")
        run_timings = {k: v for k, v in timings.items() if not k.startswith("evaluate_") or k == f"evaluate_{setting}"}
        run_timings["total"] = round(time.perf_counter() - t_start, 3)
        record = RunRecord(
            **base, setting=setting, protocol=test.protocol,
            metrics={"val": _metrics(val), "test": _metrics(test)},
            n_images={"val": val.n_images, "test": test.n_images},
            open_threshold=threshold, timings=run_timings, provenance=provenance,
            environment={**env, "seeding": {"seed": seed_info.seed, "deterministic": seed_info.deterministic},
                         "training": fit.to_dict() if fit is not None else None},
        )
        if opts.write:
            write_record(record, opts.results_dir)
        records.append(record)
    return records


def _checkpoint_dir(opts: RunOptions, spec: RunSpec) -> Path | None:
    if not opts.write:
        return None
    variant = f"-{opts.ablation}" if opts.ablation else ""
    return Path(opts.results_dir) / ".checkpoints" / f"{spec.method}{variant}" / spec.dataset / f"seed{spec.seed}"


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

    with torch.no_grad():
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


def _evaluate_open(method: Any, ctx: Any, threshold: float | None) -> tuple[Any, Any, float, str]:
    """Open world: search the feasibility threshold on val, apply it to test (spec-evaluator §5.3)."""
    from czsl_bench.evaluation.feasibility import open_world_splits

    val_split, test_split = ctx.split("val", "open"), ctx.split("test", "open")
    feasibility, source = open_world_feasibility(ctx.dataset_name, ctx.dataset, ctx.backbone, test_split)
    out = open_world_splits(_score_source(method, ctx, val_split), val_split,
                            _score_source(method, ctx, test_split), test_split, feasibility,
                            threshold=threshold)
    return out.val, out.test, float(out.threshold), source


def _score_source(method: Any, ctx: Any, split: Any) -> Any:
    """A dense tensor, or a re-iterable block source (the reducer may re-read a few rows)."""
    import torch

    with torch.no_grad():
        scores = method.score(ctx, split)
    if isinstance(scores, torch.Tensor):
        _check_shape(scores, split, method)
        return scores.float().cpu()

    def blocks():
        with torch.no_grad():
            yield from method.score(ctx, split)

    return blocks


def open_world_feasibility(name: str, dataset: Any, backbone: Any, split: Any) -> tuple[Any, str]:
    """The feasibility vector over ``split.pairs`` (attr-major open world) and where it came from.

    MIT-States, UT-Zappos and C-GQA use the GloVe vectors of CSP/Troika/ClusPro (the papers'
    numbers depend on them). Other datasets (the synthetic world, third-party plugins) get the
    same CompCos formula over the backbone's mean token embeddings of the cleaned names (PLID's
    CLIP-embedding option); never the dataset's true feasibility, which would leak the answer.
    """
    import torch

    from czsl_bench.evaluation.feasibility import REFERENCE_SHA256, compute_feasibility, reference_feasibility

    if name in REFERENCE_SHA256:
        feas = reference_feasibility(name)
        if len(feas) != len(split.pairs):
            raise ValueError(f"the reference feasibility of {name} has {len(feas)} pairs but the open world "
                             f"has {len(split.pairs)}; is the dataset copy the standard one? (czsl-bench data check {name})")
        return feas, "glove-reference"
    clean = lambda n: n.replace(".", " ").lower()  # noqa: E731  (the repos' name cleaning)
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
