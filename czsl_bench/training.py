"""The shared trainer: one loop for every trainable method.

It reads the training fields of the method's config (:class:`czsl_bench.method.TrainConfig`):
epochs, optimizer, scheduler, batch size, gradient accumulation, AMP (CUDA only), gradient
clipping, validation period and the model-selection metric. Around the method's
``training_step`` it adds

* a guard: a batch whose loss is NaN/inf is skipped (no backward) and counted, and an
  optimizer step whose gradients are not finite is skipped and counted;
* a checkpoint after every epoch (atomic write) holding parameters, optimizer, scheduler, AMP
  scaler, RNG states, history and the best state so far; ``resume=True`` continues from it and
  reaches the same final numbers as an uninterrupted run with the same seed (data order is a
  pure function of (seed, epoch), RNG states are restored);
* model selection: the harness passes ``validate(method) -> metrics``; the epoch with the best
  ``select_metric`` (default ``auc``) is restored at the end and recorded;
* the input pipeline: one DataLoader for the whole fit, set up by czsl_bench.loading (workers,
  pinned memory, persistent workers, prefetch); a dataset's ``device_transform`` (the decoded-image
  path, czsl_bench/image_data.py) turns each batch into the step's input on the device, the next
  batch in a background thread while this one's backward runs (``loading.BatchFeed``); every
  epoch records how long the steps waited for data and how long they computed, and the progress
  bar says when training is input-bound (docs/methods.md, "Input pipeline").

The trainer never evaluates by itself and never writes anything but its checkpoint.

Under torchrun (several processes, one run) the ``[ddp]`` hooks below hand the step to
:mod:`czsl_bench.distributed`: each rank trains on its slice of the single-process global batch,
DistributedDataParallel averages the gradients, rank 0 alone validates and writes the checkpoint,
and ``resume`` broadcasts rank 0's checkpoint (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from czsl_bench import distributed
from czsl_bench.atomic import atomic_file
from czsl_bench.method import Method, NullProgress, RunContext, TrainConfig
from czsl_bench.loading import BatchFeed, loader_settings, pure_items
from czsl_bench.seeding import hash_seed, loader_generator, worker_init_fn

CHECKPOINT_VERSION = 1
_TRAIN_STREAM = 0x7EA1
LAST = "last.pt"
# Above this share of step time spent waiting for data the progress bar says so (docs/methods.md).
INPUT_BOUND_SHARE = 0.2

Validate = Callable[[Method], dict[str, float]]


@dataclass
class EpochLog:
    epoch: int  # 1-based
    train_loss: float  # mean over finite batches (nan when none)
    batches: int
    skipped_nonfinite: int
    lr: float
    seconds: float
    val: dict[str, float] | None = None
    diagnostics: dict[str, float] | None = None  # method.epoch_diagnostics(), when it has one
    # seconds the steps waited for their batch (loader, copy to the device, batch transform) and
    # spent computing (forward, backward, optimizer); validation is in neither
    data_seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def data_share(self) -> float:
        busy = self.data_seconds + self.compute_seconds
        return self.data_seconds / busy if busy > 0 else 0.0


@dataclass
class FitResult:
    """What training produced; the harness copies it into the run record."""

    epochs: int  # epochs trained in total (including ones before a resume)
    chosen_epoch: int  # the epoch whose state was restored (0 = the untrained state)
    select_metric: str
    best_value: float | None
    nonfinite_steps: int  # batches skipped for a non-finite loss or gradient
    resumed_from: int | None  # epoch the run resumed after, None if it started fresh
    history: list[EpochLog] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN/inf, e.g. the loss of an epoch whose batches were all skipped, → None)."""
        return _finite_or_none(asdict(self))

    def input_timings(self) -> dict[str, float]:
        """``fit_data_wait`` / ``fit_compute``: seconds summed over the history (a resumed run
        counts the epochs before the resume too); the record's ``timings`` carry them."""
        data = sum(h.data_seconds for h in self.history)
        compute = sum(h.compute_seconds for h in self.history)
        return {"fit_data_wait": round(data, 3), "fit_compute": round(compute, 3)}


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def train_config(method: Method) -> TrainConfig:
    """The method's config viewed as a :class:`TrainConfig` (missing fields take defaults)."""
    cfg = method.config
    if isinstance(cfg, TrainConfig):
        return cfg
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: getattr(cfg, k) for k in names if hasattr(cfg, k)})


