"""Pretraining of the embedded tiny CLIP: tiny runs only (a few steps on a handful of images)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from czsl_bench.datasets.synthetic import web_corpus
from czsl_bench.pretrain import (BACKBONE_DIR, TINY_ARCH, PretrainConfig, _lr_at, checkpoint_name, create_tiny_model,
                                 load_tiny, pretrain, record_name, save_checkpoint, tiny_pretrained_path)

TINY = PretrainConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, threads=1, hflip=False)


@pytest.fixture(scope="module")
def corpus():
    images, captions, _ = web_corpus(16, seed=2, image_size=64, workers=1)
    return images, captions


def _quiet(_msg: str) -> None:
    pass


def test_loss_decreases(corpus):
    result = pretrain(TINY, corpus=corpus, log=_quiet)
    losses = [p["loss"] for p in result.record["loss_curve"]]
    assert len(losses) == TINY.steps and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(8), abs=0.3)  # random init: chance level of a batch of 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1


def test_same_seed_same_weights_other_seed_other_weights(corpus):
    cfg = replace(TINY, steps=3)
    a = pretrain(cfg, corpus=corpus, log=_quiet).state_dict
    b = pretrain(cfg, corpus=corpus, log=_quiet).state_dict
    c = pretrain(replace(cfg, seed=1), corpus=corpus, log=_quiet).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_loads_into_open_clip(tmp_path, corpus):
    import open_clip

    result = pretrain(replace(TINY, steps=2), corpus=corpus, log=_quiet)
    ckpt, rec = save_checkpoint(result, tmp_path, tag="test")
    assert ckpt.name == checkpoint_name("test") and rec.name == record_name("test")
    assert (tmp_path / f"{TINY_ARCH}.json").is_file()  # the config travels with the weights
    saved = load_file(str(ckpt))
    assert all(v.dtype == torch.float16 for v in saved.values())
    # the contract with czsl_bench.backbone: keys are exactly open_clip's CLIP state dict
    model, _ = create_tiny_model()
    assert set(saved) == set(model.state_dict())
    loaded = open_clip.create_model(TINY_ARCH, pretrained=str(ckpt))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, saved[k].float()), k
    first = ckpt.read_bytes()
    save_checkpoint(result, tmp_path, tag="test")
    assert ckpt.read_bytes() == first  # byte-identical file for identical weights
    record = json.loads(rec.read_text())
    assert record["checkpoint"]["bytes"] == ckpt.stat().st_size and record["config"]["steps"] == 2
    assert not {"embed_dim", "vision_cfg", "text_cfg"} <= set(record)  # open_clip's scan must skip it


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1.0)
    lrs = [_lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_bad_input_is_one_clear_error(corpus):
    with pytest.raises(ValueError, match="steps >= 1"):
        pretrain(replace(TINY, steps=0), corpus=corpus, log=_quiet)
    with pytest.raises(ValueError, match="one caption per image"):
        pretrain(TINY, corpus=(corpus[0], corpus[1][:3]), log=_quiet)


def test_cli_pretrain_tiny_run(tmp_path):
    from czsl_bench.cli import cli

    out = tmp_path / "bb"
    res = CliRunner().invoke(cli, ["backbone", "pretrain", "--out", str(out), "--steps", "2", "--n-images", "8",
                                   "--batch-size", "4", "--threads", "1", "--no-eval", "--tag", "t"])
    assert res.exit_code == 0, res.output
    assert (out / checkpoint_name("t")).is_file() and (out / record_name("t")).is_file()
    record = json.loads((out / record_name("t")).read_text())
    assert len(record["corpus"]["excluded_pairs"]) == 63  # unseen val/test pairs left out by default


# -- the committed checkpoint ------------------------------------------------------------------


def test_committed_checkpoint_is_small_and_calibrated():
    path = tiny_pretrained_path()
    assert path.stat().st_size <= 20 * 2**20
    record = json.loads((BACKBONE_DIR / record_name()).read_text())
    assert record["checkpoint"]["bytes"] == path.stat().st_size
    test = record["zero_shot"]["test"]
    # the calibration target: far above chance, far from perfect, room for trained methods
    assert 0.05 <= test["auc"] <= 0.40
    assert test["best_unseen"] > 5 * test["chance_pair_top1"]
    # the defaults of `czsl-bench backbone pretrain` are the committed run's settings
    assert record["config"] == asdict(PretrainConfig())
    assert record["timing"]["samples_per_s"] > 0


@pytest.mark.slow
def test_committed_checkpoint_reproduces_its_recorded_zero_shot_numbers(tmp_path, monkeypatch):
    from czsl_bench.datasets.synthetic import plugin
    from czsl_bench.pretrain import evaluate_zero_shot

    record = json.loads((BACKBONE_DIR / record_name()).read_text())
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path))
    model, tokenizer = load_tiny()
    from czsl_bench.datasets.synthetic import SyntheticConfig

    got = evaluate_zero_shot(model, tokenizer, plugin.load(config=SyntheticConfig()), "test")
    for key in ("auc", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc"):
        assert got[key] == pytest.approx(record["zero_shot"]["test"][key], abs=2e-3), key
