"""One training run across several processes: torchrun / DistributedDataParallel (docs/distributed.md).

``torchrun --nproc-per-node N -m czsl_bench run METHOD --dataset D ...`` starts N copies of the
ordinary CLI; each reads its rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and :func:`init` joins them into one process
group. Without those variables (or with ``WORLD_SIZE=1``) nothing here does anything and a run is
exactly the single-process run.

What one run across W processes means here (the shared Trainer's ``[ddp]`` hooks use these):

* **the global batch is the config's ``batch_size``**, as in a single process. Every epoch the
  global order is the single-process order (the same per-(seed, epoch) generator, drawn in the
  same order as ``DataLoader(shuffle=True)``), and global batch ``b`` is split into W contiguous
  slices of ``batch_size / W`` rows, rank ``r`` taking slice ``r`` (:class:`GlobalBatchSampler`).
  The last, short batch is cut to a multiple of W (at most W - 1 samples of an epoch go unseen);
  ``batch_size`` must be divisible by W.
* **gradients are averaged** by :class:`~torch.nn.parallel.DistributedDataParallel` (one
  all-reduce per optimizer step: micro-batches of a gradient accumulation run under ``no_sync``).
  The mean of W equal-sized slice means is the global-batch mean, so a per-sample-mean loss gets
  the single-process gradient.
* **BatchNorm sees the global batch**: the BatchNorm layers of a method's modules become
  :class:`GlobalBatchNorm` (a SyncBatchNorm that also runs on CPU/gloo), so normalisation, its
  gradient and the running statistics are those of the global batch.
* **random streams are the run seed's, on every rank**: the Trainer seeds each process
  identically, and every rank draws the same numbers in the same order (its local batches have
  the same shape). Draws made on shared tensors (vocabulary dropout on the text side, ClusPro's
  prototype seeding and Gumbel noise on the gathered batch) are therefore identical on all ranks
  and equal to a single process's; per-sample draws (dropout on a rank's image features) repeat
  at the same local position on every rank. DataLoader workers fold the rank into their seed, so
  augmentations do not repeat.
* **rank 0 writes**: the checkpoint (atomic, as always), the record; it alone validates (model
  selection) and evaluates, under :func:`local_only`, while the other ranks wait at their next
  collective (validation) or leave once training ends (evaluation). Why rank 0 and not sharded:
  the evaluator needs the whole score matrix (the bias sweep and AUC are global over the split),
  scoring is a small part of a run next to training, and one path keeps distributed numbers
  bit-identical to single-process evaluation of the same weights.
* ``--resume``: rank 0 reads the checkpoint and broadcasts it (nodes need not share a disk for
  it; the record is written by rank 0 only).

The process-group backend is ``nccl`` when the run's device is CUDA and ``gloo`` on CPU
(``CZSL_DIST_BACKEND`` overrides); ``CZSL_DIST_TIMEOUT`` (seconds, default 3600) bounds how long
a rank waits for another (rank 0 validating, a dead peer).
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

DEFAULT_TIMEOUT_S = 3600
_local_only_depth = 0  # > 0: collectives are off (rank 0 validating or evaluating alone)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- the group ---------------------------------------------------------------------------------
def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun or unset it") from None


def choose_backend(device: torch.device) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise (``CZSL_DIST_BACKEND`` wins)."""
    forced = os.environ.get("CZSL_DIST_BACKEND", "").strip()
    if forced:
        return forced
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device | str) -> torch.device:
    """Join the torchrun group if the environment describes one; returns this rank's device
    (``cuda:LOCAL_RANK`` for a CUDA run, else ``device`` unchanged). Idempotent; a no-op for a
    single process."""
    device = torch.device(device)
    world = env_world_size()
    if world <= 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("CZSL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        tdist.init_process_group(choose_backend(device), timeout=timeout)
        atexit.register(shutdown)  # NCCL warns about a group left at exit
    return device


def current() -> Dist | None:
    """The group this process belongs to, or ``None`` for a single process (a group of one
    counts as none)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    world = tdist.get_world_size()
    if world <= 1:
        return None
    return Dist(rank=tdist.get_rank(), world_size=world,
                local_rank=int(os.environ.get("LOCAL_RANK", tdist.get_rank())), backend=str(tdist.get_backend()))


def world_size() -> int:
    """Processes training this run together: the group's size, else ``WORLD_SIZE`` (1 alone)."""
    d = current()
    return d.world_size if d is not None else env_world_size()


def rank() -> int:
    d = current()
    return d.rank if d is not None else 0


def is_main() -> bool:
    """Rank 0, or a single process: the one process that writes."""
    return rank() == 0


def collectives_on() -> bool:
    """Whether code should talk to the other ranks now (a group exists and rank 0 is not in a
    :func:`local_only` block)."""
    return _local_only_depth == 0 and current() is not None


@contextmanager
def local_only() -> Iterator[None]:
    """Switch collectives off: what rank 0 runs alone (validation, evaluation) must not wait for
    ranks that are not there."""
    global _local_only_depth
    _local_only_depth += 1
    try:
        yield
    finally:
        _local_only_depth -= 1


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# -- small collectives ------------------------------------------------------------------------
def _comm_device() -> torch.device:
    if str(tdist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank (one tiny all-reduce)."""
    if not collectives_on():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item())


def sum_floats(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks."""
    if not collectives_on():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; tensors come back on the CPU)."""
    if not collectives_on():
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src, device=_comm_device() if str(tdist.get_backend()) == "nccl" else None)
    return box[0]


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the ``.grad`` of ``params`` over the ranks (what DDP's backward does); for a step
    whose last micro-batch was skipped, so DDP never synchronised the earlier ones. Ranks skip the
    same micro-batches, so they agree on which gradients exist."""
    if not collectives_on():
        return
    world = tdist.get_world_size()
    for p in params:
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad.div_(world)


def barrier() -> None:
    if collectives_on():
        tdist.barrier()


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The ranks' ``tensor`` concatenated along dim 0 in rank order (the global batch, as a
    single process would hold it), and the ``[start, stop)`` rows that are this rank's. Ranks may
    hold different numbers of rows. Not differentiable (the result is detached)."""
    if not collectives_on():
        return tensor, 0, tensor.shape[0]
    world, me = tdist.get_world_size(), tdist.get_rank()
    dev = _comm_device()
    local = tensor.detach().to(dev).contiguous()
    sizes_t = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(sizes_t) for _ in range(world)]
    tdist.all_gather(sizes, sizes_t)
    counts = [int(s.item()) for s in sizes]
    most = max(counts)
    if local.shape[0] < most:
        pad = local.new_zeros((most - local.shape[0],) + tuple(local.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(world)]
    tdist.all_gather(parts, local)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device)
    start = sum(counts[:me])
    return out, start, start + counts[me]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks: the gradient of each rank's input is the sum of the
    ranks' output gradients (every rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(grad)
        return grad


class _GatherRows(torch.autograd.Function):
    """Differentiable concatenation of the ranks' equal-sized ``tensor`` along dim 0."""

    @staticmethod
    def forward(ctx, tensor):
        world, me = tdist.get_world_size(), tdist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        tdist.all_gather(parts, tensor.contiguous())
        ctx.rows = (me * tensor.shape[0], (me + 1) * tensor.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad[ctx.rows[0]:ctx.rows[1]]


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, differentiably (the identity without a group)."""
    return _AllReduceSum.apply(tensor) if collectives_on() else tensor


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' equal-sized ``tensor`` concatenated along dim 0 in rank order,
    differentiably: a batch statistic (e.g. an HSIC) computed on it is the global batch's on
    every rank, and DDP's averaging of the W identical losses gives its single-process gradient
    (the identity without a group)."""
    return _GatherRows.apply(tensor) if collectives_on() else tensor


# -- the global batch --------------------------------------------------------------------------
class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of every global batch of one epoch (see the module docstring).

    ``order`` yields the epoch's single-process order (the trainer's ``EpochSampler``, a pure
    function of (seed, epoch)), so the global batches are exactly the single-process batches.
    """

    def __init__(self, order: torch.utils.data.Sampler[int], batch_size: int, rank: int, world_size: int):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is the global batch of a run on {world_size} processes "
                             f"and must be divisible by {world_size}; choose e.g. --set batch_size="
                             f"{max(world_size, batch_size - batch_size % world_size)}")
        self.order, self.n, self.batch_size = order, len(order), batch_size
        self.rank, self.world_size = rank, world_size

    def global_batches(self, perm: list[int]) -> Iterator[list[int]]:
        for start in range(0, self.n, self.batch_size):
            batch = perm[start:start + self.batch_size]
            usable = len(batch) - len(batch) % self.world_size  # equal slices keep the ranks in step
            if usable:
                yield batch[:usable]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(list(self.order)):
            per = len(batch) // self.world_size
            yield batch[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)


def rank_worker_init(rank: int, inner: Callable | None) -> Callable[[int], None]:
    """DataLoader worker seeding with the rank folded in (see :class:`_RankWorkerInit`)."""
    return _RankWorkerInit(rank, inner)


class _RankWorkerInit:
    """Worker seeding with the rank folded in (ranks' workers would otherwise share seeds and
    draw the same augmentations at the same local positions). Picklable for spawned workers."""

    def __init__(self, rank: int, inner: Callable | None):
        self.rank, self.inner = rank, inner

    def __call__(self, worker_id: int) -> None:
        from czsl_bench.seeding import hash_seed

        torch.manual_seed(hash_seed(torch.initial_seed(), self.rank))
        if self.inner is not None:
            self.inner(worker_id)


# -- BatchNorm over the global batch -------------------------------------------------------------
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training-mode statistics are those of the global batch (all ranks), with
    the matching gradient (differentiable all-reduces) and running statistics: torch's
    SyncBatchNorm, but also on CPU/gloo. Outside a group, in eval mode or under
    :func:`local_only` it is the plain BatchNorm it replaced (same parameters, buffers and
    state_dict keys: :func:`sync_batchnorm` only changes the class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and collectives_on()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # statistics in float32 whatever autocast gives (bf16 cannot count past 256)
        with torch.no_grad():
            count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
            tdist.all_reduce(count)
        mean = all_reduce(xf.sum(dims)) / count
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count  # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                n = float(count.item())
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_((var.detach() * (n / max(n - 1.0, 1.0))).to(self.running_var.dtype),
                                                  alpha=m)
        return y.to(x.dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")


def sync_batchnorm(modules: Sequence[nn.Module]) -> int:
    """Turn every BatchNorm layer of ``modules`` into a :class:`GlobalBatchNorm` in place;
    returns how many. The class swap keeps the layer's tensors (and optimizer references)."""
    n = 0
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not isinstance(sub, GlobalBatchNorm):
                if type(sub) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                    continue  # a custom subclass keeps its own forward
                sub.__class__ = type(f"Global{type(sub).__name__}", (GlobalBatchNorm, type(sub)),
                                     {"forward": GlobalBatchNorm.forward,
                                      "_check_input_dim": GlobalBatchNorm._check_input_dim})
                n += 1
    return n


