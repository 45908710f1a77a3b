"""Troika: cross-modal traction, configs, parameter counts (spec-cluspro §6)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from czsl_bench.backbone import load_backbone
from czsl_bench.config import resolve_config
from czsl_bench.method import RunContext, parameter_counts
from czsl_bench.methods.three_path_model import CrossModalTraction, ThreePathModel, ThreePathSpec
from czsl_bench.names import clean_name
from czsl_bench.methods.troika import Troika, TroikaConfig

ATTRS = ["red", "wet", "old"]
OBJS = ["apple", "cup"]
PAIRS = [("red", "apple"), ("wet", "cup"), ("old", "apple")]


def test_cmt_layer_has_the_counted_size_and_is_image_dependent():
    cmt = CrossModalTraction(768, layers=1, dropout=0.0, init_lambda=0.1)
    per_layer = sum(p.numel() for p in cmt.layers[0].parameters())
    assert per_layer == 7_084_032  # spec §1.1
    assert cmt.lamda.shape == (768,) and float(cmt.lamda[0].detach()) == pytest.approx(0.1)
    small = CrossModalTraction(32, layers=2, dropout=0.0, init_lambda=0.1).eval()
    text = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    tokens = torch.randn(3, 9, 32)
    out = small(text, tokens, branch=0)
    assert out.shape == (3, 5, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 5))
    assert not torch.allclose(out[0], out[1])  # depends on the image
    # Troika re-applies its token LayerNorm once per branch (kept for fidelity)
    assert not torch.allclose(small(text, tokens, branch=0), small(text, tokens, branch=2))


def test_troika_defaults_follow_the_released_configs():
    mit, ut, cgqa = (TroikaConfig.defaults(d) for d in ("mit-states", "ut-zappos", "cgqa"))
    assert (mit.cmt_layers, ut.cmt_layers, cgqa.cmt_layers) == (3, 2, 2)
    assert (mit.cmt_dropout, ut.cmt_dropout) == (0.1, 0.0)
    assert (mit.lr, ut.lr, cgqa.lr) == (1e-4, 5e-4, 3.125e-6)
    assert (cgqa.w_attr, cgqa.w_obj, cgqa.vocab_dropout) == (0.1, 0.1, 0.0)
    assert all(c.weight_decay == 1e-5 and c.amp is False and c.scheduler_steps_per_epoch == 1
               for c in (mit, ut, cgqa))
    with pytest.raises(ValueError, match="cmt_layers"):
        resolve_config(TroikaConfig, "synthetic", ["cmt_layers=-1"])


def test_troika_trains_and_scores_on_the_tiny_backbone():
    torch.manual_seed(0)
    backbone = load_backbone("czsl-tiny-vit", None, device="cpu")
    cfg = TroikaConfig.defaults("synthetic")
    model = ThreePathModel(backbone, ATTRS, OBJS, ThreePathSpec(disentangler_stages=1, cmt_layers=1))
    assert not hasattr(model, "attr_dis2") and model.cmt is not None
    model.train()
    pa, po = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    feats = model.image_features(torch.randn(4, 3, 64, 64))
    s_c, s_a, s_o = model.branch_logits(feats, model.text_features(pa, po))
    assert (s_c.shape, s_a.shape, s_o.shape) == ((4, 3), (4, 3), (4, 2))
    loss = (torch.nn.functional.cross_entropy(s_c, torch.tensor([0, 1, 2, 0]))
            + torch.nn.functional.cross_entropy(s_a, torch.tensor([0, 1, 2, 0])))
    loss.backward()
    assert model.cmt.lamda.grad is not None and model.vocabulary.grad is not None
    assert model.prefix.grad is not None
    assert cfg.cmt_layers >= 1


def test_clean_name_matches_the_released_preprocessing():
    # one policy per dataset (czsl_bench.names); "dots", the default, is the released codes'
    assert clean_name("Faux.Fur") == clean_name("Faux.Fur", "dots") == "faux fur"
    assert clean_name("ankle_boots", "dots-underscores") == "ankle boots"
    assert clean_name("ankle_boots") == "ankle_boots"
    with pytest.raises(ValueError, match="unknown name policy 'spaces'"):
        clean_name("x", "spaces")


def test_three_path_vocabulary_uses_the_dataset_name_policy():
    """The three-path methods clean names with the run's policy (RunContext.clean_name)."""
    backbone = load_backbone("czsl-tiny-vit", None, device="cpu")
    spec = ThreePathSpec(disentangler_stages=1, cmt_layers=1)
    objs = ["ankle_boots", "Faux.Fur"]
    # the vocabulary is initialised from the frozen token embeddings: one backbone, no adapters
    split = ThreePathModel(backbone, ATTRS, objs, spec, add_adapters=False,
                           clean=lambda n: clean_name(n, "dots-underscores"))
    spelled = ThreePathModel(backbone, ATTRS, ["ankle boots", "faux fur"], spec, add_adapters=False)
    torch.testing.assert_close(split.vocabulary, spelled.vocabulary)
    kept = ThreePathModel(backbone, ATTRS, objs, spec, add_adapters=False)  # "dots" keeps the underscore
    assert not torch.allclose(kept.vocabulary, spelled.vocabulary)
    ctx = RunContext(dataset_name="x", dataset=None, backbone=backbone, config=None, seed=0,
                     name_policy="dots-underscores")
    assert ctx.clean_name("ankle_boots") == "ankle boots"


@pytest.mark.slow
def test_vit_l14_troika_parameter_count_matches_the_paper():
    # spec §1.1: Troika on UT-Zappos = 21.73 M (paper Table 10: 21.7 M)
    backbone = load_backbone("ViT-L-14-quickgelu", None, device="cpu")
    cfg = TroikaConfig.defaults("ut-zappos")
    data = SimpleNamespace(attrs=[f"a{i}" for i in range(16)], objs=[f"o{i}" for i in range(12)],
                           train_pairs=[("a0", "o0")])
    method = Troika(cfg)
    with torch.no_grad():
        method.prepare(RunContext(dataset_name="ut-zappos", dataset=data, backbone=backbone, config=cfg, seed=0))
    assert parameter_counts(method, backbone)["trainable"] == 21_726_720
