"""CAMS (docs/cams.md): config and variants, GCA and MSD against their equations, the global
feature, the released attribute-prompt defect, scores, the harness run, and the ViT-L/14
parameter counts and smoke step."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import czsl_bench
from czsl_bench.backbone import load_backbone
from czsl_bench.config import ConfigError, resolve, resolve_config
from czsl_bench.method import check_method_class, parameter_counts
from czsl_bench.methods.cams import (
    CAMS,
    RELEASED_OPEN_THRESHOLDS,
    CAMSConfig,
    GatedCrossAttention,
    SpaceEncoder,
)
from czsl_bench.methods.pair_scores import dense
from fixtures.tiny_three_path import ATTRS, TinySplit, build, registered_toy_world, strip_adapters, vocabulary


@pytest.fixture(scope="module")
def tiny():
    return lambda: load_backbone("czsl-tiny-vit", None, device="cpu")


def _trained_a_little(tiny, overrides=(), steps=2):
    torch.manual_seed(0)  # the random backbone weights too: the same model whatever ran before
    split = TinySplit(8)
    method, ctx, _ = build(CAMS, tiny(), overrides=overrides, split=split)
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    method.train_mode(True)
    for _ in range(steps):
        opt.zero_grad()
        method.training_step(ctx, (split.images, split.labels)).backward()
        opt.step()
    method.train_mode(False)
    return method, ctx, split


# ---- config and variants ---------------------------------------------------------------------


def test_per_dataset_defaults_follow_the_released_configs():
    mit, ut, cgqa = (CAMSConfig.defaults(r) for r in ("mit-states", "ut-zappos", "cgqa"))
    assert (mit.lr, ut.lr, cgqa.lr) == (1e-4, 2.5e-4, 1e-4)
    assert (mit.step_size, ut.step_size, cgqa.step_size) == (5, 1, 5)  # UT-Zappos halves the LR every epoch
    assert (mit.gca_blocks, ut.gca_blocks, cgqa.gca_blocks) == (8, 9, 12)
    assert (mit.adapter_dim, ut.adapter_dim, cgqa.adapter_dim) == (128, 64, 128)
    assert (mit.beta, ut.beta, cgqa.beta) == (0.85, 0.65, 0.85)
    for c in (mit, ut, cgqa):
        assert (c.epochs, c.batch_size, c.weight_decay, c.gamma, c.scheduler) == (15, 64, 1e-5, 0.5, "step")
        assert (c.n_units, c.vocab_dropout, c.select_metric, c.optimizer) == (32, 0.3, "auc", "adam")
        assert (c.w_attr, c.w_obj, c.w_pair, c.w_global) == (0.5, 0.5, 1.0, 1.0)
        assert (c.unit_dropout, c.feature_dropout, c.attn_dropout, c.mlp_dropout) == (0.5, 0.5, 0.1, 0.1)
        assert c.variant == "default" and c.amp and c.amp_dtype == "bfloat16"
    syn = CAMSConfig.defaults("synthetic")
    assert (syn.gca_blocks, syn.adapter_dim, syn.n_units, syn.amp) == (2, 16, 8, False) and syn.epochs <= 10
    aliased = resolve_config(CAMSConfig, "ut-zappos", ["M=4", "K=16"])
    assert (aliased.gca_blocks, aliased.n_units) == (4, 16)
    for bad, match in (("variant=released", "variant"), ("beta=1.5", "beta"), ("M=0", "gca_blocks"),
                       ("unit_dropout=1", "unit_dropout"), ("adapter_dim=0", "adapter_dim")):
        with pytest.raises(ConfigError, match=match):
            resolve_config(CAMSConfig, "ut-zappos", [bad])


def test_ablations_resolve_to_distinct_configs():
    check_method_class(CAMS)
    grid = CAMS.ablations()
    assert {"full", "no-gate", "no-gca", "single-space", "no-global", "no-composition", "code"} <= set(grid)
    assert sorted(v["M"] for k, v in grid.items() if k.startswith("m-")) == [1, 2, 4, 8, 12]
    assert sorted(v["K"] for k, v in grid.items() if k.startswith("units-")) == [8, 16, 32, 64]
    configs = {name: resolve(CAMS, "ut-zappos", ablation=name).config for name in grid}
    assert (configs["no-global"].beta, configs["no-global"].w_global) == (0.0, 0.0)
    assert (configs["no-composition"].beta, configs["no-composition"].w_pair) == (1.0, 0.0)
    # K = 32 is the released default: units-32 is the full method on ViT-L (ablate trains it once)
    assert vars(configs["units-32"]) == vars(configs["full"])
    assert len({json.dumps(vars(c), sort_keys=True, default=str) for c in configs.values()}) == len(grid) - 1


def test_ablate_grid_on_the_synthetic_world_trains_equal_configs_once():
    from czsl_bench.ablation import ablation_grid

    points = {p.name: p for p in ablation_grid("cams", "synthetic")}
    # the synthetic recipe reads M = 2 blocks with K = 8 units: those two points are the full method
    assert points["m-2"].runs_as == points["units-8"].runs_as == "full"
    assert points["m-2"].ablation is None and points["no-gate"].ablation == "no-gate"
    assert {p.runs_as for p in points.values()} == set(points) - {"m-2", "units-8"}


def test_released_thresholds_lie_inside_the_feasibility_range_and_off_the_search_grid():
    from czsl_bench.cli.info import _shipped_vocabulary
    from czsl_bench.evaluation.feasibility import reference_feasibility, threshold_grid

    kept = {}
    for dataset, t in RELEASED_OPEN_THRESHOLDS.items():
        data = _shipped_vocabulary(dataset)
        objs = {o: j for j, o in enumerate(data.objs)}
        seen = torch.zeros(len(data.attrs) * len(data.objs), dtype=torch.bool)
        for a, o in data.train_pairs:
            seen[data.attrs.index(a) * len(data.objs) + objs[o]] = True
        feas = reference_feasibility(dataset)
        grid = threshold_grid(feas, seen)
        assert grid[0] < t < grid[-1]
        assert 1e-3 < min(abs(g - t) for g in grid) < 5e-3  # fixed, not one of the validation grid points
        kept[dataset] = float((feas[~seen] >= t).float().mean())
    # docs/cams.md: the fixed thresholds keep 85.3 % / 12.2 % / 5.0 % of the unseen pairs
    assert kept["ut-zappos"] == pytest.approx(0.853, abs=1e-3)
    assert kept["mit-states"] == pytest.approx(0.122, abs=1e-3)
    assert kept["cgqa"] == pytest.approx(0.050, abs=1e-3)


# ---- components against the equations --------------------------------------------------------


def _manual_gca(gca, u, h, gate=True):
    heads = gca.heads
    b, k, w = u.shape
    d = w // heads
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    q = gca.ln_1(u) @ gca.q.weight.T
    hn = gca.ln_1(h)
    attn = torch.softmax(split(q) @ split(hn @ gca.k.weight.T).transpose(-1, -2) / math.sqrt(d), -1)
    x = (attn @ split(hn @ gca.v.weight.T)).transpose(1, 2).reshape(b, k, w)
    g = torch.sigmoid((q @ gca.w_z.weight.T + gca.w_z.bias) * (x @ gca.u_z.weight.T + gca.u_z.bias)) if gate \
        else torch.ones_like(x)
    u = u + (g * x) @ gca.out.weight.T + gca.out.bias
    m = gca.mlp[0](gca.ln_2(u))
    return u + gca.mlp[3](m * torch.sigmoid(1.702 * m)), g, attn


def test_gated_cross_attention_is_the_equation_and_the_gate_lies_in_zero_one():
    torch.manual_seed(0)
    gca = GatedCrossAttention(32, heads=4).eval()
    u, h = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    out, g = gca(u, h)
    expected, g_ref, attn = _manual_gca(gca, u, h)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref)
    assert bool(((g > 0) & (g < 1)).all())
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 5))
    # with G = 1 it is a plain pre-LN cross-attention block (no gate parameters used)
    plain, ones = gca(u, h, gate=False)
    torch.testing.assert_close(plain, _manual_gca(gca, u, h, gate=False)[0], rtol=1e-5, atol=1e-5)
    assert bool((ones == 1).all()) and not torch.allclose(plain, out)
    # one LayerNorm for queries and tokens; the two 1024-wide ViT-L blocks count as the docs say
    assert sum(p.numel() for p in GatedCrossAttention(1024).parameters()) == 14_692_352


def test_space_encoder_is_a_pre_ln_transformer_layer():
    torch.manual_seed(0)
    enc = SpaceEncoder(32, heads=8).eval()
    ref = torch.nn.TransformerEncoderLayer(32, 8, 128, dropout=0.0, batch_first=True, norm_first=True,
                                           activation=lambda x: x * torch.sigmoid(1.702 * x)).eval()
    ref.self_attn.load_state_dict(enc.attn.state_dict())
    ref.norm1.load_state_dict(enc.ln_1.state_dict())
    ref.norm2.load_state_dict(enc.ln_2.state_dict())
    ref.linear1.load_state_dict(enc.mlp[0].state_dict())
    ref.linear2.load_state_dict(enc.mlp[3].state_dict())
    x = torch.randn(3, 6, 32)
    torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in SpaceEncoder(1024).parameters()) == 12_596_224


def test_adapters_sit_on_the_last_m_blocks_and_f_g_is_frozen_clip_and_ignores_gca(tiny):
    method, ctx, split = build(CAMS, tiny(), split=TinySplit(4))
    bb = ctx.backbone
    assert bb.adapter_blocks == (2, 3) and len(bb.adapters) == 4 and method.blocks == [2, 3]
    method.train_mode(False)
    with torch.no_grad():
        feats = method.image_features(split.images)
        torch.testing.assert_close(feats.glob, bb.encode_image(split.images, adapters=False).float())
        for p in list(method.heads.gca.parameters()) + list(method.heads.spaces.parameters()):
            p.add_(torch.randn_like(p))
        again = method.image_features(split.images)
    torch.testing.assert_close(again.glob, feats.glob, rtol=0, atol=0)  # GCA never writes into the ViT
    assert not torch.allclose(again.comp, feats.comp)
    assert feats.attr.shape == feats.obj.shape == feats.comp.shape == (4, int(bb.embed_dim))
    assert float(method.heads.tau.detach()) == pytest.approx(float(bb.logit_scale))


def test_units_read_the_last_blocks_in_order(tiny):
    method, ctx, split = build(CAMS, tiny(), split=TinySplit(2))
    method.train_mode(False)
    heads, bb = method.heads, ctx.backbone
    with torch.no_grad():
        _, hidden = bb.encode_image_blocks(split.images, [2, 3])
        units = heads.units.unsqueeze(0).expand(2, -1, -1)
        for block in (2, 3):
            units, _ = heads.gca(units, hidden[block])
        torch.testing.assert_close(heads.read_units([hidden[2], hidden[3]]), units)
        swapped = heads.read_units([hidden[3], hidden[2]])
        assert not torch.allclose(swapped, units)
        # the semantic feature of a space: LN_shared(mean_k Tr_s(U)) @ Pi_s
        f_a = heads.semantic_features(units)[0]
        torch.testing.assert_close(f_a, heads.ln_norm(heads.spaces[0](units).mean(1)) @ heads.proj[0])


def test_unit_dropout_draws_one_mask_for_the_whole_batch(tiny):
    method, ctx, split = build(CAMS, tiny(), overrides=["use_gca=false"], split=TinySplit(3))
    method.heads.train()
    torch.manual_seed(1)
    units = method.heads.read_units([torch.zeros(3, 17, 128)])
    assert torch.equal(units[0], units[1]) and torch.equal(units[1], units[2])
    dropped = units[0] == 0
    assert 0 < dropped.float().mean() < 1
    torch.testing.assert_close(units[0][~dropped], 2 * method.heads.units.detach()[~dropped])


@pytest.mark.parametrize("variant", ["default", "code"])
def test_attribute_prompt_of_the_code_carries_no_attribute(tiny, variant):
    method, ctx, split = build(CAMS, tiny(), overrides=[f"variant={variant}"], split=TinySplit(6))
    method.train_mode(False)
    with torch.no_grad():
        _, attr, obj = method.model.text_features(method.train_pair_attr, method.train_pair_obj)
        z_a, _ = method.primitive_logits(method.image_features(split.images), attr, obj)
    same = torch.allclose(attr, attr[:1].expand_as(attr))
    assert same == (variant == "code")
    if variant == "code":
        torch.testing.assert_close(z_a.softmax(-1), torch.full_like(z_a, 1 / len(ATTRS)))
        y_attr = method.batch_targets(split.labels)[1]
        assert float(F.cross_entropy(z_a, y_attr)) == pytest.approx(math.log(len(ATTRS)), rel=1e-5)
    assert (method.heads.pre_norm is not None) == (variant == "code")


@pytest.mark.parametrize("variant", ["default", "code"])
def test_gradients_reach_the_counted_groups(tiny, variant):
    split = TinySplit(8)
    method, ctx, _ = build(CAMS, tiny(), overrides=[f"variant={variant}"], split=split)
    method.train_mode(True)
    loss = method.training_step(ctx, (split.images, split.labels))
    assert torch.isfinite(loss)
    loss.backward()
    named = dict(method.model.named_parameters()) | {f"heads.{k}": v for k, v in method.heads.named_parameters()}
    for name, p in named.items():
        if name.startswith("heads.pre_norm."):
            assert p.grad is None, name  # created, counted, never called
        else:
            assert p.grad is not None, name
    assert all(a.up.weight.grad.abs().sum() > 0 for a in ctx.backbone.adapters)
    for name in ("heads.tau", "heads.units", "heads.gca.q.weight", "heads.proj", "vocabulary"):
        assert named[name].grad.abs().sum() > 0
    # the attribute branch: the released prompt gives it no learning signal (a constant CE)
    attr_signal = method.heads.spaces[0].mlp[0].weight.grad.abs().max()
    obj_signal = method.heads.spaces[1].mlp[0].weight.grad.abs().max()
    if variant == "code":
        assert attr_signal < 1e-4 * obj_signal
        assert named["prefix"].grad[1].abs().max() < 1e-4 * named["prefix"].grad[2].abs().max()
    else:
        assert attr_signal > 1e-2 * obj_signal


def test_loss_is_the_weighted_four_branch_cross_entropy(tiny):
    method, ctx, split = build(CAMS, tiny(), split=TinySplit(6))
    method.train_mode(False)
    with torch.no_grad():
        loss = method.training_step(ctx, (split.images, split.labels))
        z_a, z_o, z_c, z_g = method.logits(method.image_features(split.images),
                                           method.model.text_features(method.train_pair_attr, method.train_pair_obj))
    y_pair, y_attr, y_obj = method.batch_targets(split.labels)
    ce = F.cross_entropy
    expected = 0.5 * ce(z_a, y_attr) + 0.5 * ce(z_o, y_obj) + ce(z_c, y_pair) + ce(z_g, y_pair)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_score_is_beta_global_plus_composition_plus_probability_product(tiny):
    method, ctx, split = _trained_a_little(tiny)
    split.name = "val"
    beta = method.config.beta
    with torch.no_grad():
        scores = dense(method.score(ctx, split))
        text = method.model.text_features(split.pair_attr, split.pair_obj)  # uncached
        z_a, z_o, z_c, z_g = method.logits(method.image_features(split.images), text)
    pa, po = z_a.softmax(-1), z_o.softmax(-1)
    slow = torch.empty_like(scores)
    for k, (i, j) in enumerate(zip(split.pair_attr.tolist(), split.pair_obj.tolist())):
        slow[:, k] = beta * z_g[:, k] + (1 - beta) * z_c[:, k] + pa[:, i] * po[:, j]
    torch.testing.assert_close(scores, slow, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dense(method.score(ctx, split)), scores)  # the cached bank agrees


def test_fixed_threshold_open_world_equals_manual_masking(tiny):
    from czsl_bench.evaluation import evaluate
    from czsl_bench.evaluation.feasibility import evaluate_open_world, mask_scores

    method, ctx, split = _trained_a_little(tiny)
    with torch.no_grad():
        scores = dense(method.score(ctx, split))
    from fixtures.tiny_three_path import TRAIN_PAIRS

    seen = torch.tensor([p in TRAIN_PAIRS for p in split.pairs])
    labels = torch.arange(len(split)) % len(split.pairs)  # seen and unseen pairs among the images
    feas = torch.linspace(0.1, 0.9, len(split.pairs)) * (~seen).float()
    fixed = evaluate_open_world(scores, labels, seen, feas, 0.5, split.pair_attr, split.pair_obj)
    manual = evaluate(mask_scores(scores, feas, seen, 0.5), labels, seen, None, split.pair_attr, split.pair_obj)
    assert fixed.best_unseen > 0 and fixed.threshold == 0.5
    for name in ("auc", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc"):
        assert getattr(fixed, name) == pytest.approx(getattr(manual, name)), name


def test_too_many_gca_blocks_is_one_line(tiny):
    with pytest.raises(ValueError, match=r"gca_blocks \(M\) is 8 but czsl-tiny-vit has 4 visual blocks"):
        build(CAMS, tiny(), overrides=["M=8"])


# ---- through the harness -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_world(tmp_path_factory.mktemp("toy")) as name:
        yield name


@pytest.mark.parametrize("variant", ["default", "code"])
def test_harness_trains_selects_and_evaluates_both_worlds(toy, tmp_path, variant):
    closed, open_ = czsl_bench.run("cams", toy, seed=0, setting="both", backbone="czsl-tiny-vit", pretrained="none",
                                   overrides=["epochs=2", "batch_size=16", f"variant={variant}"],
                                   results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    fit = closed.environment["training"]
    assert fit["select_metric"] == "auc" and len(fit["history"]) == 2
    best = max(range(2), key=lambda i: fit["history"][i]["val"]["auc"])
    assert closed.chosen_epoch == fit["history"][best]["epoch"]
    assert open_.open_threshold is not None and 0 <= open_.metrics["test"]["auc"] <= 1
    assert closed.config["variant"] == variant and closed.identity["track"] == "inductive"


# ---- the real architecture ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_l():
    return load_backbone("ViT-L-14-quickgelu", None, device="cpu")


# docs/cams.md "Parameter counts": (M, r, |A| + |O|) and the count used by the forward
COUNTS = {"ut-zappos": (9, 64, 28, 57_282_433), "mit-states": (8, 128, 360, 59_371_265),
          "cgqa": (12, 128, 1087, 62_035_969)}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["ut-zappos", "mit-states", "cgqa"])
def test_vit_l14_parameter_counts_equal_the_spec_arithmetic(vit_l, dataset):
    from czsl_bench.cli.info import _shipped_vocabulary

    data = _shipped_vocabulary(dataset)
    m, r, n_prims, used = COUNTS[dataset]
    assert len(data.attrs) + len(data.objs) == n_prims
    # pre_norm (the code variant's dead LayerNorm) does not depend on the vocabulary: UT-Zappos only
    for variant in ("default", "code") if dataset == "ut-zappos" else ("default",):
        strip_adapters(vit_l)
        method, _, _ = build(CAMS, vit_l, dataset, [f"variant={variant}"], data=data)
        count = parameter_counts(method, vit_l)["trainable"]
        assert (method.config.gca_blocks, method.config.adapter_dim) == (m, r)
        assert count == used + (2_048 if variant == "code" else 0)
        assert count == 54_884_097 + 2 * m * (2_049 * r + 1_024) + 768 * n_prims - (2_048 if variant == "default" else 0)
        if dataset == "ut-zappos" and variant == "default":
            heads = method.heads
            size = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
            assert vit_l.adapter_blocks == tuple(range(15, 24))
            assert size(vit_l.adapters) == 18 * 132_160
            assert size(heads.gca) == 14_692_352 and size(heads.spaces) == 3 * 12_596_224
            assert heads.units.numel() == 32 * 1024 and size(heads.ln_norm) == 2_048
            assert heads.proj.numel() == 3 * 1024 * 768 and heads.tau.numel() == 1
            assert method.model.vocabulary.numel() == 28 * 768 and method.model.prefix.numel() == 3 * 3 * 768
            assert not hasattr(method.model, "attr_dis")  # no disentangler MLPs in CAMS
    strip_adapters(vit_l)


@pytest.mark.slow
def test_info_json_reports_the_ut_zappos_count():
    from czsl_bench.cli import cli

    result = CliRunner().invoke(cli, ["info", "cams", "--dataset", "ut-zappos", "--backbone",
                                      "ViT-L-14-quickgelu", "--pretrained", "none", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["params"]["trainable"] == 57_282_433


@pytest.mark.slow
def test_vit_l14_forward_backward_and_a_step_on_cpu(vit_l):
    strip_adapters(vit_l)
    split = TinySplit(2, size=224)
    method, ctx, _ = build(CAMS, vit_l, "ut-zappos", ["variant=code"], split=split, data=vocabulary(split=split))
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    method.train_mode(True)
    loss = method.training_step(ctx, (split.images, split.labels))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in method.heads.pre_norm.parameters())
    before = method.heads.units.detach().clone()
    opt.step()
    assert not torch.equal(before, method.heads.units)
    strip_adapters(vit_l)
