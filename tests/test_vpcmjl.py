"""VP-CMJL (docs/vpcmjl.md): config and variants, each component against its equation, scores,
the released selection rule, the harness run, and the ViT-L/14 parameter counts and smoke step."""

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
from czsl_bench.methods.pair_scores import dense
from czsl_bench.methods.vpcmjl import (
    CODE_SELECT,
    VPCMJL,
    PrimitiveCrossAttention,
    VPCMJLConfig,
    kl_text_to_proxy,
)
from fixtures.tiny_three_path import ATTRS, OBJS, TinySplit, build, registered_toy_world, strip_adapters, vocabulary


@pytest.fixture(scope="module")
def tiny():
    return lambda: load_backbone("czsl-tiny-vit", None, device="cpu")


def _trained_a_little(tiny, overrides=(), steps=2):
    """A method whose adapters, proxies and heads have moved away from their initialisation."""
    torch.manual_seed(0)  # the random backbone weights too: the same model whatever ran before
    split = TinySplit(8)
    method, ctx, _ = build(VPCMJL, tiny(), overrides=overrides, split=split)
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
    mit, ut, cgqa = (VPCMJLConfig.defaults(r) for r in ("mit-states", "ut-zappos", "cgqa"))
    assert (mit.epochs, ut.epochs, cgqa.epochs) == (15, 20, 20)
    assert (mit.batch_size, ut.batch_size, cgqa.batch_size) == (32, 16, 32)
    assert (mit.lr, ut.lr, cgqa.lr) == (5e-4, 5e-4, 5e-5)
    assert ((mit.alpha, mit.beta), (ut.alpha, ut.beta), (cgqa.alpha, cgqa.beta)) == ((0.3, 0.7), (0.7, 0.3), (1.0, 1.0))
    assert (mit.val_loss_batch, ut.val_loss_batch, cgqa.val_loss_batch) == (64, 8, 16)
    for c in (mit, ut, cgqa):
        # StepLR(3, 0.5) is hard-coded in the released training script; the YAML's 5 is ignored
        assert (c.scheduler, c.step_size, c.gamma, c.weight_decay, c.vocab_dropout) == ("step", 3, 0.5, 1e-5, 0.3)
        assert (c.select_metric, c.prim_template, c.combine, c.w_kl, c.kl_detach) == ("auc", "a photo of x", "sum", 1.0, False)
        assert c.optimizer == "adam" and c.adapter_dim == 64 and c.disentangler_dropout == 0.5
    assert cgqa.code_prim_template == "a photo of x x" and ut.code_prim_template == "a photo of x"
    syn = VPCMJLConfig.defaults("synthetic")
    assert syn.epochs <= 10 and syn.amp is False and (syn.alpha, syn.beta) == (0.5, 0.5)


def test_code_variant_selects_on_the_loss_rule_and_uses_the_two_slot_template_on_cgqa():
    code = resolve_config(VPCMJLConfig, "cgqa", ["variant=code"])
    assert code.select_metric == CODE_SELECT and code.prim_template == "a photo of x x"
    assert resolve_config(VPCMJLConfig, "ut-zappos", ["variant=code"]).prim_template == "a photo of x"
    explicit = resolve_config(VPCMJLConfig, "cgqa", ["variant=code", "select_metric=best_hm"])
    assert explicit.select_metric == "best_hm" and explicit.prim_template == "a photo of x x"
    back = resolve_config(VPCMJLConfig, "cgqa", ["variant=code", "variant=default"])
    assert (back.select_metric, back.prim_template) == ("auc", "a photo of x")
    sources = resolve(VPCMJL, "cgqa", overrides=["variant=code"]).sources
    assert sources["select_metric"].startswith("derived") and sources["variant"] == "--set"
    for bad, match in (("variant=released", "variant"), ("alpha=-1", "alpha"), ("prim_template=a photo", "slot")):
        with pytest.raises(ConfigError, match=match):
            resolve_config(VPCMJLConfig, "ut-zappos", [bad])
    with pytest.raises(ConfigError, match="both 0"):
        resolve_config(VPCMJLConfig, "ut-zappos", ["alpha=0", "beta=0"])


