"""The input pipeline around the trainer: decoded images train exactly as the PIL path does,
one loader per fit, DataLoader settings from one place, data-wait vs compute in every epoch."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from czsl_bench import loading
from czsl_bench.backbone import load_backbone
from czsl_bench.cache import FeatureCache
from czsl_bench.image_data import DecodedSplit
from czsl_bench.loading import loader_settings
from czsl_bench.method import Method, RunContext, TrainConfig
from czsl_bench.seeding import loader_generator
from czsl_bench.training import EpochSampler, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.toy_world import write_toy_world  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from czsl_bench.datasets.czsl_format import CZSLDataset

    root = write_toy_world(tmp_path_factory.mktemp("toy") / "toy", per_pair=(10, 4))
    return CZSLDataset.from_root(root, name="toy")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("czsl-tiny-vit", None, device="cpu")


def _ctx(dataset, backbone, cache_root, config=None, **kw) -> RunContext:
    return RunContext(dataset_name=dataset.name, dataset=dataset, backbone=backbone, config=config, seed=0,
                      cache=FeatureCache(cache_root) if cache_root is not None else None, **kw)


@dataclass
class ProbeConfig(TrainConfig):
    @classmethod
    def defaults(cls, recipe: str) -> ProbeConfig:
        return cls(epochs=2, batch_size=8, lr=0.05, optimizer="sgd", select_metric="last")


class PixelProbe(Method):
    """Reads pixels and draws dropout between batches: any change in the images or in the random
    stream the crops leave behind changes its weights."""

    name = "pixel-probe"
    Config = ProbeConfig
    decoded = True

    def prepare(self, ctx):
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Dropout(0.3),
                                 nn.Linear(4 * 8 * 8, len(ctx.dataset.closed_pairs)))

    def train_dataset(self, ctx):
        split = ctx.split("train")
        return ctx.train_images(split) if self.decoded else split.dataset(ctx.backbone.preprocess_train)

    def training_step(self, ctx, batch):
        images, labels = batch[0], batch[1]
        return F.cross_entropy(self.net(images), labels)

    def score(self, ctx, split):
        return torch.cat([self.net(images) for images, _, _ in ctx.eval_batches(split, 16)])


def _fit(method_cls, toy, tiny, cache_root, decoded: bool, **trainer) -> tuple[dict, object]:
    method = method_cls(ProbeConfig.defaults("synthetic"))
    method.decoded = decoded
    ctx = _ctx(toy, tiny, cache_root, method.config)
    method.prepare(ctx)
    fit = Trainer(device="cpu", seed=3, **trainer).fit(method, ctx)
    return {k: v.clone() for k, v in method.state_dict().items()}, fit


def test_training_on_decoded_images_equals_the_pil_path_bit_for_bit(toy, tiny, tmp_path):
    pil, _ = _fit(PixelProbe, toy, tiny, None, decoded=False)
    decoded, fit = _fit(PixelProbe, toy, tiny, tmp_path / "cache", decoded=True)
    cached, _ = _fit(PixelProbe, toy, tiny, tmp_path / "cache", decoded=True)  # from the cache entry
    memory, _ = _fit(PixelProbe, toy, tiny, None, decoded=True)  # no cache: decoded in memory
    for other in (decoded, cached, memory):
        assert other.keys() == pil.keys() and all(torch.equal(pil[k], other[k]) for k in pil)
    assert fit.epochs == 2 and all(h.data_seconds > 0 and h.compute_seconds > 0 for h in fit.history)


def test_eval_batches_equal_the_pil_path_on_the_embedded_world(tmp_path):
    from czsl_bench.datasets.synthetic import plugin

    world = plugin.load()
    backbone = load_backbone("czsl-tiny-vit", "synthetic", device="cpu")
    ctx = _ctx(world, backbone, tmp_path / "cache", eval_batch_size=128)
    val = world.split("val")
    got = [(images, labels, index) for images, labels, index in ctx.eval_batches(val)]
    images = torch.cat([g[0] for g in got])
    expected = torch.stack([val.dataset(backbone.preprocess_eval)[i][0] for i in range(len(val))])
    assert images.shape == (len(val), 3, 64, 64) and torch.equal(images, expected)
    assert torch.equal(torch.cat([g[1] for g in got]), val.labels)
    assert torch.equal(torch.cat([g[2] for g in got]), torch.arange(len(val)))
    assert isinstance(ctx.train_images(world.split("train")), DecodedSplit)


@pytest.mark.parametrize("seed", [0, 7])
def test_the_epoch_sampler_is_the_order_of_the_per_epoch_loader(seed):
    n = 37
    for epoch in (1, 2, 5):
        loader = torch.utils.data.DataLoader(range(n), batch_size=1, shuffle=True,
                                             generator=loader_generator(seed, epoch))
        sampler = EpochSampler(n, seed)
        sampler.set_epoch(epoch)
        assert list(sampler) == [int(b) for b in loader]


class _SlowItems(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        time.sleep(0.05)
        return torch.ones(2), 0


class _Linear(Method):
    name = "linear-probe"
    Config = ProbeConfig

    def prepare(self, ctx):
        self.net = nn.Linear(2, 1)

    def train_dataset(self, ctx):
        return _SlowItems()

    def training_step(self, ctx, batch):
        return self.net(batch[0]).pow(2).mean()

    def score(self, ctx, split):
        raise NotImplementedError


class _Recorder:
    def __init__(self):
        self.descriptions: list[str] = []

    @contextmanager
    def task(self, description, total=None):
        recorder = self

        class Task:
            def advance(self, n=1):
                pass

            def update(self, *, description=None, total=None):
                if description is not None:
                    recorder.descriptions.append(description)

        yield Task()


def test_an_input_bound_fit_records_the_wait_and_says_so():
    progress = _Recorder()
    method = _Linear(ProbeConfig(epochs=2, batch_size=2, lr=0.1, select_metric="last"))
    method.prepare(None)
    fit = Trainer(device="cpu", seed=0, progress=progress).fit(method, None)
    for epoch in fit.history:
        assert epoch.data_seconds > 0.25 > epoch.compute_seconds and epoch.data_share > 0.9
    warnings = [d for d in progress.descriptions if "input-bound" in d]
    assert len(warnings) == 2
    assert "% of step time waiting for data; see docs/methods.md" in warnings[0]
    assert fit.input_timings()["fit_data_wait"] > fit.input_timings()["fit_compute"]
    assert set(fit.to_dict()["history"][0]) >= {"data_seconds", "compute_seconds"}


def test_the_record_carries_data_wait_and_compute(tmp_path, monkeypatch):
    import czsl_bench
    from fixtures.toy_world import registered_toy_dataset

    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    with registered_toy_dataset(tmp_path / "toy"):
        record = czsl_bench.run("csp", "toy", seed=0, results_dir=tmp_path / "results", progress=False,
                                overrides=["epochs=1"])
    timings = record.timings
    assert timings["fit_data_wait"] >= 0 and timings["fit_compute"] > 0
    assert timings["fit_data_wait"] + timings["fit_compute"] <= timings["fit"]
    history = record.environment["training"]["history"]
    assert history[0]["data_seconds"] >= 0 and history[0]["compute_seconds"] > 0


def test_loader_settings_are_decided_in_one_place(monkeypatch):
    monkeypatch.setattr(loading, "available_cores", lambda: 16)
    assert loader_settings("cpu", 3, decodes=True).num_workers == 3  # an explicit count wins
    assert loader_settings("cpu", 0, decodes=True).kwargs() == {"num_workers": 0, "pin_memory": False}
    assert loader_settings("cpu", None, decodes=True).num_workers == 8  # cores - 1, at most 8
    assert loader_settings("cpu", None, decodes=True, items=200).num_workers == 0  # a small job
    assert loader_settings("cpu", None, decodes=False, pure=True).num_workers == 0  # indexing on the CPU
    cuda = loader_settings("cuda", None, decodes=False, pure=True)
    assert (cuda.num_workers, cuda.pin_memory, cuda.persistent_workers, cuda.prefetch_factor) == (4, True, True, 4)
    impure = loader_settings("cuda", 2, decodes=True, pure=False)
    assert impure.pin_memory and not impure.persistent_workers  # fresh, reseeded workers every epoch
    assert not loader_settings("cuda", 2, decodes=False, pure=True, persistent=False).persistent_workers
    monkeypatch.setattr(loading, "available_cores", lambda: 1)
    assert loader_settings("cpu", None, decodes=True).num_workers == 0
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        loader_settings("cpu", -1, decodes=True)


def test_run_workers_option_is_checked_before_anything_loads():
    from czsl_bench.cli import cli

    result = CliRunner().invoke(cli, ["run", "clip", "--dataset", "synthetic", "--workers", "many"])
    assert result.exit_code == 2 and "'many' is not a worker count; pass 0, 1, 2, ... or auto" in result.output


def test_the_cache_build_decodes_on_every_core_because_the_main_process_only_waits(monkeypatch):
    monkeypatch.setattr(loading, "available_cores", lambda: 2)
    assert loader_settings("cpu", None, decodes=True, main_waits=True).num_workers == 2
    assert loader_settings("cpu", None, decodes=True).num_workers == 1  # the training loop keeps a core
    assert loader_settings("cpu", 0, decodes=True, main_waits=True).num_workers == 0  # explicit wins
    assert loader_settings("cpu", None, decodes=True, main_waits=True, items=10).num_workers == 0
    monkeypatch.setattr(loading, "available_cores", lambda: 1)
    assert loader_settings("cpu", None, decodes=True, main_waits=True).num_workers == 0
    monkeypatch.setattr(loading, "available_cores", lambda: 64)
    assert loader_settings("cpu", None, decodes=True, main_waits=True).num_workers == 8


class _Staged(torch.utils.data.Dataset):
    """plan_batch draws from the global generator; finish_batch records the thread it ran in."""

    pure_items = True

    def __init__(self, n=10, fail_at=None):
        self.n, self.fail_at, self.threads = n, fail_at, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)])

    def plan_batch(self, batch):
        return batch, torch.rand(len(batch))

    def finish_batch(self, planned, device):
        import threading

        batch, noise = planned
        self.threads.append(threading.current_thread().name)
        if self.fail_at is not None and int(batch[0, 0]) == self.fail_at:
            raise ValueError("cannot finish this batch")
        return (batch[:, 0] + noise).to(device)


@pytest.mark.parametrize("background", [True, False])
def test_the_batch_feed_draws_in_order_in_the_caller_and_finishes_in_the_background(background):
    import threading

    dataset = _Staged()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    torch.manual_seed(0)
    expected, draws_between = [], []
    for batch in loader:  # the sequential reference: draw the batch's noise, then a "forward" draws
        expected.append(batch[:, 0] + torch.rand(len(batch)))
        draws_between.append(torch.rand(1))
    after = torch.get_rng_state()
    torch.manual_seed(0)
    got, between = [], []
    with loading.BatchFeed(loader, "cpu", background=background) as feed:
        for _ in range(len(loader)):
            got.append(feed.next())
            between.append(torch.rand(1))  # the step's forward
            feed.prepare_next()  # the next batch's draws come after it, as in the sequential loop
        with pytest.raises(StopIteration):
            feed.next()
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 4
    assert all(torch.equal(a, b) for a, b in zip(between, draws_between))
    assert torch.equal(torch.get_rng_state(), after)
    here = threading.current_thread().name
    assert len(dataset.threads) == 4 and all((name != here) == background for name in dataset.threads)


def test_batches_are_finished_in_the_background_on_cuda_only():
    assert loading.finish_in_background("cuda") and not loading.finish_in_background("cpu")


def test_training_with_background_finishing_equals_the_pil_path(toy, tiny, monkeypatch):
    pil, _ = _fit(PixelProbe, toy, tiny, None, decoded=False)
    monkeypatch.setattr(loading, "finish_in_background", lambda device: True)  # what CUDA does
    background, _ = _fit(PixelProbe, toy, tiny, None, decoded=True)
    assert all(torch.equal(pil[k], background[k]) for k in pil)


def test_a_batch_that_fails_in_the_background_fails_in_next():
    loader = torch.utils.data.DataLoader(_Staged(fail_at=3), batch_size=3)
    with loading.BatchFeed(loader, "cpu", background=True) as feed:
        feed.next()
        feed.prepare_next()
        with pytest.raises(ValueError, match="cannot finish this batch"):
            feed.next()


def test_unstaged_datasets_are_fetched_and_moved_in_next():
    loader = torch.utils.data.DataLoader([(torch.ones(2), 1)] * 5, batch_size=2)
    with loading.BatchFeed(loader, "cpu") as feed:
        batches = [feed.next() for _ in range(3)]
        feed.prepare_next()  # nothing to prepare ahead
        with pytest.raises(StopIteration):
            feed.next()
    assert [len(b[0]) for b in batches] == [2, 2, 1]


def test_czsl_input_pipeline_pil_selects_the_reference_path(toy, tiny, tmp_path, monkeypatch):
    from czsl_bench.cli import cli

    ctx = _ctx(toy, tiny, tmp_path / "cache")
    assert isinstance(ctx.train_images(toy.split("train")), DecodedSplit)
    monkeypatch.setenv("CZSL_INPUT_PIPELINE", "pil")
    assert not isinstance(ctx.train_images(toy.split("train")), DecodedSplit)
    pil, _ = _fit(PixelProbe, toy, tiny, None, decoded=True)  # the method asks for decoded images...
    monkeypatch.delenv("CZSL_INPUT_PIPELINE")
    batched, _ = _fit(PixelProbe, toy, tiny, None, decoded=True)
    assert all(torch.equal(pil[k], batched[k]) for k in pil)  # ...and gets the same numbers either way
    monkeypatch.setenv("CZSL_INPUT_PIPELINE", "fast")
    result = CliRunner().invoke(cli, ["run", "clip", "--dataset", "synthetic", "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "CZSL_INPUT_PIPELINE='fast' is not an input pipeline; use one of batched, pil" in result.output
