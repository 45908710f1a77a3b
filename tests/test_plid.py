"""PLID (methods/plid.py) against spec-baselines §4: the Gaussian upper bound by hand, the grouped
bound equal to the full one, lambda sampling, partial label smoothing, seeded test-time views,
the per-dataset defaults of §4.2, the bank in the run identity, and runs through the harness on
the 3 x 3 toy world (tiny open_clip, random weights)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import czsl_bench
from czsl_bench.backbone import load_backbone
from czsl_bench.method import RunContext, check_method_class
from czsl_bench.methods.plid import (PLID, CrossAttention, PLIDConfig, ViewImages, centred_samples,
                                     gaussian_upper_bound, grouped_upper_bound, object_groups,
                                     partial_smoothing_targets, sample_lambda, soft_cross_entropy, view_transform)
from czsl_bench.registry import METHODS
from fixtures.toy_world import ATTRS, OBJS, registered_toy_dataset

TINY = dict(backbone="czsl-tiny-vit", pretrained="none")


# ---------------------------------------------------------------------------------------------
# The upper bound
# ---------------------------------------------------------------------------------------------
def test_upper_bound_matches_a_hand_computed_example():
    # two classes in 2-d, two samples each (already centred), image x = (0.6, 0.8), label 0
    x = torch.tensor([[0.6, 0.8]])
    z = torch.tensor([[[0.1, 0.0], [0.0, 0.2]],    # sample 1: class 0, class 1
                      [[-0.1, 0.0], [0.0, -0.2]]])  # sample 2
    logits = torch.tensor([[2.0, 1.0]])
    tau = 10.0
    # Var[x.(t_1 - t_0)] = mean_s sum_d x_d^2 (z_s0d - z_s1d)^2
    #   sample 1: 0.36 * (0.1 - 0)^2 + 0.64 * (0 - 0.2)^2 = 0.0036 + 0.0256 = 0.0292; sample 2 the same
    var = 0.0292
    expected = torch.tensor([[2.0, 1.0 + 0.5 * tau ** 2 * var]])  # 1 + 1.46 = 2.46; the label's own term is 0
    out = gaussian_upper_bound(logits, x, z, torch.tensor([0]), tau)
    torch.testing.assert_close(out, expected)
    # the bound: CE(out) = log(e^2 + e^2.46) - 2
    assert F.cross_entropy(out, torch.tensor([0])).item() == pytest.approx(math.log(math.exp(2) + math.exp(2.46)) - 2)


def test_upper_bound_bounds_the_expected_cross_entropy_of_gaussian_classes():
    # for Gaussian class features the bound is E[log sum exp] <= log sum exp E[.] + Var/2 (Jensen + MGF)
    g = torch.Generator().manual_seed(0)
    k, d, s = 4, 6, 4000
    mean = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    std = 0.05 * torch.rand(k, d, generator=g)
    samples = mean[None] + std[None] * torch.randn(s, k, d, generator=g)  # [S, K, D]
    x = F.normalize(torch.randn(3, d, generator=g), dim=-1)
    y = torch.tensor([0, 2, 3])
    tau = 20.0
    expected_ce = torch.stack([F.cross_entropy(tau * x @ samples[i].t(), y, reduction="none") for i in range(s)]).mean(0)
    centred = samples - samples.mean(0, keepdim=True)
    bound = F.cross_entropy(gaussian_upper_bound(tau * x @ samples.mean(0).t(), x, centred, y, tau), y, reduction="none")
    assert (bound >= expected_ce - 1e-4).all()
    assert (bound - expected_ce).max() < 0.5  # and it is not vacuous


def test_grouped_bound_equals_the_full_one_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    k, n, d, b = 11, 5, 8, 6
    mean = torch.randn(k, d, generator=g, requires_grad=True)
    sent = F.normalize(torch.randn(k, n, d, generator=g), dim=-1)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_(True)
    y = torch.tensor([0, 3, 3, 7, 10, 5])
    pair_obj = torch.tensor([0, 1, 0, 2, 1, 3, 3, 2, 0, 4, 4])
    groups = object_groups(pair_obj, max_size=3)
    assert sorted(torch.cat(groups).tolist()) == list(range(k))
    assert all(len(set(pair_obj[gr].tolist())) == len(pair_obj[gr].unique()) for gr in groups)

    logits = 10 * img @ F.normalize(mean, dim=-1).t()
    full = gaussian_upper_bound(logits, img, centred_samples(mean, sent), y, 10.0)
    grouped = grouped_upper_bound(logits, img, mean, sent, y, 10.0, groups)
    torch.testing.assert_close(grouped, full)
    gf = torch.autograd.grad(full.logsumexp(-1).sum(), (mean, img), retain_graph=True)
    gg = torch.autograd.grad(grouped.logsumexp(-1).sum(), (mean, img))
    for a, c in zip(gf, gg):
        torch.testing.assert_close(a, c)


def test_object_groups_keep_each_object_whole():
    pair_obj = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    groups = object_groups(pair_obj, max_size=2)
    for gr in groups:  # an object's pairs never straddle two groups
        for o in pair_obj[gr].unique().tolist():
            assert set(torch.nonzero(pair_obj == o).squeeze(1).tolist()) <= set(gr.tolist())


# ---------------------------------------------------------------------------------------------
# Logit mixup, label smoothing
# ---------------------------------------------------------------------------------------------
def test_lambda_is_beta_1_9_in_training_and_its_mean_at_test():
    torch.manual_seed(0)
    draws = torch.tensor([sample_lambda(1.0, 9.0) for _ in range(20000)])
    assert ((draws > 0) & (draws < 1)).all()
    assert draws.mean().item() == pytest.approx(0.1, abs=0.004)
    assert draws.var().item() == pytest.approx(9 / (100 * 11), rel=0.06)  # ab / ((a+b)^2 (a+b+1))
    # Beta(1, b) has CDF 1 - (1 - x)^b: P(lam < 0.1) = 1 - 0.9^9 = 0.6126
    assert (draws < 0.1).float().mean().item() == pytest.approx(1 - 0.9 ** 9, abs=0.01)
    assert PLIDConfig().test_lambda == pytest.approx(0.1)
    torch.manual_seed(3)
    a = sample_lambda(1.0, 9.0)
    torch.manual_seed(3)
    assert sample_lambda(1.0, 9.0) == a  # drawn from the seeded global RNG


def test_partial_label_smoothing_spreads_the_mass_over_same_attribute_pairs():
    pair_attr = torch.tensor([0, 0, 0, 1, 1, 2])
    q = partial_smoothing_targets(torch.tensor([1, 3, 5]), pair_attr, 0.01)
    torch.testing.assert_close(q.sum(1), torch.ones(3))
    assert q[0].tolist() == pytest.approx([0.005, 0.99, 0.005, 0, 0, 0])
    assert q[1].tolist() == pytest.approx([0, 0, 0, 0.99, 0.01, 0])
    assert q[2].tolist() == pytest.approx([0, 0, 0, 0, 0, 1.0])  # attribute 2 has no other pair
    logits = torch.randn(3, 6)
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(torch.tensor([1, 3, 5]), 6).float()),
                               F.cross_entropy(logits, torch.tensor([1, 3, 5])))


# ---------------------------------------------------------------------------------------------
# Config: spec-baselines §4.2
# ---------------------------------------------------------------------------------------------
def test_per_dataset_defaults_are_the_released_configs():
    mit, ut, cg = (PLIDConfig.defaults(r) for r in ("mit-states", "ut-zappos", "cgqa"))
    assert (mit.epochs, mit.lr, mit.weight_decay, mit.batch_size, mit.grad_accum) == (50, 5e-5, 2e-5, 64, 2)
    assert (ut.epochs, ut.lr, ut.weight_decay, ut.batch_size, ut.grad_accum) == (25, 1e-4, 1e-5, 128, 2)
    assert (cg.epochs, cg.lr, cg.weight_decay, cg.batch_size, cg.grad_accum) == (20, 1e-5, 1e-5, 64, 2)
    assert (mit.num_texts, ut.num_texts, cg.num_texts) == (64, 32, 64)
    assert (mit.attn_dropout, ut.attn_dropout, cg.attn_dropout) == (0.5, 0.1, 0.1)
    assert (mit.tune_vit, ut.tune_vit, cg.tune_vit) == (False, True, True)
    assert (mit.label_smoothing, ut.label_smoothing, cg.label_smoothing) == (0.0, 0.001, 0.01)
    assert (mit.group_gauss, ut.group_gauss, cg.group_gauss) == (False, False, True)
    assert (mit.w_attr, ut.w_attr, cg.w_attr) == (0.1, 0.01, 0.01)
    for c in (mit, ut, cg):
        assert (c.attr_dropout, c.context_length, c.num_aug, c.scheduler, c.gamma, c.val_every) == (
            0.3, 8, 8, "step", 0.5, 2)
        assert c.step_size == 0 and c.adam_eps == 1e-4  # StepLR(epochs // 5); Adam eps of the fp16 runs
        assert c.eval_views == "seeded" and c.test_lambda == pytest.approx(0.1)


def test_plid_is_registered_and_satisfies_the_contract():
    assert METHODS.get("plid") is PLID
    check_method_class(PLID)


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------
# world, backbone: tests/conftest.py


def test_seeded_views_are_the_same_every_time_and_random_views_are_not(world, backbone):
    split = world.split("test")
    tf = view_transform(backbone, PLIDConfig(num_aug=3))
    seeded = ViewImages(split, 3, tf, seed=0)
    torch.manual_seed(5)
    a = seeded[1][1]
    torch.manual_seed(99)  # the global RNG does not matter
    assert torch.equal(seeded[1][1], a)
    assert a.shape[0] == 3 and not torch.equal(a[0], a[1])  # views differ from each other
    assert not torch.equal(ViewImages(split, 3, tf, seed=1)[1][1], a)  # another view seed, other views
    free = ViewImages(split, 3, tf, seed=None)
    assert not torch.equal(free[1][1], free[1][1])  # the released behaviour: new views each time


def test_cross_attention_parameter_count_is_12d2_plus_15d():
    assert sum(p.numel() for p in CrossAttention(768, 12, 0.1).parameters()) == 12 * 768 ** 2 + 15 * 768


# ---------------------------------------------------------------------------------------------
# Through the harness on the toy world
# ---------------------------------------------------------------------------------------------
def _bank(tmp_path, layout="jsonl"):
    import json
    import pickle

    entries = {(a, o): [f"a photo of a {a} {o}.", f"a {o} coloured {a}.", f"{a} {o}"] for a in ATTRS for o in OBJS[:2]}
    if layout == "pickle":
        path = tmp_path / "bank.pkl"
        path.write_bytes(pickle.dumps(entries))
    else:
        path = tmp_path / "bank.jsonl"
        path.write_text("".join(json.dumps({"attr": a, "obj": o, "texts": t}) + "\n" for (a, o), t in entries.items()))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_dataset(tmp_path_factory.mktemp("toy-run")) as root:
        yield root


FAST = ["epochs=2", "batch_size=16", "num_aug=2", "num_texts=3", "lr=1e-3", "val_every=1"]


def test_run_both_settings_records_bank_identity_and_fallbacks(toy, tmp_path):
    bank = _bank(tmp_path)
    records = czsl_bench.run("plid", "toy", seed=0, setting="both", results_dir=tmp_path / "results",
                             cache_dir=tmp_path / "cache", overrides=FAST + [f"text_bank={bank}"], **TINY)
    closed, opened = records
    import hashlib

    digest = hashlib.sha256(bank.read_bytes()).hexdigest()
    for rec in records:
        assert rec.identity["inputs"] == {"text_bank": digest}
        info = rec.environment["method"]
        assert info["text_bank"]["path"] == str(bank) and info["text_bank"]["sha256"] == digest
        assert info["eval_views"] == "seeded" and info["test_lambda"] == pytest.approx(0.1)
        assert rec.params["trainable"] > 0 and 0 <= rec.metrics["test"]["auc"] <= 1
    # 6 train pairs, 2 of them (the triangles) undescribed; the toy's closed world is all 9 pairs
    assert closed.environment["method"]["fallback_pairs"]["train"] == {"pairs": 6, "fallback": 2}
    assert closed.environment["method"]["fallback_pairs"]["closed"] == {"pairs": 9, "fallback": 3}
    # deterministic evaluation: the same run again gives the same numbers
    again = czsl_bench.run("plid", "toy", seed=0, setting="closed", results_dir=tmp_path / "r2",
                           cache_dir=tmp_path / "cache", overrides=FAST + [f"text_bank={bank}"], write=False, **TINY)
    assert again[0].metrics["test"] == closed.metrics["test"] if isinstance(again, list) else \
        again.metrics["test"] == closed.metrics["test"]


def test_another_bank_is_another_identity_and_a_pickle_bank_is_read(toy, tmp_path):
    from czsl_bench import api

    a = _bank(tmp_path, "jsonl")
    b = _bank(tmp_path, "pickle")
    ds = api.load_dataset("toy")
    ia = PLID.identity_inputs(PLIDConfig(text_bank=str(a)), ds)
    ib = PLID.identity_inputs(PLIDConfig(text_bank=str(b)), ds)
    assert ia != ib and len(ia["text_bank"]) == 64


def test_stochastic_evaluation_option_and_open_world_blocks(world, backbone, tmp_path):
    bank = _bank(tmp_path)
    cfg = dataclasses.replace(PLIDConfig.defaults("synthetic"), text_bank=str(bank), num_aug=2, score_block=4)
    method = PLID(cfg)
    ctx = RunContext(dataset_name="toy", dataset=world, backbone=backbone, config=cfg, seed=0)
    method.prepare(ctx)
    split = world.split("test", "open")
    blocks = list(method.score(ctx, split))  # 9 pairs in blocks of 4: streamed like the other methods
    assert [s for s, _ in blocks] == [0, 4, 8]
    streamed = torch.cat([blk for _, blk in blocks], dim=1)
    method.config = dataclasses.replace(cfg, score_block=50)
    dense = method.score(ctx, split)
    torch.testing.assert_close(streamed, dense)
    torch.testing.assert_close(method.score(ctx, split), dense)  # seeded views: deterministic
    method.config = dataclasses.replace(cfg, score_block=50, eval_views="random")
    assert not torch.equal(method.score(ctx, split), dense)  # the released stochastic evaluation


def test_training_step_backpropagates_into_every_part(world, backbone, tmp_path):
    bank = _bank(tmp_path)
    cfg = dataclasses.replace(PLIDConfig.defaults("ut-zappos"), text_bank=str(bank), num_aug=2, num_texts=3,
                              group_gauss=True, gauss_group_size=2, amp=False)
    method = PLID(cfg)
    ctx = RunContext(dataset_name="toy", dataset=world, backbone=backbone, config=cfg, seed=0)
    method.prepare(ctx)
    data = method.train_dataset(ctx)
    batch = [torch.stack([data[i][j] for i in range(4)]) for j in range(3)]
    method.train_mode(True)
    loss = method.training_step(ctx, batch)
    loss.backward()
    names = {n for n, p in method.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("prompt.vocab", "prompt.context", "text_attn.", "image_attn.", "attr_mlp.", "obj_mlp.", "vit_block."):
        assert any(n.startswith(part) for n in names), part
    assert all(p.grad is None for p in backbone.model.parameters())  # the backbone's own block is untouched



@pytest.mark.parametrize("tune_vit, train_views", [(True, "fresh"), (False, "fresh"), (False, "fixed")])
def test_every_image_path_trains_and_scores(world, backbone, tmp_path, tune_vit, train_views):
    # tuned last block (images through the encoder), frozen encoder with fresh view images per
    # step (the released training), frozen encoder with one cached set of view features
    bank = _bank(tmp_path)
    cfg = dataclasses.replace(PLIDConfig.defaults("synthetic"), text_bank=str(bank), num_aug=2,
                              tune_vit=tune_vit, train_views=train_views, label_smoothing=0.01)
    method = PLID(cfg)
    ctx = RunContext(dataset_name="toy", dataset=world, backbone=backbone, config=cfg, seed=0)
    method.prepare(ctx)
    data = method.train_dataset(ctx)
    batch = [torch.stack([data[i][j] for i in range(3)]) for j in range(3)]
    assert batch[1].dim() == (3 if train_views == "fixed" and not tune_vit else 5)  # [B, M, D] or [B, M, 3, H, W]
    method.train_mode(True)
    loss = method.training_step(ctx, batch)
    loss.backward()
    assert torch.isfinite(loss) and method.model.prompt.vocab.grad.abs().sum() > 0
    method.train_mode(False)
    split = world.split("val")
    scores = method.score(ctx, split)
    assert scores.shape == (len(split), len(split.pairs)) and torch.isfinite(scores).all()
    torch.testing.assert_close(method.score(ctx, split), scores)  # seeded views: the same numbers again


# ---------------------------------------------------------------------------------------------
# The real architecture: ViT-L/14 (QuickGELU) with random weights on CPU
# ---------------------------------------------------------------------------------------------
# docs/plid.md derives these by hand: d = 768 (embed and text width), W = 1024 (vision width)
#   vocabulary (|A| + |O|) * d, context 3 * d, each cross-attention block 12 d^2 + 15 d,
#   the two VLPD MLPs 2 * (8 d^2 + 5 d), the last ViT block 12 W^2 + 13 W (UT-Zappos, C-GQA)
VOCAB = {"mit-states": (115, 245), "ut-zappos": (16, 12), "cgqa": (413, 674)}
EXPECTED_TRAINABLE = {"mit-states": 23_902_464, "ut-zappos": 36_243_712, "cgqa": 37_057_024}


def _hand_count(recipe: str) -> int:
    d, w = 768, 1024
    a, o = VOCAB[recipe]
    cfg = PLIDConfig.defaults(recipe)
    return ((a + o) * d + 3 * d + 2 * (12 * d * d + 15 * d) + 2 * (8 * d * d + 5 * d)
            + (12 * w * w + 13 * w if cfg.tune_vit else 0))


@pytest.fixture(scope="module")
def vit_l():
    torch.manual_seed(0)
    return load_backbone("ViT-L-14-quickgelu", None, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mit-states", "ut-zappos", "cgqa"])
def test_trainable_parameters_on_vit_l14_match_the_hand_count(vit_l, recipe):
    from czsl_bench.methods.plid import PLIDModel

    assert _hand_count(recipe) == EXPECTED_TRAINABLE[recipe]
    a, o = VOCAB[recipe]
    model = PLIDModel(vit_l, [f"state{i}" for i in range(a)], [f"thing{i}" for i in range(o)],
                      PLIDConfig.defaults(recipe), torch.device("cpu"), lambda n: n)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == EXPECTED_TRAINABLE[recipe]
    assert model.text_attn.attn.num_heads == 12


@pytest.mark.slow
def test_vit_l14_forward_backward_and_one_step_on_cpu(vit_l, world, tmp_path):
    bank = _bank(tmp_path)
    cfg = dataclasses.replace(PLIDConfig.defaults("ut-zappos"), text_bank=str(bank), num_aug=2, num_texts=3, amp=False)
    method = PLID(cfg)  # last ViT block tuned, group_gauss off; C-GQA's grouped bound is exercised above
    ctx = RunContext(dataset_name="toy", dataset=world, backbone=vit_l, config=cfg, seed=0)
    method.prepare(ctx)
    data = method.train_dataset(ctx)
    batch = [torch.stack([data[i][j] for i in (0, 7)]) for j in range(3)]  # 2 images, 2 views each
    assert batch[0].shape == (2, 3, 224, 224) and batch[1].shape == (2, 2, 3, 224, 224)
    params = method.parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-4, eps=cfg.adam_eps)
    method.train_mode(True)
    loss = method.training_step(ctx, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert method.model.vit_block.mlp.c_fc.weight.grad.abs().sum() > 0
    assert method.model.prompt.vocab.grad.abs().sum() > 0 and method.model.image_attn.ln_q.weight.grad is not None
    assert all(p.grad is None for p in vit_l.model.parameters())
    optimizer.step()
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert changed == len(params)
