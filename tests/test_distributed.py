"""One run across several processes (czsl_bench.distributed, docs/distributed.md), on 2 CPU
processes over gloo with the tiny embedded backbone:

* CSP and ClusPro trained with DDP(2 x B/2) end with the parameters (and BatchNorm statistics,
  and ClusPro's prototype memory) of one process trained with batch B, dropout off, within float
  tolerance (``ATOL``: the ranks sum their halves in another order than one process does);
* the prototype memory is bit-identical on both ranks;
* a rank killed mid-run leaves no record, the checkpoint it leaves is whole, and ``resume``
  finishes the run with the numbers of an uninterrupted run;
* ``torchrun -m czsl_bench run`` writes one record, whose identity is the single-process one
  plus ``world_size``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from czsl_bench import distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.tiny_three_path import ATTRS, OBJS, TRAIN_PAIRS, TinySplit  # noqa: E402

ATOL = 2e-5  # float32 parameters after a few Adam steps; observed differences are ~1e-7


# -- tiny data (tests/fixtures/tiny_three_path.py) -----------------------------------------------
def _build(method_name: str, overrides: list[str], n_images: int):
    from czsl_bench.backbone import load_backbone
    from czsl_bench.config import resolve_config
    from czsl_bench.names import clean_name
    from czsl_bench.registry import METHODS

    cls = METHODS.get(method_name)
    torch.manual_seed(0)
    cfg = resolve_config(cls.Config, "synthetic", overrides)
    method = cls(cfg)
    split = TinySplit(n_images, feature_dim=128)
    backbone = load_backbone("czsl-tiny-vit", None, device="cpu")
    data = SimpleNamespace(attrs=ATTRS, objs=OBJS, train_pairs=TRAIN_PAIRS, split=lambda *a, **k: split)
    ctx = SimpleNamespace(dataset_name="tiny", dataset=data, backbone=backbone, config=cfg, seed=0,
                          device=torch.device("cpu"), split=lambda *a, **k: split, clean_name=clean_name,
                          image_features=lambda s: s.features, num_workers=0,
                          train_images=lambda s: s.dataset(backbone.preprocess_train))
    with torch.no_grad():
        method.prepare(ctx)
    return method, ctx


CSP = ("csp", ["epochs=2", "batch_size=16", "lr=0.05", "attr_dropout=0", "grad_accum=1"], 48)
# gradient accumulation: 2 micro-batches of 8 (4 per rank) per step, the first under no_sync
CSP_ACCUM = ("csp", ["epochs=2", "batch_size=8", "lr=0.05", "attr_dropout=0", "grad_accum=2"], 48)
# ClusPro trains with SGD here: a Linear bias right before a BatchNorm has a gradient that is 0 in
# exact arithmetic, and Adam turns its float noise (~1e-9, different on 1 and 2 processes) into
# steps of size lr; SGD moves such a parameter by the noise only.
CLUSPRO = ("cluspro", ["epochs=2", "batch_size=16", "optimizer=sgd", "lr=0.1", "vocab_dropout=0", "disentangler_dropout=0",
                       "adapter_dropout=0", "scheduler=none"], 32)
# the released code's variant: Gumbel-hard updates (noise drawn on the gathered plan, the same on
# both ranks) and train-mode BatchNorm over the prototypes (the same rows on every rank: local)
CLUSPRO_CODE = ("cluspro", CLUSPRO[1] + ["variant=code"], 32)


def _train(method_name, overrides, n_images, checkpoint_dir=None, resume=False):
    from czsl_bench.training import Trainer

    method, ctx = _build(method_name, overrides, n_images)
    fit = Trainer(seed=0, checkpoint_dir=checkpoint_dir, resume=resume).fit(method, ctx)
    return method, fit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, job: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CZSL_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if job == "train":
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
            method, fit = _train(*args)
            torch.save({"state": method.state_dict(), "losses": [h.train_loss for h in fit.history]},
                       Path(out) / f"rank{rank}.pt")
        elif job == "toy":
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
            method, fit = _train_toy(**args[0])
            torch.save({"state": method.state_dict(), "skipped": fit.nonfinite_steps}, Path(out) / f"rank{rank}.pt")
        elif job == "run":
            _run_worker(rank, out, *args)
    finally:
        distributed.shutdown()


def _train_toy(**cfg):
    """test_training's toy method (fixed data, linear head) through the Trainer."""
    import dataclasses

    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import ToyConfig, ToyMethod

    from czsl_bench.training import Trainer

    torch.manual_seed(0)
    method = ToyMethod(dataclasses.replace(ToyConfig.defaults("toy"), **cfg))
    ctx = SimpleNamespace()
    method.prepare(ctx)
    return method, Trainer(seed=0).fit(method, ctx)