def config_fingerprint(method: Method, seed: int) -> str:
    """Hash of what a checkpoint must agree with to be resumed: method, config, seed."""
    from czsl_bench.config import config_to_dict

    try:
        cfg = config_to_dict(method.config)
    except TypeError:
        cfg = repr(method.config)
    blob = json.dumps({"method": method.name, "config": cfg, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Trainer:
    """Runs the training loop of a :class:`Method` (see the module docstring).

    ``stop_after`` ends training after that many epochs *in total* without finishing, as an
    interrupted job would (tests use it to check resuming).
    """

    def __init__(self, *, device: torch.device | str = "cpu", seed: int = 0,
                 validate: Validate | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 resume: bool = False, progress: Any = None, stop_after: int | None = None,
                 fingerprint: str | None = None):
        self.device = torch.device(device)
        self.seed = seed
        self.validate = validate
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = resume
        self.progress = progress or NullProgress()
        self.stop_after = stop_after
        # what a checkpoint must match to be resumed; the harness passes the run identity's
        # (method, config, backbone + weights, dataset version, seed); else method, config, seed
        self.fingerprint = fingerprint
        self.dist = distributed.current()  # [ddp] None for a single process
        self._step_fn: Callable[[Any], torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------
    def fit(self, method: Method, ctx: RunContext) -> FitResult:
        cfg = train_config(method)
        params = method.parameters()
        if not params:
            raise ValueError(f"method {method.name!r} has a training_step but no trainable parameters")
        optimizer = _make_optimizer(cfg, params)
        scheduler = _make_scheduler(cfg, optimizer)
        use_amp = cfg.amp and self.device.type == "cuda"
        amp_dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

        fingerprint = self.fingerprint or config_fingerprint(method, self.seed)
        history: list[EpochLog] = []
        best_value: float | None = None
        best_epoch = 0
        best_state: dict[str, torch.Tensor] | None = None
        nonfinite = 0
        start_epoch = 0
        resumed_from = None

        if self.resume:
            ckpt = self._load_checkpoint(fingerprint)
            if ckpt is not None:
                method.load_state_dict(ckpt["method"])
                optimizer.load_state_dict(ckpt["optimizer"])
                if scheduler is not None and ckpt["scheduler"] is not None:
                    scheduler.load_state_dict(ckpt["scheduler"])
                if ckpt["scaler"]:
                    scaler.load_state_dict(ckpt["scaler"])
                _set_rng_state(ckpt["rng"])
                history = [EpochLog(**h) for h in json.loads(ckpt["history"])]
                best_value = ckpt["best_value"]
                best_epoch = ckpt["best_epoch"]
                best_state = ckpt["best_state"]
                nonfinite = ckpt["nonfinite"]
                start_epoch = resumed_from = ckpt["epoch"]

        # [ddp] one DDP-wrapped step on every rank (after a resume: DDP broadcasts rank 0's state)
        self._step_fn = (distributed.distributed_step(method, ctx, self.device) if self.dist is not None
                         else lambda batch: method.training_step(ctx, batch))

        if resumed_from is None:
            # Training randomness (dropout, augmentation) starts from the run seed, whatever
            # prepare() consumed before (a cache hit and a miss draw differently).
            _reseed(self.seed)

        select = cfg.select_metric
        if select != "last" and self.validate is None:
            select = "last"  # nothing to select on: keep the final state

        dataset = method.train_dataset(ctx)
        n_batches = math.ceil(len(dataset) / cfg.batch_size) if len(dataset) else 0
        if n_batches == 0 and cfg.epochs > 0:
            raise ValueError(f"method {method.name!r}: the training set is empty")
        end_epoch = cfg.epochs if self.stop_after is None else min(cfg.epochs, self.stop_after)
        loader = self._loader(dataset, cfg, ctx)

        with self.progress.task(f"{method.name}: epochs", total=cfg.epochs) as epoch_task:
            epoch_task.advance(start_epoch)
            for epoch in range(start_epoch + 1, end_epoch + 1):
                log = self._train_epoch(method, ctx, cfg, loader, optimizer, scaler, use_amp,
                                        amp_dtype, epoch, params)
                if log.data_share >= INPUT_BOUND_SHARE:
                    epoch_task.update(description=f"{method.name}: epochs (input-bound: {log.data_share * 100:.0f} % "
                                      "of step time waiting for data; see docs/methods.md)")
                nonfinite += log.skipped_nonfinite
                if scheduler is not None:
                    # the released ClusPro code steps its scheduler twice per epoch (docs/cluspro.md)
                    for _ in range(getattr(cfg, "scheduler_steps_per_epoch", 1)):
                        scheduler.step()
                if select != "last" and (epoch % cfg.val_every == 0 or epoch == cfg.epochs) \
                        and distributed.is_main():  # [ddp] rank 0 validates alone; the others go on
                    with distributed.local_only():
                        log.val = self._validate(method, select)
                    value = log.val[select]
                    if best_value is None or value > best_value:  # strict: earliest best wins
                        best_value, best_epoch = value, epoch
                        best_state = _clone_state(method.state_dict())
                history.append(log)
                self._save_checkpoint(fingerprint, epoch, method, optimizer, scheduler, scaler,
                                      history, best_value, best_epoch, best_state, nonfinite)
                epoch_task.advance()

        trained = history[-1].epoch if history else start_epoch
        if select == "last" or best_state is None:
            chosen = trained
        else:
            method.load_state_dict(best_state)
            chosen = best_epoch
        method.train_mode(False)
        return FitResult(epochs=trained, chosen_epoch=chosen, select_metric=select,
                         best_value=best_value, nonfinite_steps=nonfinite,
                         resumed_from=resumed_from, history=history)

    # ------------------------------------------------------------------------------------------
    def _loader(self, dataset, cfg: TrainConfig, ctx: RunContext) -> DataLoader:
        """The fit's one DataLoader (czsl_bench.loading decides its settings). The worker count
        of a dataset that draws randomness per item changes what training sees, so it is the
        config's (part of the run identity); for pure datasets it is the machine's choice."""
        pure = pure_items(dataset)
        workers = cfg.num_workers if cfg.num_workers > 0 or not pure else getattr(ctx, "workers", None)
        settings = loader_settings(self.device, workers, decodes=not pure, pure=pure)
        self._order = EpochSampler(len(dataset), self.seed)
        if self.dist is None:
            batching = dict(batch_size=cfg.batch_size, sampler=self._order, worker_init_fn=worker_init_fn)
        else:  # [ddp] this rank's slice of each single-process global batch; workers fold in the rank
            batching = dict(batch_sampler=distributed.GlobalBatchSampler(self._order, cfg.batch_size, self.dist.rank,
                                                                         self.dist.world_size),
                            worker_init_fn=distributed.rank_worker_init(self.dist.rank, worker_init_fn))
        return DataLoader(dataset, collate_fn=getattr(dataset, "collate", None),
                          generator=loader_generator(self.seed, 0), **batching, **settings.kwargs())

    def _train_epoch(self, method, ctx, cfg, loader, optimizer, scaler, use_amp, amp_dtype,
                     epoch, params) -> EpochLog:
        self._order.set_epoch(epoch)
        # worker seeds derive from the epoch's generator, as the order does (a resumed run repeats it)
        loader.generator = loader_generator(self.seed, epoch)
        method.train_mode(True)
        optimizer.zero_grad(set_to_none=True)
        total, finite_batches, skipped = 0.0, 0, 0
        data_time = compute_time = 0.0
        started = time.perf_counter()
        n = len(loader)
        with self.progress.task(f"epoch {epoch}/{cfg.epochs}", total=n) as task, BatchFeed(loader, self.device) as feed:
            for i in range(n):
                clock = time.perf_counter()
                batch = feed.next()
                ready = time.perf_counter()
                boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == n
                # [ddp] gradients are all-reduced in the backward of a step's last micro-batch only
                with self._step_fn.no_sync(boundary) if self.dist is not None else contextlib.nullcontext():
                    with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                        loss = self._step_fn(batch)
                    # the forward has drawn all it draws: the next batch's crops may be drawn now and
                    # it is resampled in the background during this backward (loading.BatchFeed)
                    planning = time.perf_counter()
                    feed.prepare_next()
                    planned = time.perf_counter()
                    finite = bool(torch.isfinite(loss.detach()).all())
                    if self.dist is not None:  # [ddp] every rank skips, or none (a lone backward would hang)
                        finite = distributed.all_true(finite)
                    if not finite:
                        skipped += 1  # no backward: a NaN would poison every parameter it touches
                    else:
                        scaler.scale(loss / cfg.grad_accum).backward()
                        total += float(loss.detach())
                        finite_batches += 1
                if boundary:
                    if self.dist is not None and not finite:
                        distributed.average_gradients(params)  # [ddp] no backward synchronised this step
                    skipped += self._step(optimizer, scaler, params, cfg)
                done = time.perf_counter()
                data_time += (ready - clock) + (planned - planning)
                compute_time += (done - ready) - (planned - planning)
                task.advance()
        method.train_mode(False)
        if self.dist is not None:  # [ddp] the epoch's loss over every rank's batches
            total, finite_batches = distributed.sum_floats([total, finite_batches])
        diagnostics = getattr(method, "epoch_diagnostics", None)
        return EpochLog(epoch=epoch, train_loss=total / finite_batches if finite_batches else float("nan"),
                        batches=n, skipped_nonfinite=skipped, lr=optimizer.param_groups[0]["lr"],
                        seconds=time.perf_counter() - started,
                        diagnostics=diagnostics() if callable(diagnostics) else None,
                        data_seconds=round(data_time, 4), compute_seconds=round(compute_time, 4))

    @staticmethod
    def _step(optimizer, scaler, params, cfg) -> int:
        """One optimizer step; returns 1 if it was skipped for non-finite gradients."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:  # every micro-batch of this step was skipped
            optimizer.zero_grad(set_to_none=True)
            return 0
        if scaler.is_enabled():
            # GradScaler skips steps with inf/nan gradients itself and lowers its scale.
            scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return int(scaler.get_scale() < scale)  # the scaler lowers its scale when it skips
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return 1
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 0

    def _validate(self, method: Method, select: str) -> dict[str, float]:
        method.train_mode(False)
        # Validation must not move the RNG streams training depends on, or a run validated
        # every epoch and one validated less often (or resumed) would diverge.
        state = _get_rng_state()
        try:
            metrics = self.validate(method)
        finally:
            _set_rng_state(state)
        if select not in metrics:
            raise ValueError(
                f"select_metric {select!r} is not a validation metric; choose one of "
                f"{', '.join(sorted(metrics))} or 'last'"
            )
        return {k: float(v) for k, v in metrics.items()}

    # -- checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self, fingerprint, epoch, method, optimizer, scheduler, scaler, history,
                         best_value, best_epoch, best_state, nonfinite) -> None:
        if self.checkpoint_dir is None or not distributed.is_main():  # [ddp] rank 0 writes
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "epoch": epoch,
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": _get_rng_state(),
            "history": json.dumps([asdict(h) for h in history]),
            "best_value": best_value,
            "best_epoch": best_epoch,
            "best_state": best_state,
            "nonfinite": nonfinite,
        }
        # Through a Python file object, not a path: torch's own writer turns a full disk into
        # "enforce fail ... unexpected pos"; atomic_file sees the ENOSPC and says "disk full".
        with atomic_file(self.checkpoint_dir / LAST) as handle:
            torch.save(payload, handle)

    def _load_checkpoint(self, fingerprint: str) -> dict[str, Any] | None:
        if self.dist is None:
            return self._read_checkpoint(fingerprint)
        # [ddp] rank 0 reads (the nodes need not share a disk), every rank gets it or its error
        try:
            got: Any = ("ok", self._read_checkpoint(fingerprint)) if self.dist.is_main else None
        except (OSError, ValueError) as exc:
            got = ("error", type(exc).__name__, str(exc))
        got = distributed.broadcast_object(got)
        if got[0] == "error":
            raise (OSError if got[1] == "OSError" else ValueError)(got[2])
        return got[1]

    def _read_checkpoint(self, fingerprint: str) -> dict[str, Any] | None:
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / LAST
        if not path.exists():
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise OSError(f"checkpoint {path} cannot be read ({type(exc).__name__}); "
                          "delete it to start over") from None
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {path} has format version {ckpt.get('version')}, expected "
                             f"{CHECKPOINT_VERSION}; delete it to start over")
        if ckpt.get("fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {path} was written by another run (method config, backbone, "
                             "weights, dataset version or seed differ); delete it or run without --resume")
        return ckpt


# ----------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler):
    """The order of epoch ``e``: a pure function of (seed, e), so one loader serves the whole fit
    (its workers may persist) and a resumed run sees the batches an uninterrupted one would.

    It is exactly the order of ``DataLoader(shuffle=True, generator=loader_generator(seed, e))``,
    the per-epoch loader this trainer used before: that loader draws its workers' base seed from
    the generator first, then ``torch.randperm``; the first draw is skipped here the same way, so
    records trained before keep their numbers."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = loader_generator(self.seed, self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base-seed draw
        yield from torch.randperm(self.n, generator=generator).tolist()


def _make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adam, adamw or sgd")


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "step":
        step = cfg.step_size or max(cfg.epochs // 5, 1)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}; use none, step or cosine")


def _clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in state.items()}


def _reseed(seed: int) -> None:
    stream = hash_seed(seed, _TRAIN_STREAM)
    random.seed(stream)
    np.random.seed(stream % 2**32)
    torch.manual_seed(stream)


def _get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuple(v) for v in value)
    return value
