"""LaZSL (methods/lazsl.py) against spec-lazsl §1.6, §3, §4 and §5: the batched Sinkhorn, the
hybrid-cost identity, the singleton closed form, seeded crops, contributions that sum to the
score, and runs through the harness on the 3 x 3 toy world (tiny open_clip, random weights)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import czsl_bench
from czsl_bench.backbone import load_backbone
from czsl_bench.cli import cli
from czsl_bench.method import RunContext, check_method_class
from czsl_bench.methods.clip import CLIPZeroShot
from czsl_bench.methods.lazsl import (LaZSL, LaZSLConfig, crop_views, descriptor_heatmap, grid_boxes, image_rng,
                                      random_boxes, random_descriptors, sinkhorn_plan)
from czsl_bench.registry import METHODS
from fixtures.toy_world import registered_toy_dataset

TINY = dict(backbone="czsl-tiny-vit", pretrained="none")


# world, backbone: tests/conftest.py


def make(world, backbone, seed=0, **overrides):
    cfg = dataclasses.replace(LaZSLConfig.defaults("toy"), n_crops=6, **overrides)
    method = LaZSL(cfg)
    ctx = RunContext(dataset_name="toy", dataset=world, backbone=backbone, config=cfg, seed=seed)
    method.prepare(ctx)
    return method, ctx


def padded_problems(q=24, m=12, k=5, spread=0.1, seed=0):
    """Random LaZSL-like problems (cosines around 0.2) with per-problem crop and descriptor counts,
    the rest padded with zero mass."""
    g = torch.Generator().manual_seed(seed)
    sim = 0.2 + spread * torch.randn(q, m, k, generator=g)
    a, b = torch.zeros(q, m), torch.zeros(q, k)
    for i in range(q):
        mm = int(torch.randint(1, m + 1, (1,), generator=g))
        kk = int(torch.randint(1, k + 1, (1,), generator=g))
        a[i, :mm] = 1.0 / mm
        w = torch.rand(kk, generator=g) + 0.1
        b[i, :kk] = w / w.sum()
    return sim, a, b


# ---------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------
def test_contract_defaults_and_ablations():
    check_method_class(LaZSL)
    assert METHODS.get("lazsl") is LaZSL
    assert not LaZSL().trains
    real = LaZSLConfig.defaults("mit-states")
    assert (real.n_crops, real.crop_min, real.crop_max, real.theta, real.eps) == (90, 0.6, 0.9, 0.8, 0.1)
    assert real.descriptors == "template" and (real.w_pair, real.w_attr, real.w_obj) == (1 / 3, 1 / 3, 1 / 3)
    small = LaZSLConfig.defaults("synthetic")
    assert small.descriptors == "template" and small.n_crops == 32 and small.text_bank == "dataset"
    grid = LaZSL.ablations()
    assert grid["no-ot"] == {"ot": False} and grid["no-vs"] == {"vision_selection": False}
    assert grid["theta-1"] == {"theta": 1.0} and grid["bank"] == {"descriptors": "bank"}
    assert grid["random-text"] == {"descriptors": "random"}
    for bad in (dict(theta=1.5), dict(crop_min=0.9, crop_max=0.5), dict(eps=0.0), dict(w_pair=-1.0),
                dict(pair_template="a photo"), dict(grid=((0.5, 0),))):
        with pytest.raises(ValueError):
            LaZSLConfig(**bad)


# ---------------------------------------------------------------------------------------------
# batched Sinkhorn (spec §5)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["kernel", "log"])
@pytest.mark.parametrize("spread", [0.1, 0.3])
def test_padded_batched_plans_meet_both_marginals(solver, spread):
    sim, a, b = padded_problems(spread=spread)
    plan = sinkhorn_plan(sim, a, b, theta=0.8, eps=0.1, iters=50, solver=solver)
    assert plan.dtype == torch.float32
    assert (plan.sum(2) - a).abs().max() < 1e-5
    assert (plan.sum(1) - b).abs().max() < 1e-5
    assert plan[a == 0].abs().max() == 0 and plan.transpose(1, 2)[b == 0].abs().max() == 0


def test_default_iterations_converge_at_lazsl_scale():
    sim, a, b = padded_problems(spread=0.1, seed=3)
    plan = sinkhorn_plan(sim, a, b, theta=0.8, eps=0.1, iters=LaZSLConfig().iters)
    assert (plan.sum(2) - a).abs().max() < 1e-5 and (plan.sum(1) - b).abs().max() < 1e-6


def test_kernel_and_log_domains_agree_and_auto_falls_back_for_tiny_eps():
    sim, a, b = padded_problems(seed=1)
    kernel = sinkhorn_plan(sim, a, b, 0.8, 0.1, 50, "kernel")
    log = sinkhorn_plan(sim, a, b, 0.8, 0.1, 50, "log")
    assert torch.allclose(kernel, log, atol=1e-6)
    # eps = 0.002: exp(-2 * 0.8 / 0.002) underflows float32; auto must take the log domain
    sim = torch.tensor([[[0.9, -0.9], [-0.9, 0.9]]])
    a = b = torch.full((1, 2), 0.5)
    auto = sinkhorn_plan(sim, a, b, 0.8, 0.002, 50)
    assert torch.isfinite(auto).all()
    assert torch.allclose(auto, torch.tensor([[[0.5, 0.0], [0.0, 0.5]]]), atol=1e-6)


def test_hybrid_cost_equals_temperature_change_plus_dclip_term():
    """Spec §1.6: the plan of LaZSL's cost 1 - theta*s - (1-theta)*g equals that of -theta*s, and
    psi = <T, H> = theta*<T, S> + (1-theta) * sum_j b_j g_j."""
    theta, eps = 0.8, 0.1
    sim, a, b = padded_problems(q=16, seed=2)
    g = 0.25 + 0.05 * torch.randn(16, 1, sim.shape[2], generator=torch.Generator().manual_seed(9))
    hybrid = theta * sim + (1 - theta) * g
    plan_h = sinkhorn_plan(hybrid, a, b, theta=1.0, eps=eps, iters=300)  # cost 1 - h; the 1 is absorbed
    plan_s = sinkhorn_plan(sim, a, b, theta=theta, eps=eps, iters=300)
    assert (plan_h - plan_s).abs().max() < 1e-6
    psi_lazsl = (plan_h * hybrid).sum((1, 2))
    psi_here = theta * (plan_s * sim).sum((1, 2)) + (1 - theta) * (b * g[:, 0]).sum(1)
    assert (psi_lazsl - psi_here).abs().max() < 1e-6


def test_a_single_descriptor_has_the_closed_form(world, backbone):
    # the OT with one column is the row marginal itself
    sim, a, _ = padded_problems(k=1)
    plan = sinkhorn_plan(sim, a, torch.ones(len(a), 1), 0.8, 0.1, 5)
    assert torch.allclose(plan[..., 0], a, atol=1e-7)
    # and the method's score of a one-descriptor pair is q . (theta * mean_kept(p_i) + (1 - theta) * p_g)
    method, ctx = make(world, backbone, w_attr=0.0, w_obj=0.0)
    split = ctx.split("test")
    scores = method.score(ctx, split)
    views = method.views(ctx, split)
    text = method.text(ctx, split)
    rows = method.selection(views.crops, views.glob)
    mean_kept = torch.einsum("bn,bnd->bd", rows, views.crops)
    q = text.emb[text.joint.groups[0][1][:, 0]]  # every pair has one column
    order = text.joint.groups[0][0]
    expected = torch.empty_like(scores)
    expected[:, order] = (0.8 * mean_kept + 0.2 * views.glob) @ q.T
    assert torch.allclose(scores, expected, atol=1e-6)


def test_ot_off_with_the_pair_prompt_only_is_clip_zero_shot(world, backbone):
    method, ctx = make(world, backbone, ot=False, w_attr=0.0, w_obj=0.0)
    split = ctx.split("test")
    clip = CLIPZeroShot(CLIPZeroShot.Config())
    clip.prepare(ctx)
    expected = clip.score(ctx, split) / clip.scale
    assert torch.allclose(method.score(ctx, split), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# regions
# ---------------------------------------------------------------------------------------------
def test_seeded_crops_are_deterministic_inside_the_image_and_in_range():
    one = random_boxes(120, 80, 50, 0.6, 0.9, image_rng(0, "a/b.png"))
    assert torch.equal(one, random_boxes(120, 80, 50, 0.6, 0.9, image_rng(0, "a/b.png")))
    assert not torch.equal(one, random_boxes(120, 80, 50, 0.6, 0.9, image_rng(1, "a/b.png")))
    assert not torch.equal(one, random_boxes(120, 80, 50, 0.6, 0.9, image_rng(0, "a/c.png")))
    side = one[:, 2] - one[:, 0]
    assert torch.allclose(side, one[:, 3] - one[:, 1])  # squares
    assert side.min() >= 0.6 * 80 - 1e-4 and side.max() <= 0.9 * 80 + 1e-4
    assert one[:, :2].min() >= 0 and (one[:, 2] <= 120 + 1e-4).all() and (one[:, 3] <= 80 + 1e-4).all()
    grid = grid_boxes(100, 100, ((0.5, 5), (0.7, 3), (0.9, 2)))
    assert len(grid) == 38 and grid.min() >= 0 and grid.max() <= 100 + 1e-4


def test_crops_come_from_one_tensor_by_bilinear_roi_align():
    img = torch.rand(3, 40, 60)
    full = crop_views(img, torch.tensor([[0.0, 0.0, 60.0, 40.0]]), 40, [0, 0, 0], [1, 1, 1])
    assert full.shape == (1, 3, 40, 40)
    part = crop_views(img, torch.tensor([[10.0, 5.0, 30.0, 25.0]]), 40, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    ref = F.interpolate(img[None, :, 5:25, 10:30], size=40, mode="bilinear", align_corners=False)
    assert torch.allclose(part[0, :, 2:-2, 2:-2], ((ref[0] - 0.5) / 0.25)[:, 2:-2, 2:-2], atol=1e-5)


def test_crop_features_are_seeded_cached_and_vision_selection_keeps_a_uniform_subset(world, backbone, tmp_path):
    from czsl_bench.cache import FeatureCache

    method, ctx = make(world, backbone)
    ctx.cache = FeatureCache(tmp_path / "cache")
    split = ctx.split("test")
    first = method.views(ctx, split)
    again, _ = make(world, backbone)
    ctx2 = dataclasses.replace(ctx, _features={})
    second = again.views(ctx2, split)
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.crops, second.crops)
    assert len([e for e in ctx.cache.entries() if e.kind == "lazsl_crop_features"]) == 1
    other, ctx3 = make(world, backbone, seed=1)
    ctx3.cache = ctx.cache
    assert not torch.equal(other.views(ctx3, split).boxes, first.boxes)  # the crop seed is the run seed
    # the boxes the cache holds are the ones the sampler draws for each image
    w, h = first.sizes[0].tolist()
    assert torch.equal(first.boxes[0], random_boxes(int(w), int(h), 6, 0.6, 0.9, image_rng(0, split.images[0])))
    rows = method.selection(first.crops, first.glob)
    assert torch.allclose(rows.sum(1), torch.ones(len(rows)))
    for r in rows:
        kept = r[r > 0]
        assert len(kept) >= 1 and torch.allclose(kept, kept[0].expand_as(kept))
    high = dataclasses.replace(method.config, select_offset=5.0)
    method.config = high
    assert ((method.selection(first.crops, first.glob) > 0).sum(1) == 1).all()  # nothing above: keep the best


def test_random_descriptors_keep_length_and_names_but_not_content():
    texts = [["A wet apple is covered in small bright water droplets.", "A wet apple shines."]]
    out = random_descriptors(texts, [("wet", "apple")], {"wet", "apple", "red"}, seed=0)
    assert out == random_descriptors(texts, [("wet", "apple")], {"wet", "apple", "red"}, seed=0)
    for real, fake in zip(texts[0], out[0]):
        rw, fw = real.split(), fake.split()
        assert len(rw) == len(fw) and fake != real
        assert [w for w in fw if w.strip(".").lower() in {"wet", "apple"}] == [w for w in rw if w.strip(".").lower() in {"wet", "apple"}]


# ---------------------------------------------------------------------------------------------
# scoring, explanations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["joint", "factorized"])
def test_open_world_blocks_equal_the_dense_scores(world, backbone, mode):
    method, ctx = make(world, backbone, mode=mode)
    split = ctx.split("val", "open")
    dense = method.score(ctx, split)
    assert dense.shape == (len(split), 9)
    method.config = dataclasses.replace(method.config, score_block=4, ot_memory_mb=1)
    blocks = list(method.score(ctx, split))
    assert [s for s, _ in blocks] == [0, 4, 8]
    assert torch.allclose(torch.cat([b for _, b in blocks], 1), dense, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"mode": "factorized"}, {"ot": False}])
def test_explanations_contributions_sum_to_the_score_and_heatmaps_are_coverage_corrected(world, backbone, overrides):
    method, ctx = make(world, backbone, **overrides)
    split = ctx.split("test")
    scores = method.score(ctx, split)
    out = method.explain(ctx, split, 2, top=3)
    json.dumps(out, allow_nan=False)  # JSON-ready, strictly
    assert out["true_pair"] == " ".join(split.pairs[int(split.labels[2])])
    assert len(out["top"]) == 3 and out["top"][0]["score"] >= out["top"][1]["score"]
    for entry in out["top"]:
        pair = split.pairs.index(tuple(entry["pair"].split()))
        assert math.isclose(entry["score"], float(scores[2, pair]), abs_tol=1e-5)  # same as the run's score
        total = sum(d["contribution"] for d in entry["contributions"])
        assert math.isclose(total, entry["score"], abs_tol=1e-5)
        assert math.isclose(sum(d["mass"] for d in entry["contributions"]), 1.0, abs_tol=1e-5)
        if overrides.get("ot", True):
            maps = torch.tensor([[[math.nan if v is None else v for v in r] for r in d["heatmap"]]
                                 for d in entry["contributions"]])
            mass = torch.tensor([d["mass"] for d in entry["contributions"]])
            covered = ~torch.isnan(maps[0])
            if overrides.get("mode") != "factorized":
                # one plan: its columns split every kept crop's mass, so the mass-weighted maps sum to 1
                assert torch.allclose((mass[:, None, None] * maps).sum(0)[covered], torch.ones(int(covered.sum())),
                                      atol=1e-4)
            assert all(len(d["top_crops"]) >= 1 for d in entry["contributions"])


def test_a_uniform_plan_gives_a_flat_heatmap_whatever_the_crop_layout():
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 40.0, 40.0], [5.0, 0.0, 35.0, 30.0]])
    rows = torch.full((3,), 1 / 3)
    flat = descriptor_heatmap(boxes, rows * 0.25, rows, 40, 40, cells=8)
    covered = ~torch.isnan(flat)
    assert torch.allclose(flat[covered], torch.ones(int(covered.sum())))
    peaked = descriptor_heatmap(boxes, torch.tensor([0.2, 0.0, 0.05]), rows, 40, 40, cells=8)
    assert peaked[0, 0] > 1 > peaked[-1, -1]  # mass on the first box: hot at its exclusive corner


# ---------------------------------------------------------------------------------------------
# through the harness
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_dataset(tmp_path_factory.mktemp("toy-run")) as root:
        yield root


def test_run_records_the_bank_and_its_fallbacks_in_both_settings(toy, tmp_path):
    bank = tmp_path / "bank.jsonl"
    bank.write_text('{"attr": "red", "obj": "circle", "texts": ["a red round disk", "a red circle"]}\n')
    records = czsl_bench.run("lazsl", "toy", seed=0, setting="both", results_dir=tmp_path / "results",
                             cache_dir=tmp_path / "cache",
                             overrides=["n_crops=4", "descriptors=bank", f"text_bank={bank}"], **TINY)
    closed, opened = records
    for rec in records:
        info = rec.environment["method"]
        assert info["text_bank"]["path"] == str(bank) and len(info["text_bank"]["sha256"]) == 64
        assert rec.params["trainable"] == 0 and rec.chosen_epoch is None
        assert 0 <= rec.metrics["test"]["auc"] <= 1
    # the toy's closed world is all 9 pairs; only red circle is described
    assert closed.environment["method"]["fallback_pairs"] == {"closed": {"pairs": 9, "fallback": 8}}
    assert opened.environment["method"]["fallback_pairs"]["open"] == {"pairs": 9, "fallback": 8}


def test_the_bank_content_is_part_of_the_run_identity(toy, tmp_path):
    """Same path, edited file: another run (--skip-existing must not keep the old record)."""
    from czsl_bench.methods.lazsl import LaZSLConfig

    ds = czsl_bench.api.load_dataset("toy")
    bank = tmp_path / "bank.jsonl"
    bank.write_text('{"attr": "red", "obj": "circle", "texts": ["a red round disk"]}\n')
    cfg = dataclasses.replace(LaZSLConfig.defaults("toy"), descriptors="bank", text_bank=str(bank))
    first = LaZSL.identity_inputs(cfg, ds)
    bank.write_text('{"attr": "red", "obj": "circle", "texts": ["a crimson ring"]}\n')
    second = LaZSL.identity_inputs(cfg, ds)
    assert first != second and len(second["text_bank"]) == 64
    # random descriptors are drawn from the bank too; template-only text reads no file
    assert LaZSL.identity_inputs(dataclasses.replace(cfg, descriptors="random"), ds) == second
    assert LaZSL.identity_inputs(dataclasses.replace(cfg, descriptors="template"), ds) == {}


def test_a_dataset_without_descriptions_asks_for_a_bank(toy, tmp_path):
    with pytest.raises(czsl_bench.api.RunError, match="ships no descriptions.json; pass --set text_bank"):
        czsl_bench.run("lazsl", "toy", results_dir=tmp_path, cache_dir=tmp_path / "c", write=False,
                       overrides=["descriptors=bank"], **TINY)


def test_ablate_runs_the_declared_lazsl_grid(toy, tmp_path):
    args = ["ablate", "lazsl", "--dataset", "toy", "--seed", "0", "--only", "full,no-ot,theta-1",
            "--backbone", "czsl-tiny-vit", "--pretrained", "none", "--results-dir", str(tmp_path / "r"),
            "--cache-dir", str(tmp_path / "c"), "--set", "n_crops=4", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    # <results>/<method>/<dataset>/<arch>-<weights>/<setting>/<variant>-<cfg8>/seed<k>.json
    # "full" with --set n_crops=4 is no named variant any more, so its folder is custom-<cfg8>
    for name in ("custom", "no-ot", "theta-1"):
        found = list((tmp_path / "r" / "lazsl" / "toy").glob(f"czsl-tiny-vit-*/closed/{name}-*/seed0.json"))
        assert len(found) == 1, sorted(p.relative_to(tmp_path) for p in (tmp_path / "r").rglob("*.json"))
    assert "no-ot" in result.output


@pytest.mark.slow
def test_vit_b16_random_weights_runs_lazsl_on_cpu(world):
    """The real architecture (ViT-B-16, 224 px, random weights): crops, VS, OT and an explanation."""
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-16", None, device="cpu")
    cfg = dataclasses.replace(LaZSLConfig.defaults("toy"), n_crops=3)
    method = LaZSL(cfg)
    split = world.split("test")
    small = dataclasses.replace(split, images=split.images[:2], labels=split.labels[:2],
                                attr_labels=split.attr_labels[:2], obj_labels=split.obj_labels[:2])
    ctx = RunContext(dataset_name="toy", dataset=world, backbone=bb, config=cfg, seed=0, eval_batch_size=2)
    method.prepare(ctx)
    scores = method.score(ctx, small)
    assert scores.shape == (2, len(split.pairs)) and torch.isfinite(scores).all()
    assert method.views(ctx, small).crops.shape == (2, 3, bb.embed_dim)
    out = method.explain(ctx, small, 0, top=2)
    assert math.isclose(sum(d["contribution"] for d in out["top"][0]["contributions"]), out["top"][0]["score"],
                        abs_tol=1e-5)