def test_ablations_resolve_and_code_is_its_own_row():
    check_method_class(VPCMJL)
    grid = VPCMJL.ablations()
    assert {"full", "text-only", "proxy-only", "no-kl", "no-attention-score", "product-combine", "kl-detached",
            "code"} == set(grid)
    configs = {name: resolve(VPCMJL, "synthetic", ablation=name).config for name in grid}
    assert configs["text-only"].alpha == 0 and configs["text-only"].w_kl == 0
    assert configs["proxy-only"].beta == 0 and configs["proxy-only"].w_text == 0
    assert configs["code"].select_metric == CODE_SELECT
    assert len({json.dumps(vars(c), sort_keys=True, default=str) for c in configs.values()}) == len(grid)


def test_ablate_grid_resolves_every_point_to_its_own_training():
    from czsl_bench.ablation import ablation_grid

    points = ablation_grid("vpcmjl", "synthetic")
    assert [p.name for p in points] == list(VPCMJL.ablations())
    assert all(p.runs_as == p.name and p.method == "vpcmjl" for p in points)
    assert points[0].ablation is None and {p.ablation for p in points[1:]} == set(VPCMJL.ablations()) - {"full"}


# ---- components against the equations --------------------------------------------------------


def test_cross_attention_block_is_the_pre_ln_equation_and_its_weights_are_the_head_mean():
    torch.manual_seed(0)
    ca = PrimitiveCrossAttention(32, heads=4).eval()
    f, keys = torch.randn(5, 32), torch.randn(7, 32)
    x, w = ca(f, keys)
    # by hand: q = LN_q(f) Wq + bq, k / v from LN_kv(T); per-head softmax(q k^T / sqrt(d))
    wq, wk, wv = ca.attn.in_proj_weight.chunk(3)
    bq, bk, bv = ca.attn.in_proj_bias.chunk(3)
    q, kv = ca.ln_q(f), ca.ln_kv(keys)
    heads = lambda t: t.view(t.shape[0], 4, 8).transpose(0, 1)  # noqa: E731
    qh, kh, vh = heads(q @ wq.T + bq), heads(kv @ wk.T + bk), heads(kv @ wv.T + bv)
    attn = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(8), dim=-1)  # [H, B, N]
    o = (attn @ vh).transpose(0, 1).reshape(5, 32) @ ca.attn.out_proj.weight.T + ca.attn.out_proj.bias
    h = f + o
    fc1, fc2 = ca.mlp[0], ca.mlp[2]
    u = fc1(ca.ln_2(h))
    expected = h + fc2(u * torch.sigmoid(1.702 * u))
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, attn.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    # each image attends on its own: the first image's output does not depend on the others
    x1, _ = ca(f[:1], keys)
    torch.testing.assert_close(x1, x[:1], rtol=1e-5, atol=1e-5)


def test_head_count_falls_back_to_a_divisor_of_the_width():
    assert PrimitiveCrossAttention(768, 16).attn.num_heads == 16
    assert PrimitiveCrossAttention(24, 16).attn.num_heads == 12


def test_proxies_start_at_the_frozen_text_features_and_f_at_frozen_clip(tiny):
    method, ctx, _ = build(VPCMJL, tiny(), split=TinySplit(4))
    bb = ctx.backbone
    names = [n.replace(".", " ").lower() for n in ATTRS]
    torch.testing.assert_close(method.heads.attr_proxy.detach(), bb.encode_text(names, context_length=8).float())
    torch.testing.assert_close(method.heads.obj_proxy.detach(),
                               bb.encode_text([n.lower() for n in OBJS], context_length=8).float())
    pa, po = torch.tensor([0, 2]), torch.tensor([1, 0])
    v_c = method.heads.composition_proxies(pa, po)
    lin = method.heads.comp_proxy
    expected = torch.cat([method.heads.attr_proxy[pa], method.heads.obj_proxy[po]], 1) @ lin.weight.T + lin.bias
    torch.testing.assert_close(v_c, expected)
    method.train_mode(False)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():  # adapters start at zero: f is the frozen CLIP feature
        f = method.model.image_features(images).image
        torch.testing.assert_close(f, bb.encode_image(images, adapters=False).float())


