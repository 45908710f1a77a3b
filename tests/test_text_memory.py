"""Chunked, checkpointed text encoding (czsl_bench.text_memory) changes memory, not numbers."""

from __future__ import annotations

import pytest
import torch

from czsl_bench.backbone import load_backbone
from czsl_bench.text_memory import encode_text, settings


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("czsl-tiny-vit", None, device="cpu")


@pytest.mark.parametrize("chunk,checkpoint", [(3, False), (3, True), (0, True), (100, False)])
def test_values_and_gradients_equal_the_plain_encoding(backbone, chunk, checkpoint):
    ids = backbone.tokenize(["a photo of red apple", "a photo of wet cup", "x", "old shoe", "a b c d e", "cat"],
                            context_length=8)
    eot = backbone.eot_index(ids)
    base = backbone.token_embedding(ids).detach().float()
    grads, outs = [], []
    for kwargs in ({"chunk": 0, "checkpoint": False}, {"chunk": chunk, "checkpoint": checkpoint}):
        emb = base.clone().requires_grad_(True)
        out = encode_text(backbone, emb, eot, **kwargs)
        (out.square().sum() + out[:, 0].sum()).backward()
        outs.append(out.detach())
        grads.append(emb.grad)
    # float32 sums in another order: equal to 1e-5 of the largest value (gradients reach ~3e2)
    for plain, chunked in ((outs[0], outs[1]), (grads[0], grads[1])):
        assert float((plain - chunked).abs().max()) <= 1e-5 * float(plain.abs().max())

def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("CZSL_TEXT_CHUNK", raising=False)
    monkeypatch.delenv("CZSL_TEXT_CHECKPOINT", raising=False)
    assert settings() == (0, False)
    monkeypatch.setenv("CZSL_TEXT_CHECKPOINT", "1")
    assert settings() == (512, True)
    monkeypatch.setenv("CZSL_TEXT_CHUNK", "64")
    assert settings() == (64, True)
    monkeypatch.setenv("CZSL_TEXT_CHUNK", "many")
    with pytest.raises(ValueError, match="CZSL_TEXT_CHUNK"):
        settings()
