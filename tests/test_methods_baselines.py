"""CLIP zero-shot, CoOp and CSP against their spec (spec-baselines §1-3), on the real tiny
open_clip architecture with random weights and a 3 x 3 world on disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from czsl_bench.method import RunContext, check_method_class, parameter_counts
from czsl_bench.methods.clip import CLIPConfig, CLIPZeroShot
from czsl_bench.methods.coop import CoOp, CoOpConfig
from czsl_bench.methods.csp import CSP, CSPConfig
from czsl_bench.names import clean_name
from czsl_bench.seeding import seed_everything
from czsl_bench.training import Trainer
from fixtures.toy_world import ToyPlugin


# world, backbone: tests/conftest.py


def make(method_cls, world, backbone, **overrides):
    # a dataset's method defaults are those of the recipe family its plugin declares
    cfg = dataclasses.replace(method_cls.Config.defaults(ToyPlugin.recipe), **overrides)
    method = method_cls(cfg)
    ctx = RunContext(dataset_name="toy", dataset=world, backbone=backbone, config=cfg, seed=0,
                     name_policy=ToyPlugin.name_policy)
    with torch.no_grad():
        method.prepare(ctx)
    return method, ctx


def test_the_three_methods_satisfy_the_contract():
    for cls in (CLIPZeroShot, CoOp, CSP):
        check_method_class(cls)
    assert (CLIPZeroShot.name, CoOp.name, CSP.name) == ("clip", "coop", "csp")
    assert not CLIPZeroShot().trains and CoOp().trains and CSP().trains


def test_csp_defaults_follow_the_readme_commands_and_paper_table():
    mit, ut, cgqa = (CSPConfig.defaults(d) for d in ("mit-states", "ut-zappos", "cgqa"))
    for c in (mit, ut, cgqa):
        assert (c.epochs, c.batch_size, c.grad_accum, c.weight_decay, c.context_length) == (20, 64, 2, 1e-5, 8)
        assert c.optimizer == "adam" and c.scheduler == "none"
    assert (mit.lr, mit.attr_dropout) == (5e-5, 0.3)
    assert (ut.lr, ut.attr_dropout) == (5e-4, 0.2)
    assert (cgqa.lr, cgqa.attr_dropout) == (5e-5, 0.3)
    coop = CoOpConfig.defaults("mit-states")
    assert (coop.lr, coop.epochs, coop.batch_size, coop.grad_accum, coop.attr_dropout) == (5e-5, 20, 64, 2, 0.0)
    small = CSPConfig.defaults("synthetic")
    assert small.epochs <= 12 and small.grad_accum == 1 and small.batch_size == 512  # CPU-sized


def test_clip_scores_are_100_cos_of_the_cleaned_prompt(world, backbone):
    method, ctx = make(CLIPZeroShot, world, backbone)
    split = world.split("test")
    scores = method.score(ctx, split)
    assert scores.shape == (len(split), len(split.pairs)) and scores.dtype == torch.float32
    images = torch.stack([split.dataset(backbone.preprocess_eval)[i][0] for i in range(len(split))])
    with torch.no_grad():
        img = F.normalize(backbone.encode_image(images), dim=-1)
        txt = F.normalize(backbone.encode_text([f"a photo of {a} {o}" for a, o in split.pairs]), dim=-1)
    scale = float(backbone.logit_scale)
    torch.testing.assert_close(scores, scale * img @ txt.t(), atol=1e-4, rtol=1e-4)
    assert clean_name("Boots.Ankle") == "boots ankle" and clean_name("traffic_light") == "traffic_light"
    assert ctx.clean_name("Boots.Ankle") == "boots ankle"  # the run's (the dataset's) policy


@pytest.mark.parametrize("cls", [CoOp, CSP])
def test_soft_prompts_start_as_clip_zero_shot(cls, world, backbone):
    # Every name here is one BPE token, so the initial vocabulary / context vectors are exactly
    # CLIP's word embeddings and "a photo of [attr] [obj]" encodes like the plain prompt.
    clip, clip_ctx = make(CLIPZeroShot, world, backbone)
    method, ctx = make(cls, world, backbone)
    method.train_mode(False)
    split = world.split("val")
    torch.testing.assert_close(method.score(ctx, split), clip.score(clip_ctx, split), atol=1e-4, rtol=1e-4)


def test_learnable_parts_and_parameter_counts(world, backbone):
    width = backbone.text_width
    csp, _ = make(CSP, world, backbone)
    coop, _ = make(CoOp, world, backbone)
    assert [tuple(p.shape) for p in csp.parameters()] == [(len(world.attrs) + len(world.objs), width)]
    assert [tuple(p.shape) for p in coop.parameters()] == [(3, width)]
    counts = parameter_counts(csp, backbone)
    assert counts["trainable"] == 6 * width
    assert counts["total"] == 6 * width + sum(p.numel() for p in backbone.parameters())
    assert all(not p.requires_grad for p in backbone.parameters())


def test_csp_dropout_is_elementwise_over_the_whole_vocabulary(world, backbone):
    csp, _ = make(CSP, world, backbone, attr_dropout=0.5)
    csp.train_mode(True)
    torch.manual_seed(1)
    tokens = csp.prompt.token_embeddings(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    eot = csp.prompt.eot
    attr_rows, obj_rows = tokens[:, eot - 2], tokens[:, eot - 1]
    for rows in (attr_rows, obj_rows):  # objects are dropped too, element by element
        zero_fraction = float((rows == 0).float().mean())
        assert 0.3 < zero_fraction < 0.7
        assert ((rows == 0).sum(dim=1) < rows.shape[1]).all()  # not whole tokens
    csp.train_mode(False)
    again = csp.prompt.token_embeddings(torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(again[0, eot - 2], csp.prompt.vocab[0])


def test_csp_training_moves_only_the_vocabulary_and_lowers_the_loss(world, backbone):
    seed_everything(0)
    method, ctx = make(CSP, world, backbone, epochs=6, batch_size=12, lr=5e-2, attr_dropout=0.0,
                       select_metric="last")
    before_backbone = {k: v.clone() for k, v in backbone.state_dict().items()}
    before_vocab = method.prompt.vocab.detach().clone()
    result = Trainer(seed=0).fit(method, ctx)
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < losses[0]
    assert not torch.equal(method.prompt.vocab.detach(), before_vocab)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before_backbone[k]), k


def test_coop_trains_its_context_and_keeps_the_vocabulary(world, backbone):
    seed_everything(0)
    method, ctx = make(CoOp, world, backbone, epochs=2, batch_size=12, lr=1e-2, select_metric="last")
    vocab = method.prompt.vocab.clone()
    context = method.prompt.context.detach().clone()
    Trainer(seed=0).fit(method, ctx)
    assert torch.equal(method.prompt.vocab, vocab)
    assert not torch.equal(method.prompt.context.detach(), context)


@pytest.mark.parametrize("cls", [CLIPZeroShot, CSP])
def test_open_world_blocks_tile_the_dense_scores(cls, world, backbone):
    dense_method, ctx = make(cls, world, backbone)
    split = world.split("test", "open")
    dense = dense_method.score(ctx, split)
    assert dense.shape == (len(split), 9)
    blocked, ctx2 = make(cls, world, backbone, score_block=4)
    blocks = list(blocked.score(ctx2, split))
    assert [start for start, _ in blocks] == [0, 4, 8]
    torch.testing.assert_close(torch.cat([b for _, b in blocks], dim=1), dense, atol=1e-5, rtol=1e-5)


def test_explain_names_the_top_pairs(world, backbone):
    method, ctx = make(CLIPZeroShot, world, backbone)
    split = world.split("test")
    out = method.explain(ctx, split, 0, top=3)
    assert len(out["top"]) == 3 and 1 <= out["true_rank"] <= len(split.pairs)
    assert out["top"][0]["score"] >= out["top"][1]["score"] >= out["top"][2]["score"]


def test_bad_template_is_one_line():
    with pytest.raises(ValueError, match=r"must contain \{attr\} and \{obj\}"):
        CLIPConfig(template="a photo of {obj}")