def test_six_logits_have_the_documented_shapes_and_the_attention_score(tiny):
    method, ctx, split = build(VPCMJL, tiny(), split=TinySplit(4))
    method.train_mode(False)
    pa, po = method.train_pair_attr, method.train_pair_obj
    with torch.no_grad():
        feats = method.model.image_features(split.images)
        raw = method.model.text_features(pa, po, raw=True)
        lg = method.logits(feats, raw, pa, po)
    assert lg.comp_t.shape == lg.comp_v.shape == (4, len(pa))
    assert lg.attr_t.shape == lg.attr_v.shape == (4, len(ATTRS))
    assert lg.obj_t.shape == lg.obj_v.shape == (4, len(OBJS))
    torch.testing.assert_close(lg.attn_attr.sum(-1), torch.ones(4))
    s = method.model.logit_scale
    assert s == pytest.approx(float(ctx.backbone.logit_scale))
    fa, _ = method.heads.attr_ca(feats.image, raw[1])
    plain = s * F.normalize(fa, dim=-1) @ F.normalize(raw[1], dim=-1).T
    torch.testing.assert_close(lg.attr_t - plain, s * lg.attn_attr, rtol=1e-4, atol=1e-4)
    # raw text features are the normalised ones before normalisation
    torch.testing.assert_close(F.normalize(raw[0], dim=-1), method.model.text_features(pa, po)[0])


def test_kl_is_batchmean_kl_of_text_to_proxy_and_zero_when_equal():
    torch.manual_seed(0)
    zt, zv = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    q, p = zt.softmax(-1), zv.softmax(-1)
    expected = (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(kl_text_to_proxy(zt, zv), expected)
    assert float(kl_text_to_proxy(zv, zv.clone())) == pytest.approx(0.0, abs=1e-6)
    kl_text_to_proxy(zt, zv).backward()  # released: the text target is not detached
    assert zt.grad is not None and zt.grad.abs().sum() > 0
    zt.grad = None
    with pytest.raises(RuntimeError):
        kl_text_to_proxy(zt, zv, detach=True).backward()  # nothing left that requires a gradient


def test_training_loss_is_six_cross_entropies_plus_kl(tiny):
    method, ctx, split = build(VPCMJL, tiny(), split=TinySplit(6))
    method.train_mode(False)  # no dropout: the two forwards see the same network
    y_pair, y_attr, y_obj = method.batch_targets(split.labels)
    with torch.no_grad():
        loss = method.training_step(ctx, (split.images, split.labels))
        pa, po = method.train_pair_attr, method.train_pair_obj
        lg = method.logits(method.model.image_features(split.images), method.model.text_features(pa, po, raw=True), pa, po)
    ce = F.cross_entropy
    expected = (ce(lg.comp_t, y_pair) + ce(lg.comp_v, y_pair) + ce(lg.attr_t, y_attr) + ce(lg.attr_v, y_attr)
                + ce(lg.obj_t, y_obj) + ce(lg.obj_v, y_obj) + kl_text_to_proxy(lg.comp_t, lg.comp_v))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["default", "code"])
def test_gradients_reach_exactly_the_counted_groups(tiny, variant):
    split = TinySplit(8)
    method, ctx, _ = build(VPCMJL, tiny(), overrides=[f"variant={variant}"], split=split)
    method.train_mode(True)
    loss = method.training_step(ctx, (split.images, split.labels))
    assert torch.isfinite(loss)
    loss.backward()
    named = dict(method.model.named_parameters()) | {f"heads.{k}": v for k, v in method.heads.named_parameters()}
    dead = {k for k in named if k.startswith("heads.com_ca.")}
    assert bool(dead) == (variant == "code")
    for name, p in named.items():
        if name in dead:
            assert p.grad is None, name  # created, counted, never called
        else:
            assert p.grad is not None, name
    # the up-projections start at zero, so only they move first; the adapters are the backbone's
    assert all(a.up.weight.grad.abs().sum() > 0 for a in ctx.backbone.adapters)
    for name in ("vocabulary", "prefix"):
        assert named[name].grad.abs().sum() > 0
    for name in ("heads.attr_proxy", "heads.obj_proxy", "heads.comp_proxy.weight", "attr_dis.linear.weight"):
        assert named[name].grad.abs().sum() > 0


