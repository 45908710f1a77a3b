"""ClusPro and its base on the real tiny backbone (random weights): wiring, variants, invariants."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from czsl_bench.backbone import load_backbone
from czsl_bench.config import resolve_config
from czsl_bench.method import RunContext, parameter_counts
from czsl_bench.methods import clustering as cl
from czsl_bench.methods.cluspro import (
    VARIANT_VALUES,
    ClusPro,
    ClusProBase,
    ClusProConfig,
    PrototypeMemory,
    assign_and_update,
    project_prototypes,
)
from czsl_bench.methods.three_path_model import Disentangler, ThreePathModel, ThreePathSpec
from czsl_bench.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.tiny_three_path import ALL_PAIRS, ATTRS, OBJS, TRAIN_PAIRS, TinySplit  # noqa: E402


@pytest.fixture(scope="module")
def backbone_factory():
    return lambda: load_backbone("czsl-tiny-vit", None, device="cpu")


def _ctx(backbone, config, split):
    data = SimpleNamespace(attrs=ATTRS, objs=OBJS, train_pairs=TRAIN_PAIRS, split=lambda *a, **k: split)
    ctx = RunContext(dataset_name="synthetic", dataset=data, backbone=backbone, config=config, seed=0)
    return ctx


def _method(cls, backbone_factory, split=None, **overrides):
    torch.manual_seed(0)
    cfg = resolve_config(cls.Config, "synthetic", overrides)
    method = cls(cfg)
    split = split or TinySplit(8)
    ctx = _ctx(backbone_factory(), cfg, split)
    with torch.no_grad():
        method.prepare(ctx)
    method.train_dataset(ctx)
    return method, ctx, split


# ---- config and variants --------------------------------------------------------------------


def test_variant_code_sets_the_released_code_values_and_explicit_values_win():
    paper = resolve_config(ClusProConfig, "ut-zappos", [])
    assert (paper.alpha, paper.beta, paper.tau, paper.kappa) == (0.2, 0.5, 0.1, 1.0)
    code = resolve_config(ClusProConfig, "ut-zappos", ["variant=code"])
    assert (code.alpha, code.beta, code.tau, code.kappa) == (0.1, 0.0, 0.07, 2.0)
    assert code.scheduler_steps_per_epoch == 2 and code.ot_sinkhorn_iters == 100
    mixed = resolve_config(ClusProConfig, "ut-zappos", ["variant=code", "alpha=0.3"])
    assert mixed.alpha == 0.3 and mixed.tau == 0.07
    back = resolve_config(ClusProConfig, "ut-zappos", ["variant=code", "variant=paper"])
    assert back.alpha == 0.2
    with pytest.raises(ValueError, match="variant"):
        resolve_config(ClusProConfig, "ut-zappos", ["variant=released"])
    assert set(VARIANT_VALUES["paper"]) == set(VARIANT_VALUES["code"])


def test_per_dataset_defaults_follow_the_spec():
    mit = ClusProConfig.defaults("mit-states")
    ut = ClusProConfig.defaults("ut-zappos")
    cgqa = ClusProConfig.defaults("cgqa")
    assert (mit.batch_size, ut.batch_size, cgqa.batch_size) == (64, 128, 16)
    assert (mit.vocab_dropout, ut.vocab_dropout, cgqa.vocab_dropout) == (0.3, 0.3, 0.0)
    for c in (mit, ut, cgqa):
        assert (c.epochs, c.lr, c.weight_decay, c.n_prototypes, c.ema_momentum) == (15, 1e-4, 5e-5, 5, 0.99)
        assert (c.scheduler, c.step_size, c.gamma, c.select_metric) == ("step", 5, 0.5, "auc")
    assert ClusProBase.Config.defaults("ut-zappos").clustering is False
    syn = ClusProConfig.defaults("synthetic")
    assert syn.epochs <= 10 and syn.amp is False


def test_ablation_grid_is_the_issue_grid():
    grid = ClusPro.ablations()
    assert {"full", "no-pcl", "no-pdl", "base"} <= set(grid)
    # the grid is written with the paper's names (mu, K), aliases of the config fields
    assert sorted(v["mu"] for k, v in grid.items() if k.startswith("mu-")) == [0, 0.5, 0.9, 0.99, 0.999]
    assert sorted(v["K"] for k, v in grid.items() if k.startswith("k-")) == [1, 3, 5, 10, 20]
    resolved = {name: resolve_config(ClusProConfig, "synthetic", overrides)  # every entry resolves
                for name, overrides in grid.items()}
    assert sorted(c.ema_momentum for k, c in resolved.items() if k.startswith("mu-")) == [0, 0.5, 0.9, 0.99, 0.999]
    assert sorted(c.n_prototypes for k, c in resolved.items() if k.startswith("k-")) == [1, 3, 5, 10, 20]


def test_code_variant_halves_the_lr_every_two_and_a_half_epochs():
    # through the real Trainer: StepLR(5, 0.5) stepped twice per epoch (spec §3.6.5)
    cfg = resolve_config(ClusProConfig, "ut-zappos", ["variant=code", "amp=false"])

    class _Tiny(ClusPro):
        def prepare(self, ctx):
            self.w = torch.nn.Linear(1, 1)

        def modules(self):
            return [self.w]

        def train_dataset(self, ctx):
            return torch.utils.data.TensorDataset(torch.ones(2, 1))

        def training_step(self, ctx, batch):
            return self.w(batch[0]).sum()

        def epoch_diagnostics(self):
            return {}

    m = _Tiny(cfg)
    m.prepare(None)
    fit = Trainer(seed=0).fit(m, SimpleNamespace())
    lrs = [h.lr / cfg.lr for h in fit.history]
    expected = [1, 1, 1, .5, .5, .25, .25, .25, .125, .125, .0625, .0625, .0625, .03125, .03125]
    assert lrs == pytest.approx(expected)
    paper = resolve_config(ClusProConfig, "ut-zappos", ["amp=false", "epochs=6"])
    m = _Tiny(paper)
    m.prepare(None)
    assert [h.lr / paper.lr for h in Trainer(seed=0).fit(m, SimpleNamespace()).history] == [1] * 5 + [0.5]


# ---- the clustering inside the method ------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_assignment_updates_only_present_primitives(variant):
    cfg = resolve_config(ClusProConfig, "synthetic", [f"variant={variant}"])
    mem = PrototypeMemory(6, 3, 16)
    if variant == "paper":
        mem.prototypes.copy_(torch.nn.functional.normalize(torch.randn(6, 3, 16), dim=-1))
    before = mem.prototypes.clone()
    labels = torch.tensor([0, 0, 2, 2, 2, 5, 0, 5])
    res = assign_and_update(mem, torch.randn(8, 16).relu(), labels, cfg)
    assert res.marginal_error < 1e-6
    assert res.label_index.shape == (8,) and int(res.label_index.max()) < 3
    absent = torch.tensor([1, 3, 4])
    assert torch.equal(mem.prototypes[absent], before[absent])
    assert not torch.equal(mem.prototypes[torch.tensor([0, 2, 5])], before[torch.tensor([0, 2, 5])])
    if variant == "paper":
        assert mem.initialized.tolist() == [True, False, True, False, False, True]
        torch.testing.assert_close(mem.prototypes[0].norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_prototype_update_is_the_variants_equation(variant):
    # one prototype per primitive, so the assignment is trivial and only the update rule shows:
    # paper, Eq. 9 on the unit sphere: p <- normalize(mu p + (1 - mu) mean_i normalize(f_i));
    # code: p <- mu p + (1 - mu) normalize(sum_i f_i)
    cfg = resolve_config(ClusProConfig, "synthetic", [f"variant={variant}", "n_prototypes=1", "ema_momentum=0.5"])
    g = torch.Generator().manual_seed(0)
    mem = PrototypeMemory(2, 1, 6)
    mem.prototypes.copy_(torch.nn.functional.normalize(torch.randn(2, 1, 6, generator=g), dim=-1))
    mem.initialized.fill_(True)
    before = mem.prototypes.clone()
    feats = torch.randn(5, 6, generator=g).relu() * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None]
    labels = torch.tensor([0, 0, 0, 1, 1])
    assign_and_update(mem, feats, labels, cfg)
    for c, rows in ((0, [0, 1, 2]), (1, [3, 4])):
        f = feats[rows]
        if variant == "paper":
            want = torch.nn.functional.normalize(
                0.5 * before[c, 0] + 0.5 * torch.nn.functional.normalize(f, dim=-1).mean(0), dim=0)
        else:
            want = 0.5 * before[c, 0] + 0.5 * torch.nn.functional.normalize(f.sum(0), dim=0)
        torch.testing.assert_close(mem.prototypes[c, 0], want)


def test_paper_projection_leaves_batchnorm_statistics_alone_code_projection_does_not():
    stage = Disentangler(16, 0.5).train()
    stage.norm.running_mean.normal_()
    mean0 = stage.norm.running_mean.clone()
    protos = torch.randn(4, 3, 16)
    out = project_prototypes(stage, protos, "paper", batch=5)
    assert out.shape == (12, 16)
    assert torch.equal(stage.norm.running_mean, mean0)
    out.sum().backward()
    assert stage.linear.weight.grad is not None  # still trains the stage
    per_sample = project_prototypes(stage, protos, "code", batch=5)
    assert per_sample.shape == (5, 12, 16)
    assert not torch.equal(stage.norm.running_mean, mean0)
    assert not torch.equal(per_sample[0], per_sample[1])  # own dropout mask per sample


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_training_step_runs_and_reports_diagnostics(variant, backbone_factory):
    method, ctx, split = _method(ClusPro, backbone_factory, variant=variant)
    method.train_mode(True)
    batch = next(iter(torch.utils.data.DataLoader(split.dataset(), batch_size=8)))
    loss = method.training_step(ctx, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert method.model.attr_dis2.linear.weight.grad.abs().sum() > 0
    diag = method.epoch_diagnostics()
    for key in ("attr_effective_k", "obj_effective_k", "attr_offdiag_cosine", "ot_marginal_error", "l_pcl"):
        assert key in diag and math.isfinite(diag[key]), (key, diag)
    assert 1.0 <= diag["attr_effective_k"] <= 5.0 + 1e-5
    assert diag["ot_marginal_error"] < 1e-6
    assert "l_pdl" in diag  # code: computed for the record, not optimised
    assert method.epoch_diagnostics().keys() <= {"attr_effective_k", "obj_effective_k",
                                                 "attr_offdiag_cosine", "obj_offdiag_cosine"}


def test_code_variant_keeps_hsic_out_of_the_loss(backbone_factory, monkeypatch):
    # a huge HSIC must not move the code variant's loss, and must move the paper variant's
    def fake_nhsic(x, y):
        return 1e6 + 0.0 * x.sum()

    for variant, moves in (("code", False), ("paper", True)):
        method, ctx, split = _method(ClusPro, backbone_factory, variant=variant)
        method.train_mode(True)
        batch = next(iter(torch.utils.data.DataLoader(split.dataset(), batch_size=8)))
        state = {k: v.clone() for k, v in method.state_dict().items()}
        torch.manual_seed(1)
        real = method.training_step(ctx, batch).item()
        method.load_state_dict(state)
        monkeypatch.setattr(cl, "nhsic", fake_nhsic)
        torch.manual_seed(1)
        faked = method.training_step(ctx, batch).item()
        monkeypatch.undo()
        assert (faked > 1e5) is moves, (variant, real, faked)
        if not moves:
            assert faked == pytest.approx(real, rel=1e-5)


def test_pcl_targets_in_the_method_index_their_own_block(backbone_factory, monkeypatch):
    seen = []
    real = cl.prototype_contrastive_loss

    def spy(features, own, other, targets, tau):
        seen.append((own.shape[-2], other.shape[-2], targets.clone(), tau))
        return real(features, own, other, targets, tau)

    monkeypatch.setattr(cl, "prototype_contrastive_loss", spy)
    method, ctx, split = _method(ClusPro, backbone_factory)
    method.train_mode(True)
    batch = next(iter(torch.utils.data.DataLoader(split.dataset(), batch_size=8)))
    method.training_step(ctx, batch)
    k = method.config.n_prototypes
    (own_a, other_a, t_a, tau), (own_o, other_o, t_o, _) = seen
    assert (own_a, other_a) == (len(ATTRS) * k, len(OBJS) * k)
    assert (own_o, other_o) == (len(OBJS) * k, len(ATTRS) * k)
    assert t_a.max() < len(ATTRS) * k and t_o.max() < len(OBJS) * k
    _, y_attr, y_obj = method.batch_targets(batch[1])
    assert torch.equal(t_a // k, y_attr) and torch.equal(t_o // k, y_obj)
    assert tau == 0.1


# ---- inference is the base's ----------------------------------------------------------------


def test_inference_ignores_the_prototypes_and_equals_the_base(backbone_factory):
    split = TinySplit(6, seed=3)
    full, ctx, _ = _method(ClusPro, backbone_factory, split=split)
    base, ctx_b, _ = _method(ClusProBase, backbone_factory, split=split)
    base.model.load_state_dict(full.model.state_dict())
    scores = full.score(ctx, split)
    full.attr_memory.prototypes.fill_(float("nan"))
    full.obj_memory.prototypes.fill_(float("nan"))
    assert torch.equal(full.score(ctx, split), scores)
    assert torch.equal(base.score(ctx_b, split), scores)
    assert scores.shape == (6, len(ALL_PAIRS))
    # the score is the raw composition logit plus the product of primitive probabilities
    model = full.model
    with torch.no_grad():
        feats = model.image_features(split.images)
        s_c, s_a, s_o = model.branch_logits(feats, model.text_features(split.pair_attr, split.pair_obj))
    expected = s_c + s_a.softmax(-1)[:, split.pair_attr] * s_o.softmax(-1)[:, split.pair_obj]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)


def test_memory_travels_in_the_state_dict_but_base_has_none(backbone_factory):
    full, _, _ = _method(ClusPro, backbone_factory)
    base, _, _ = _method(ClusProBase, backbone_factory)
    assert any("prototypes" in k for k in full.state_dict())
    assert not any("prototypes" in k for k in base.state_dict())
    # same trainable parameters: clustering adds no parameter (paper Table 10: 8.7 M both)
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in base.parameters())


# ---- the three-path model itself ------------------------------------------------------------


def test_prompt_and_vocabulary_initialisation(backbone_factory):
    bb = backbone_factory()
    model = ThreePathModel(bb, ATTRS, OBJS, ThreePathSpec())
    ids = bb.tokenize(["a photo of"], context_length=8)
    emb = bb.token_embedding(ids)[0, 1:4]
    for branch in range(3):
        torch.testing.assert_close(model.prefix[branch].detach(), emb)
    # "Faux.Fur" -> "faux fur": the mean of its BPE token embeddings
    ids = bb.tokenize(["faux fur"], context_length=8)[0]
    eot = int(bb.eot_index(ids[None])[0])
    torch.testing.assert_close(model.vocabulary[ATTRS.index("Faux.Fur")].detach(), bb.token_embedding(ids[1:eot]).mean(0))
    # adapters start as a no-op: the adapted feature is the frozen CLIP feature
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(images).image, bb.encode_image(images, adapters=False))


@pytest.mark.slow
def test_vit_l14_parameter_count_matches_the_paper():
    # spec §1.1: 8.74 M trainable on UT-Zappos (16 attributes, 12 objects), paper Table 10: 8.7 M
    backbone = load_backbone("ViT-L-14-quickgelu", None, device="cpu")
    cfg = ClusProConfig.defaults("ut-zappos")
    data = SimpleNamespace(attrs=[f"a{i}" for i in range(16)], objs=[f"o{i}" for i in range(12)],
                           train_pairs=[("a0", "o0")])
    method = ClusPro(cfg)
    with torch.no_grad():
        method.prepare(RunContext(dataset_name="ut-zappos", dataset=data, backbone=backbone, config=cfg, seed=0))
    assert parameter_counts(method, backbone)["trainable"] == 8_740_608


# ---- the ablation plot ----------------------------------------------------------------------


def _record(variant, seed, auc, method="cluspro"):
    from fixtures.records import make_run_record

    # an ablation run is its own configuration: the variant's overrides are in its identity
    overrides = ClusPro.ablations().get(variant, {}) if variant else {}
    return make_run_record(method, "synthetic", "closed", seed,
                           {"val": {"auc": auc}, "test": {"auc": auc, "best_hm": auc}},
                           variant=variant, overrides=overrides)


def test_ablation_plot_draws_every_sweep_from_records(tmp_path):
    from czsl_bench.plots import _mean_std, _values, ablation_sweep_figure

    records = [_record(f"mu-{mu:g}", s, 0.1 + mu / 10 + s / 100) for mu in (0, 0.5, 0.9, 0.99) for s in range(3)]
    records += [_record(f"k-{k}", s, 0.1 + k / 100) for k in (1, 3, 5) for s in range(2)]
    records += [_record("base", s, 0.05) for s in range(3)] + [_record(None, 0, 0.3)]
    assert sorted(_values(records, "cluspro", "synthetic", "mu-0.5", "auc", "closed", "test")) == \
        pytest.approx([0.15, 0.16, 0.17])
    assert _values(records, "cluspro", "synthetic", "full", "auc", "closed", "test") == [0.3]  # variant None
    # another method's plain runs are not ClusPro's full method
    assert _values(records + [_record(None, 1, 0.9, method="csp")], "cluspro", "synthetic", "full", "auc",
                   "closed", "test") == [0.3]
    # (point name, record) pairs from the ablation API name the point themselves
    assert _values([("mu-0.99", records[-1])], "cluspro", "synthetic", "mu-0.99", "auc", "closed", "test") == [0.3]
    mean, std = _mean_std([0.15, 0.16, 0.17])
    assert (mean, std) == (pytest.approx(0.16), pytest.approx(0.01))
    out = ablation_sweep_figure(records, "cluspro", "synthetic", ClusPro.ablation_sweeps(), tmp_path / "a" / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "a").glob(".*"))  # no temp file left behind
    with pytest.raises(ValueError, match="czsl-bench ablate"):
        ablation_sweep_figure(records, "cluspro", "ut-zappos", ClusPro.ablation_sweeps(), tmp_path / "q.png")