# -- the training step under DDP -----------------------------------------------------------------
class _StepModule(nn.Module):
    """A module whose forward is the method's training step, so DistributedDataParallel can wrap
    it: its parameters are the method's modules' (the frozen backbone is not among them)."""

    def __init__(self, method: Any, ctx: Any):
        super().__init__()
        self.parts = nn.ModuleList(method.modules())
        object.__setattr__(self, "_method", method)
        object.__setattr__(self, "_ctx", ctx)

    def forward(self, batch: Any) -> torch.Tensor:
        return self._method.training_step(self._ctx, batch)


@dataclass
class DistributedStep:
    """What the Trainer calls instead of ``method.training_step`` in a group."""

    ddp: nn.Module

    def __call__(self, batch: Any) -> torch.Tensor:
        return self.ddp(batch)

    def no_sync(self, sync: bool):
        """A context in which backward does not all-reduce (gradient accumulation)."""
        return nullcontext() if sync else self.ddp.no_sync()


def distributed_step(method: Any, ctx: Any, device: torch.device) -> DistributedStep:
    """Wrap ``method``'s training step in DistributedDataParallel (after its BatchNorm layers
    became global). DDP broadcasts rank 0's parameters and buffers once here; buffers are not
    re-broadcast every step (``forward_sync_buffers=False``): what ranks share (prototype memory,
    BatchNorm running statistics) they compute identically, and the tests check that."""
    from torch.nn.parallel import DistributedDataParallel

    sync_batchnorm(method.modules())
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    import inspect

    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(_StepModule(method, ctx), device_ids=ids, **no_buffer_sync,
                                  find_unused_parameters=os.environ.get("CZSL_DDP_FIND_UNUSED") == "1")
    return DistributedStep(ddp)


__all__ = [
    "Dist", "GlobalBatchNorm", "average_gradients", "GlobalBatchSampler", "DistributedStep", "all_gather_rows", "all_true",
    "barrier", "broadcast_object", "gather_rows", "sum_over_ranks", "choose_backend", "collectives_on", "current", "distributed_step",
    "env_world_size", "init", "is_main", "local_only", "rank_worker_init", "rank", "shutdown", "sum_floats",
    "sync_batchnorm", "world_size",
]