def test_score_is_the_sum_of_combined_logits_and_primitive_probabilities(tiny):
    method, ctx, split = _trained_a_little(tiny)
    split.name = "val"
    with torch.no_grad():
        scores = dense(method.score(ctx, split))
        # the slow path: every text feature and proxy recomputed, logits per pair
        feats = method.model.image_features(split.images)
        raw = method.model.text_features(split.pair_attr, split.pair_obj, raw=True)
        zc, za, zo = method.combined(method.logits(feats, raw, split.pair_attr, split.pair_obj))
    c = method.config
    pa, po = za.softmax(-1), zo.softmax(-1)
    slow = torch.empty_like(scores)
    for k, (i, j) in enumerate(zip(split.pair_attr.tolist(), split.pair_obj.tolist())):
        slow[:, k] = zc[:, k] + pa[:, i] + po[:, j]
    torch.testing.assert_close(scores, slow, rtol=1e-5, atol=1e-4)
    # z^b = alpha z^b_v + beta z^b_t
    lg = method.logits(feats, raw, split.pair_attr, split.pair_obj)
    torch.testing.assert_close(zc, c.alpha * lg.comp_v + c.beta * lg.comp_t)
    # blocks tile the same matrix; a second call reuses the cached bank and agrees
    from czsl_bench.methods.pair_scores import ImageSide, pair_scores

    bank = method.eval_bank(split.pair_attr, split.pair_obj)
    side = ImageSide(method.model.logit_scale * F.normalize(feats.image, dim=-1), pa, po)
    torch.testing.assert_close(dense(pair_scores(side, bank["comp"], split.pair_attr, split.pair_obj, "sum", block=3)),
                               scores, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dense(method.score(ctx, split)), scores)


def test_product_combine_and_the_attention_score_switch_change_the_score(tiny):
    method, ctx, split = _trained_a_little(tiny)
    base = dense(method.score(ctx, split))
    for override in ({"combine": "product"}, {"attention_score": False}):
        for k, v in override.items():
            setattr(method.config, k, v)
        method.train_mode(False)
        other = dense(method.score(ctx, split))
        assert other.shape == base.shape and not torch.allclose(other, base)
        method.config = resolve_config(VPCMJLConfig, "synthetic", [])
        method.train_mode(False)


def test_released_selection_value_is_the_last_batch_loss_over_the_batch_count(tiny):
    method, ctx, split = _trained_a_little(tiny, overrides=["val_loss_batch=3"])
    split.name = "val"
    got = method.validation_metrics(ctx, split)[CODE_SELECT]
    last = slice(6, 8)  # 8 images in batches of 3: the last batch holds images 6 and 7, 3 batches
    with torch.no_grad():
        feats = method.model.image_features(split.images[last])
        raw = method.model.text_features(split.pair_attr, split.pair_obj, raw=True)
        lg = method.logits(feats, raw, split.pair_attr, split.pair_obj)
        labels = split.labels[last]
        loss = method.loss(lg, labels, split.pair_attr[labels], split.pair_obj[labels])
    assert got == pytest.approx(-float(loss) / 3, rel=1e-5)


# ---- through the harness -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_world(tmp_path_factory.mktemp("toy")) as name:
        yield name


@pytest.mark.parametrize("variant", ["default", "code"])
def test_harness_trains_selects_and_evaluates_both_worlds(toy, tmp_path, variant):
    records = czsl_bench.run("vpcmjl", toy, seed=0, setting="both", backbone="czsl-tiny-vit", pretrained="none",
                             overrides=["epochs=2", "batch_size=16", f"variant={variant}"],
                             results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    closed, open_ = records
    fit = closed.environment["training"]
    assert fit["select_metric"] == ("auc" if variant == "default" else CODE_SELECT)
    history = fit["history"]
    assert len(history) == 2 and all(CODE_SELECT in h["val"] and h["val"][CODE_SELECT] < 0 for h in history)
    best = max(range(2), key=lambda i: history[i]["val"][fit["select_metric"]])
    assert closed.chosen_epoch == history[best]["epoch"]
    assert CODE_SELECT not in closed.metrics["val"]  # the record keeps the evaluator's metrics only
    assert open_.open_threshold is not None and 0 <= open_.metrics["test"]["auc"] <= 1
    assert closed.identity["track"] == "inductive"
    assert closed.params["trainable"] > 0


def test_a_second_run_with_the_same_seed_gives_identical_numbers(toy, tmp_path):
    kwargs = dict(seed=3, backbone="czsl-tiny-vit", pretrained="none", overrides=["epochs=1", "batch_size=16"],
                  write=False, cache_dir=tmp_path / "cache")
    a = czsl_bench.run("vpcmjl", toy, **kwargs)
    b = czsl_bench.run("vpcmjl", toy, **kwargs)
    assert a.metrics == b.metrics and a.fingerprint == b.fingerprint
    assert a.environment["training"]["history"][0]["train_loss"] == b.environment["training"]["history"][0]["train_loss"]


# ---- the real architecture ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_l():
    return load_backbone("ViT-L-14-quickgelu", None, device="cpu")


def _shipped(dataset):
    from czsl_bench.cli.info import _shipped_vocabulary

    return _shipped_vocabulary(dataset)


# docs/vpcmjl.md "Parameter counts": used by the forward / trainable by flag (with com_ca)
COUNTS = {"ut-zappos": (22_937_088, 30_026_496), "mit-states": (23_447_040, 30_536_448),
          "cgqa": (24_563_712, 31_653_120)}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["ut-zappos", "mit-states", "cgqa"])