def _run_worker(rank: int, out: str, root: str, results: str, cache: str, resume: bool, kill_at: int | None):
    import czsl_bench
    from czsl_bench.methods.soft_prompt import SoftPromptMethod

    if kill_at is not None and rank == 1:
        step = SoftPromptMethod.training_step
        calls = []

        def dying_step(self, ctx, batch):
            calls.append(1)
            if len(calls) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception: a lost node
            return step(self, ctx, batch)

        SoftPromptMethod.training_step = dying_step
    record = czsl_bench.run("csp", root, seed=0, backbone="czsl-tiny-vit", pretrained="none",
                            overrides=RUN_OVERRIDES, results_dir=results, cache_dir=cache, resume=resume)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record.to_dict() if record else None))


RUN_OVERRIDES = ["epochs=4", "batch_size=12", "lr=0.05", "attr_dropout=0", "grad_accum=1"]


def _spawn(world: int, out: Path, job: str, args: tuple, timeout: float = 240) -> list[int]:
    """Start ``world`` spawned workers, wait (killing leftovers after ``timeout``); exit codes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out), job, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _close(a: dict, b: dict, atol: float = ATOL) -> list[str]:
    """Names of the tensors of two state dicts that differ by more than ``atol``."""
    assert a.keys() == b.keys()
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if x.is_floating_point():
            if not torch.allclose(x.double(), y.double(), atol=atol, rtol=0):
                bad.append(f"{k}: {float((x.double() - y.double()).abs().max()):.2e}")
        elif not torch.equal(x, y):
            bad.append(k)
    return bad


@pytest.fixture
def single_threaded():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- units ---------------------------------------------------------------------------------------
def test_global_batches_are_the_single_process_batches_split_in_rank_order():
    from czsl_bench.training import EpochSampler

    n, batch, seed = 23, 8, 5

    def through_loader(rank, world, epoch):
        order = EpochSampler(n, seed)
        order.set_epoch(epoch)
        sampler = distributed.GlobalBatchSampler(order, batch, rank, world)
        return [b.tolist() for b in torch.utils.data.DataLoader(range(n), batch_sampler=sampler)]

    for epoch in (1, 2):
        order = EpochSampler(n, seed)
        order.set_epoch(epoch)
        single = [b.tolist() for b in torch.utils.data.DataLoader(range(n), batch_size=batch, sampler=order)]
        assert through_loader(0, 1, epoch) == single
        for world in (2, 4):
            ranks = [through_loader(r, world, epoch) for r in range(world)]
            for b, parts in enumerate(zip(*ranks)):
                glued = [i for part in parts for i in part]
                usable = len(single[b]) - len(single[b]) % world
                assert glued == single[b][:usable] and len({len(p) for p in parts}) == 1
            assert len(ranks[0]) == len(distributed.GlobalBatchSampler(EpochSampler(n, seed), batch, 0, world))
    with pytest.raises(ValueError, match="divisible by 3"):
        distributed.GlobalBatchSampler(EpochSampler(n, seed), 8, 0, 3)


def test_without_a_group_everything_is_the_single_process_path():
    assert distributed.current() is None and distributed.world_size() == 1 and distributed.is_main()
    assert not distributed.collectives_on() and distributed.all_true(True) and not distributed.all_true(False)
    x = torch.arange(6.0).view(3, 2)
    assert distributed.all_gather_rows(x) == (x, 0, 3)
    assert distributed.choose_backend(torch.device("cpu")) == "gloo"
    assert distributed.choose_backend(torch.device("cuda", 0)) == "nccl"
    bn = torch.nn.BatchNorm1d(3)
    assert distributed.sync_batchnorm([torch.nn.Sequential(bn)]) == 1
    assert isinstance(bn, distributed.GlobalBatchNorm) and list(bn.state_dict()) == list(torch.nn.BatchNorm1d(3).state_dict())
    ref = torch.nn.BatchNorm1d(3)
    y = torch.randn(5, 3)
    assert torch.equal(bn(y), ref(y)) and torch.equal(bn.running_var, ref.running_var)


# -- DDP(2 x B/2) == one process with B ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", [CSP, CSP_ACCUM, CLUSPRO, CLUSPRO_CODE],
                         ids=["csp", "csp-accum", "cluspro", "cluspro-code"])
def test_ddp_two_ranks_match_one_process_with_the_global_batch(case, tmp_path, single_threaded):
    codes = _spawn(2, tmp_path, "train", case)
    assert codes == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    method, fit = _train(*case)
    single = method.state_dict()
    bad = _close(r0["state"], single)
    assert bad == [], bad  # parameters, BN statistics, prototypes
    assert _close(r1["state"], r0["state"], atol=0) == []  # the ranks agree bit for bit
    assert r0["losses"] == pytest.approx([h.train_loss for h in fit.history], abs=1e-5)
    protos = [k for k in single if k.endswith("prototypes")]
    assert len(protos) == (2 if case[0] == "cluspro" else 0)
    for k in protos:
        assert torch.equal(r0["state"][k], r1["state"][k])
        assert not torch.allclose(single[k], _build(*case)[0].state_dict()[k])  # the memory moved


@pytest.mark.slow
def test_nan_steps_are_skipped_on_every_rank_with_and_without_accumulation(tmp_path, single_threaded):
    # every 3rd training step's loss is NaN on both ranks: with accumulation 2 that is sometimes the
    # first micro-batch of a step (no_sync) and sometimes the last (nothing synchronised by DDP)
    cfg = dict(dropout=0.0, nan_every=3, grad_accum=2, batch_size=16, epochs=3)
    assert _spawn(2, tmp_path, "toy", (cfg,)) == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    method, fit = _train_toy(**cfg)
    assert r0["skipped"] == r1["skipped"] == fit.nonfinite_steps > 0
    assert _close(r0["state"], method.state_dict()) == [] and _close(r1["state"], r0["state"], atol=0) == []


# -- a rank dies; resume -------------------------------------------------------------------------
@pytest.fixture
def toy_root(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures.toy_world import write_toy_world

    return write_toy_world(tmp_path / "toy")


@pytest.mark.slow
def test_a_rank_killed_mid_run_leaves_no_record_and_the_run_resumes(toy_root, tmp_path):
    results, cache = tmp_path / "results", tmp_path / "cache"
    # 36 training images, global batch 12: 3 steps per epoch; rank 1 dies in its 8th (epoch 3)
    codes = _spawn(2, tmp_path, "run", (str(toy_root), str(results), str(cache), False, 8), timeout=180)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0  # rank 0 fails at the next collective
    assert not [p for p in results.rglob("*") if p.is_file() and ".checkpoints" not in p.parts]
    (ckpt,) = results.rglob("last.pt")
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 4  # a whole checkpoint of a finished epoch
    assert not [p for p in ckpt.parent.iterdir() if p.name != "last.pt"]  # no temporary left

    codes = _spawn(2, tmp_path, "run", (str(toy_root), str(results), str(cache), True, None), timeout=180)
    assert codes == [0, 0]
    resumed = json.loads((tmp_path / "rank0.json").read_text())
    assert json.loads((tmp_path / "rank1.json").read_text()) is None  # rank 1 writes nothing
    assert resumed["environment"]["training"]["resumed_from"] == done
    assert resumed["identity"]["world_size"] == 2

    fresh = tmp_path / "fresh"
    codes = _spawn(2, tmp_path, "run", (str(toy_root), str(fresh), str(cache), False, None), timeout=180)
    assert codes == [0, 0]
    uninterrupted = json.loads((tmp_path / "rank0.json").read_text())
    assert uninterrupted["metrics"] == resumed["metrics"]
    assert uninterrupted["fingerprint"] == resumed["fingerprint"]
    assert len(list(results.rglob("seed0.json"))) == 1


# -- torchrun --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_writes_one_record_with_the_single_process_identity_plus_world_size(toy_root, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    results, cache = tmp_path / "results", tmp_path / "cache"
    common = ["run", "csp", "--dataset", str(toy_root), "--backbone", "czsl-tiny-vit", "--pretrained", "none",
              "--results-dir", str(results), "--cache-dir", str(cache)] + [a for o in RUN_OVERRIDES for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CZSL_DIST_TIMEOUT": "60"}
    out = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "czsl_bench",
                          *common], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = [p for p in results.rglob("*.json") if ".checkpoints" not in p.parts]
    assert path.parent.name == "ddp2" and path.name == "seed0.json"  # never the single-process path
    ddp = json.loads(path.read_text())
    single = subprocess.run([sys.executable, "-m", "czsl_bench", *common[:common.index("--results-dir") + 1],
                             str(tmp_path / "single"), *common[common.index("--results-dir") + 2:]],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    (spath,) = [p for p in (tmp_path / "single").rglob("*.json") if ".checkpoints" not in p.parts]
    one = json.loads(spath.read_text())
    assert ddp["identity"]["world_size"] == 2 and one["identity"]["world_size"] == 1
    assert {**ddp["identity"], "world_size": 1} == one["identity"]
    assert ddp["fingerprint"] != one["fingerprint"]
    assert ddp["metrics"]["test"] == pytest.approx(one["metrics"]["test"], abs=1e-4)
