"""The method contract: what a CZSL method plugin implements, and what the harness hands it.

A method is a class with a ``name``, a typed ``Config`` dataclass and two steps::

    prepare(ctx)        build text banks, read cached features, create parameters
    score(ctx, split)   [N images, P pairs] float logits, or an iterator of (col_start, block)

A trainable method adds the Trainer hooks (``train_dataset``, ``training_step``); the harness
then trains it with the shared Trainer (training.py) between the two steps.

plus two optional extras, ``ablations()`` (named config overrides) and ``explain()``.
The harness (``czsl_bench.api``) owns everything else: seeding, dataset and backbone loading,
feature caches, evaluation, model selection, records. Methods never compute metrics, never
write files and never parse arguments. The full walk-through is ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch

from czsl_bench.config import at_least, check_config

Scores = torch.Tensor | Iterator[tuple[int, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Progress: library code reports, only the CLI draws (docs/architecture.md: the CLI draws, the API reports)
# ---------------------------------------------------------------------------------------------
class ProgressTask(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def update(self, *, description: str | None = None, total: int | None = None) -> None: ...


class Progress(Protocol):
    """Reporter handed to methods and the trainer; the CLI supplies a rich-backed one."""

    def task(self, description: str, total: int | None = None) -> Any:
        """A context manager yielding a :class:`ProgressTask`."""


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, *, description: str | None = None, total: int | None = None) -> None:
        pass


class NullProgress:
    """Reports nothing: the default for the Python API and for tests."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[_NullTask]:
        yield _NullTask()


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Fields the shared Trainer reads. A trainable method's Config inherits from this.

    ``select_metric`` names the validation metric used to pick the epoch (an evaluator field such
    as ``auc``, ``best_hm``, ``best_unseen``; higher is better), or ``last`` for the final epoch.
    """

    epochs: int = at_least(0, 10)
    batch_size: int = at_least(1, 64)
    grad_accum: int = at_least(1, 1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    adam_eps: float = 1e-8
    scheduler: Literal["none", "step", "cosine"] = "none"
    step_size: int = at_least(0, 0)  # StepLR period in epochs; 0 = max(epochs // 5, 1) as in PLID
    gamma: float = 0.5
    max_grad_norm: float = 0.0  # 0 = no clipping
    amp: bool = True  # mixed precision, CUDA only
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    val_every: int = at_least(1, 1)  # validate every k epochs (and always after the last one)
    select_metric: str = "auc"
    num_workers: int = at_least(0, 0)

    def __post_init__(self) -> None:
        check_config(self)  # finite floats and the at_least minimums, also for configs built in Python
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class NoConfig:
    """Config of a method without settings."""

    @classmethod
    def defaults(cls, dataset: str) -> NoConfig:
        return cls()


# ---------------------------------------------------------------------------------------------
# The run context
# ---------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """Everything a method may use during one run. Built by the harness, never by a method.

    ``image_features(split)`` is the cached, frozen-encoder path that CLIP-style methods use for
    both training and evaluation; methods that tune the image encoder read images through
    ``split.dataset(transform)`` instead.
    """

    dataset_name: str
    dataset: Any  # czsl_bench.datasets.czsl_format.CZSLDataset
    backbone: Any  # czsl_bench.backbone.Backbone
    config: Any  # the method's resolved Config instance
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    setting: str = "closed"
    cache: Any = None  # czsl_bench.cache.FeatureCache or None (features recomputed)
    progress: Any = field(default_factory=NullProgress)
    eval_batch_size: int = 256
    num_workers: int = 0  # workers of the loaders a method builds itself (0 = the main process)
    workers: int | None = None  # `--workers`: the harness's loaders; None = fit the machine (czsl_bench.loading)
    name_policy: str = "dots"  # the dataset plugin's (czsl_bench.names)
    _features: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)
    _decoded_images: dict[str, Any] = field(default_factory=dict, repr=False)

    def clean_name(self, name: str) -> str:
        """A primitive name as prompt words, under the dataset's name policy."""
        from czsl_bench.names import clean_name

        return clean_name(name, self.name_policy)

    def split(self, name: str, world: str = "closed") -> Any:
        """The dataset's split ``name`` in ``world`` (memoised by the dataset)."""
        return self.dataset.split(name, world)

    def train_images(self, split: Any) -> torch.utils.data.Dataset:
        """The training images of ``split`` for the Trainer: decoded once (the decoded-image
        cache), the backbone's training augmentation applied per batch on ``device``; the same
        tensors and random draws as ``split.dataset(backbone.preprocess_train)``
        (czsl_bench/image_data.py, docs/methods.md "Input pipeline")."""
        from czsl_bench.image_data import train_images

        return train_images(self, split)

    def eval_batches(self, split: Any, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(images, labels, indices)`` batches of ``split`` in order on ``device``, with the
        backbone's evaluation transform: the tensors of ``split.dataset(backbone.preprocess_eval)``,
        read from the decoded-image cache."""
        from czsl_bench.image_data import eval_batches

        return eval_batches(self, split, batch_size)

    def image_features(self, split: Any) -> torch.Tensor:
        """``[N, D]`` float32 image features of ``split`` from the frozen image encoder (CPU).

        Read from the feature cache when one is configured (keyed by backbone, transform and the
        split's images), computed once otherwise; either way memoised for this run.
        """
        key = (split.name, "eval")
        if key not in self._features:
            # A DataLoader draws its base seed from the global RNG: without the fork, a cache hit
            # (no loader) and a miss would leave training on different random streams.
            with torch.random.fork_rng(devices=[]):
                self._features[key] = _image_features(self, split)
        return self._features[key]


def _image_features(ctx: RunContext, split: Any) -> torch.Tensor:
    from czsl_bench.loading import loader_settings

    workers = loader_settings(ctx.device, ctx.workers, decodes=True, items=len(split)).num_workers
    if ctx.cache is None:
        return encode_split_images(ctx.backbone, split, ctx.device, ctx.eval_batch_size,
                                   workers, ctx.progress)
    from czsl_bench.features import split_image_features

    with ctx.progress.task(f"image features: {split.name}", total=len(split)) as task:
        done_so_far = [0]

        def report(done: int, total: int) -> None:
            task.advance(done - done_so_far[0])
            done_so_far[0] = done

        feats = split_image_features(ctx.backbone, split, ctx.cache, ctx.eval_batch_size,
                                     workers, report)
    return feats.float().cpu()


@torch.no_grad()
def encode_split_images(backbone: Any, split: Any, device: torch.device, batch_size: int = 256,
                        num_workers: int = 0, progress: Any = None) -> torch.Tensor:
    """Encode every image of ``split`` with the backbone's eval transform (no cache)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(split.dataset(backbone.preprocess_eval), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    out = []
    progress = progress or NullProgress()
    with progress.task(f"encode {split.name} images", total=len(loader)) as task:
        for images, _, _ in loader:
            out.append(backbone.encode_image(images.to(device)).float().cpu())
            task.advance()
    return torch.cat(out) if out else torch.empty(0, 0)


# ---------------------------------------------------------------------------------------------
# The Method base class
# ---------------------------------------------------------------------------------------------
class Method:
    """Base class of every method plugin. Subclass, set ``name`` and ``Config``, implement
    :meth:`score` (and :meth:`prepare`); for training implement the three Trainer hooks
    :meth:`train_dataset`, :meth:`training_step` and :meth:`parameters`.

    The instance lives for one run: the harness creates it with the resolved config, calls
    ``prepare``, trains it with the shared Trainer if it has a ``training_step``, then ``score``s
    val and test.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    #: ``inductive`` (test images are scored independently, as every method here) or
    #: ``transductive`` (adapts at test time); part of the run identity.
    track: ClassVar[str] = "inductive"
    #: The method's code version, part of the run identity (``method_version``): bump it when a
    #: change alters the method's numbers (same config, seed and data, other results), so records
    #: of the old code get other fingerprints and are never skipped, averaged or resumed as new.
    #: A subclass inherits it: one that does not share the changed code sets its own.
    version: ClassVar[str] = "1"
    #: True when the image encoder stays frozen; the harness then asserts it is not trained.
    frozen_image_encoder: ClassVar[bool] = True

    def __init__(self, config: Any = None):
        self.config = config if config is not None else _call_defaults(self.Config, "synthetic")  # the embedded recipe

    # -- the three steps ------------------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        """Build what scoring and training need (text banks, cached features, parameters)."""

    def score(self, ctx: RunContext, split: Any) -> Scores:
        """``[len(split), len(split.pairs)]`` float scores, larger = more likely.

        For large open worlds return an iterator of ``(col_start, block)`` with ``block`` of shape
        ``[N, b]`` covering columns ``col_start : col_start + b``; blocks must tile the columns in
        order. Do not mask candidates or add biases: the evaluator does that.
        """
        raise NotImplementedError(f"method {self.name!r} does not implement score()")

    # -- optional extras ------------------------------------------------------------------------
    @classmethod
    def ablations(cls) -> dict[str, dict[str, Any]]:
        """Named variants: ``{"no-dropout": {"attr_dropout": 0.0}}``; run with ``--ablation``."""
        return {}

    def validation_metrics(self, ctx: RunContext, split: Any) -> dict[str, float]:
        """Extra numbers the harness adds to each validation's metrics (higher is better), so that
        ``select_metric`` can name them: VP-CMJL's released selection rule is a validation loss
        (docs/vpcmjl.md). They go into the training history, not into the record's metrics."""
        return {}

    def explain(self, ctx: RunContext, split: Any, index: int, top: int = 5) -> dict[str, Any]:
        """A JSON-ready account of why image ``index`` of ``split`` got its top pairs."""
        raise NotImplementedError(f"method {self.name!r} has no explain()")

    @classmethod
    def identity_inputs(cls, config: Any, dataset: Any) -> dict[str, Any]:
        """Content hashes of the files this configuration reads besides the dataset (e.g. a
        description bank: ``{"text_bank": sha256}``). They enter the run identity, so a run with
        another bank is another result; paths do not (they go into :meth:`record_info`)."""
        return {}

    def record_info(self) -> dict[str, Any]:
        """JSON-ready facts about this run that the record keeps under ``environment.method``
        (e.g. which description bank was read and how many pairs fell back); ``{}`` = none."""
        return {}

    # -- Trainer hooks ----------------------------------------------------------------------------
    @property
    def trains(self) -> bool:
        """Whether this method has a training step (i.e. overrides :meth:`training_step`)."""
        return type(self).training_step is not Method.training_step

    def train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        """The training examples; the Trainer batches and shuffles them (seeded per epoch)."""
        raise NotImplementedError(f"method {self.name!r} trains but has no train_dataset()")

    def training_step(self, ctx: RunContext, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch (the Trainer does backward, accumulation and steps)."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules holding this method's own state (not the frozen backbone).

        The defaults of :meth:`parameters`, :meth:`state_dict` and :meth:`train_mode` use them.
        Override to return e.g. ``[self.prompt]``.
        """
        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters (``requires_grad``) handed to the optimizer."""
        seen: set[int] = set()
        out = []
        for module in self.modules():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to restore this method (its modules' state)."""
        out: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.modules()):
            for key, value in module.state_dict().items():
                out[f"{i}.{key}"] = value
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, module in enumerate(self.modules()):
            prefix = f"{i}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def train_mode(self, on: bool) -> None:
        """Switch dropout & co. on (training) or off (scoring)."""
        for module in self.modules():
            module.train(on)


def _call_defaults(config_cls: type, dataset: str) -> Any:
    defaults = getattr(config_cls, "defaults", None)
    return defaults(dataset) if defaults is not None else config_cls()


def check_method_class(cls: Any, where: str = "") -> None:
    """Raise one clear line when ``cls`` does not satisfy the method contract."""
    label = where or getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{label} is not a czsl_bench.method.Method subclass")
    if not cls.name:
        raise TypeError(f"{label} has no `name`; set name = 'my-method'")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{label}.Config must be a dataclass")
    if cls.score is Method.score:
        raise TypeError(f"{label} does not implement score(ctx, split)")


def parameter_counts(method: Method, backbone: Any) -> dict[str, int]:
    """``{"trainable": ..., "total": ...}``: method parameters plus the (frozen) backbone."""
    trainable = {id(p): p.numel() for p in method.parameters()}
    total = dict(trainable)
    for module in method.modules() + _backbone_modules(backbone):
        for p in module.parameters():
            total.setdefault(id(p), p.numel())
    return {"trainable": int(sum(trainable.values())), "total": int(sum(total.values()))}


def _backbone_modules(backbone: Any) -> list[torch.nn.Module]:
    if isinstance(backbone, torch.nn.Module):
        return [backbone]
    model = getattr(backbone, "model", None)
    return [model] if isinstance(model, torch.nn.Module) else []


def iter_column_blocks(n_cols: int, block: int) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` column ranges of width ``block`` covering ``range(n_cols)``."""
    for start in range(0, n_cols, max(block, 1)):
        yield start, min(start + block, n_cols)


__all__ = [
    "Method", "RunContext", "TrainConfig", "NoConfig", "Progress", "NullProgress", "Scores",
    "check_method_class", "parameter_counts", "encode_split_images", "iter_column_blocks",
]