def test_vit_l14_parameter_counts_equal_the_spec_arithmetic(vit_l, dataset, monkeypatch):
    # counts do not depend on the proxies' initial values (tested on the tiny backbone); skipping
    # the ViT-L text tower over C-GQA's 1,087 names saves about a minute of CPU
    monkeypatch.setattr(vit_l, "encode_text", lambda texts, context_length=None: torch.zeros(len(texts), 768))
    data = _shipped(dataset)
    n_prims = len(data.attrs) + len(data.objs)
    assert n_prims == {"ut-zappos": 28, "mit-states": 360, "cgqa": 1087}[dataset]
    counts = []
    # com_ca does not depend on the vocabulary: the code variant is built on UT-Zappos only
    for variant in ("default", "code") if dataset == "ut-zappos" else ("default",):
        strip_adapters(vit_l)
        method, _, _ = build(VPCMJL, vit_l, dataset, [f"variant={variant}"], data=data)
        counts.append(parameter_counts(method, vit_l)["trainable"])
        if dataset == "ut-zappos" and variant == "default":
            heads = method.heads
            size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
            assert sum(p.numel() for p in vit_l.adapters.parameters()) == 48 * 132_160
            assert size(method.model.attr_dis) == size(method.model.obj_dis) == 592_128
            assert size(heads.attr_ca) == size(heads.obj_ca) == 7_089_408
            assert size(heads.comp_proxy) == 1_180_416
            assert heads.attr_proxy.numel() + heads.obj_proxy.numel() == 28 * 768
            assert method.model.vocabulary.numel() == 28 * 768 and method.model.prefix.numel() == 3 * 3 * 768
    strip_adapters(vit_l)
    assert counts[0] == COUNTS[dataset][0] == 22_894_080 + 1_536 * n_prims
    if dataset == "ut-zappos":
        assert counts[1] == COUNTS[dataset][1] == 29_983_488 + 1_536 * n_prims


@pytest.mark.slow
def test_info_json_reports_the_ut_zappos_count():
    from czsl_bench.cli import cli

    result = CliRunner().invoke(cli, ["info", "vpcmjl", "--dataset", "ut-zappos", "--backbone",
                                                     "ViT-L-14-quickgelu", "--pretrained", "none", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["params"]["trainable"] == 22_937_088


@pytest.mark.slow
def test_vit_l14_forward_backward_and_a_step_on_cpu(vit_l):
    # random-weight ViT-L/14 at 224 px, the UT-Zappos recipe, a small vocabulary to keep it CPU-sized
    strip_adapters(vit_l)
    split = TinySplit(2, size=224)
    method, ctx, _ = build(VPCMJL, vit_l, "ut-zappos", ["variant=code"], split=split, data=vocabulary(split=split))
    params = method.parameters()
    opt = torch.optim.Adam(params, lr=1e-3)
    method.train_mode(True)
    loss = method.training_step(ctx, (split.images, split.labels))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in method.heads.com_ca.parameters())
    before = vit_l.adapters[0].up.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, vit_l.adapters[0].up.weight)
    strip_adapters(vit_l)
