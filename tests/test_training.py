"""The shared Trainer: resume equals an uninterrupted run, non-finite losses are skipped and
counted, model selection restores the best validation epoch, seeds make runs repeatable."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from czsl_bench.method import Method, RunContext, TrainConfig
from czsl_bench.seeding import seed_everything
from czsl_bench.training import Trainer


@dataclass
class ToyConfig(TrainConfig):
    dropout: float = 0.2
    nan_every: int = 0  # make the loss NaN on every k-th step (0 = never)

    @classmethod
    def defaults(cls, dataset: str) -> ToyConfig:
        return cls(epochs=4, batch_size=16, lr=0.05, optimizer="adam")


class ToyMethod(Method):
    """Linear classifier over fixed features with dropout: uses every RNG stream the real
    methods use (parameter init, data order, dropout)."""

    name = "toy"
    Config = ToyConfig

    def prepare(self, ctx):
        g = torch.Generator().manual_seed(123)  # the data is fixed, the seed varies the model
        self.x = torch.randn(100, 8, generator=g)
        w = torch.randn(8, 5, generator=g)
        self.y = (self.x @ w).argmax(1)
        self.head = torch.nn.Sequential(torch.nn.Dropout(self.config.dropout), torch.nn.Linear(8, 5))
        self.steps = 0

    def modules(self):
        return [self.head]

    def train_dataset(self, ctx):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def training_step(self, ctx, batch):
        x, y = batch
        self.steps += 1
        loss = torch.nn.functional.cross_entropy(self.head(x), y)
        if self.config.nan_every and self.steps % self.config.nan_every == 0:
            loss = loss * float("nan")
        return loss

    def score(self, ctx, split=None):
        with torch.no_grad():
            return self.head(self.x)


def _validate(method: ToyMethod) -> dict[str, float]:
    # A stand-in for the evaluator: accuracy as "auc", plus a metric that peaks early.
    acc = float((method.score(None).argmax(1) == method.y).float().mean())
    return {"auc": acc, "neg_weight_norm": -float(method.head[1].weight.detach().norm())}


def _ctx(seed: int) -> RunContext:
    return RunContext(dataset_name="toy", dataset=None, backbone=None, config=None, seed=seed)


def _train(seed=0, tmp=None, resume=False, stop_after=None, **cfg):
    seed_everything(seed)
    method = ToyMethod(dataclasses.replace(ToyConfig.defaults("toy"), **cfg))
    ctx = _ctx(seed)
    method.prepare(ctx)
    trainer = Trainer(seed=seed, validate=_validate, checkpoint_dir=tmp, resume=resume,
                      stop_after=stop_after)
    result = trainer.fit(method, ctx)
    return method, result


def test_resume_matches_uninterrupted_run(tmp_path):
    full_method, full = _train(seed=3, tmp=tmp_path / "full")
    # Interrupted after 2 of 4 epochs, then a fresh process state resumes from the checkpoint.
    _, part = _train(seed=3, tmp=tmp_path / "split", stop_after=2)
    assert part.epochs == 2
    torch.manual_seed(999)  # the resumed run must not depend on the RNG state it starts in
    resumed_method, resumed = _train(seed=3, tmp=tmp_path / "split", resume=True)
    assert resumed.resumed_from == 2
    assert resumed.epochs == full.epochs == 4
    assert resumed.chosen_epoch == full.chosen_epoch
    assert resumed.best_value == full.best_value
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in full.history]
    for a, b in zip(full_method.parameters(), resumed_method.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(full_method.score(None), resumed_method.score(None))


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    _train(seed=0, tmp=tmp_path, stop_after=1)
    with pytest.raises(ValueError, match=r"written by another run \(method config, .* or seed differ\)"):
        _train(seed=0, tmp=tmp_path, resume=True, lr=0.01)
    with pytest.raises(ValueError, match="written by another run"):
        _train(seed=1, tmp=tmp_path, resume=True)  # another seed


def test_resume_checks_the_fingerprint_the_harness_passes(tmp_path):
    """The harness passes the run identity's training fingerprint (backbone and weights included):
    a checkpoint of the same config and seed but another fingerprint is never continued."""
    def train(fingerprint, **kwargs):
        seed_everything(0)
        method = ToyMethod(ToyConfig.defaults("toy"))
        method.prepare(_ctx(0))
        return Trainer(seed=0, validate=_validate, checkpoint_dir=tmp_path, fingerprint=fingerprint,
                       **kwargs).fit(method, _ctx(0))

    train("weights-a", stop_after=1)
    with pytest.raises(ValueError, match="written by another run .*backbone, weights"):
        train("weights-b", resume=True)
    assert train("weights-a", resume=True).resumed_from == 1


def test_resume_of_a_finished_run_does_not_train_again(tmp_path):
    method, first = _train(seed=1, tmp=tmp_path)
    again_method, again = _train(seed=1, tmp=tmp_path, resume=True)
    assert again.resumed_from == 4 and again.epochs == 4
    assert again.chosen_epoch == first.chosen_epoch
    assert torch.equal(method.score(None), again_method.score(None))


def test_nan_loss_is_skipped_and_counted():
    # 100 examples / 16 = 7 batches per epoch, 4 epochs = 28 steps; every 3rd loss is NaN.
    method, result = _train(seed=0, nan_every=3)
    assert result.nonfinite_steps == 28 // 3
    assert sum(h.skipped_nonfinite for h in result.history) == 28 // 3
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert all(math.isfinite(h.train_loss) for h in result.history)
    assert result.best_value > 0.5  # it still learned


def test_same_seed_same_result_and_other_seed_differs():
    a, ra = _train(seed=5)
    b, rb = _train(seed=5)
    c, _ = _train(seed=6)
    assert torch.equal(a.score(None), b.score(None))
    assert [h.train_loss for h in ra.history] == [h.train_loss for h in rb.history]
    assert not torch.equal(a.score(None), c.score(None))


def test_model_selection_restores_the_best_epoch():
    # With a metric that is best at epoch 1 (weights only grow), epoch 1's state comes back.
    method, result = _train(seed=0, select_metric="neg_weight_norm", epochs=3)
    assert result.select_metric == "neg_weight_norm"
    assert result.chosen_epoch == max(range(1, 4), key=lambda e: result.history[e - 1].val["neg_weight_norm"])
    assert -float(method.head[1].weight.detach().norm()) == pytest.approx(result.best_value)
    assert result.best_value == max(h.val["neg_weight_norm"] for h in result.history)


def test_select_last_and_unknown_metric():
    _, result = _train(seed=0, select_metric="last", epochs=2)
    assert result.chosen_epoch == 2 and result.best_value is None
    with pytest.raises(ValueError, match="select_metric 'nope' is not a validation metric"):
        _train(seed=0, select_metric="nope", epochs=1)


def test_gradient_accumulation_equals_a_big_batch():
    # Without dropout, 2 x 8 accumulated == one batch of 16 (same order, mean loss), one epoch of SGD.
    def once(bs, acc):
        seed_everything(0)
        method = ToyMethod(ToyConfig(epochs=1, batch_size=bs, grad_accum=acc, lr=0.1, optimizer="sgd",
                                     momentum=0.0, dropout=0.0, select_metric="last"))
        method.prepare(_ctx(0))
        method.x, method.y = method.x[:32], method.y[:32]
        Trainer(seed=0).fit(method, _ctx(0))
        return method.head[1].weight.detach().clone()

    # Batches of 8 in the 16-batch order differ, so compare accumulation against itself at
    # batch 32 (a single step either way): 4 x 8 accumulated vs 1 x 32.
    assert torch.allclose(once(8, 4), once(32, 1), atol=1e-6)


def test_step_scheduler_halves_the_lr():
    _, result = _train(seed=0, scheduler="step", step_size=1, gamma=0.5, epochs=3, lr=0.04)
    assert [h.lr for h in result.history] == pytest.approx([0.04, 0.02, 0.01])  # lr used in each epoch
