"""The papers' architectures with random weights: one CPU forward and backward with adapters and soft
prompts, zero-init adapters bit-identical to the plain model, ClusPro's adapter parameter count.

No pretrained weights exist on the test machine; open_clip builds the exact ViT-B/32 and ViT-L/14
(QuickGELU) modules with random weights, which is what the wiring needs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from czsl_bench.backbone import load_backbone


def _forward_backward(arch: str, n_images: int, expect: dict) -> None:
    torch.manual_seed(0)
    bb = load_backbone(arch, None, device="cpu")
    assert (bb.embed_dim, bb.vision_width, bb.text_width, bb.image_size) == (
        expect["embed_dim"], expect["vision_width"], expect["text_width"], expect["image_size"],
    )
    assert isinstance(bb.visual.transformer.resblocks[0].mlp.gelu, type(bb.model.transformer.resblocks[0].mlp.gelu))
    assert type(bb.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    images = torch.randn(n_images, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        plain = bb.model.encode_image(images)
    params = bb.add_adapters()  # ClusPro/Troika defaults: 64-d bottleneck, dropout 0.1, scale 0.1
    n_blocks = len(bb.visual.transformer.resblocks)
    assert len(bb.adapters) == 2 * n_blocks
    assert sum(p.numel() for p in params) == expect["adapter_params"]
    bb.train()
    with torch.no_grad():
        assert torch.equal(bb.encode_image(images), plain)  # zero-init adapters: bit-identical features

    # soft prompts: the CSP/Troika template, context length 8, 3 learnable context tokens, 2 vocab rows
    ids = bb.tokenize(["a photo of x x"] * 3, context_length=8)
    ctx = torch.nn.Parameter(bb.token_embedding(ids[0, 1:4]).detach().clone())
    vocab = torch.nn.Parameter(bb.word_embedding(["sliced", "old", "wet", "apple", "car", "road"]).detach().clone())
    emb, eot = bb.soft_prompt_embeddings(ids, context=ctx, slots={-2: vocab[:3], -1: vocab[3:]})
    text = F.normalize(bb.encode_text_embeddings(emb, eot), dim=-1)
    cls, patches = bb.encode_image_tokens(images)
    # With autograd recording, torch's MultiheadAttention leaves its fused inference kernel once an
    # input requires grad (after the first adapter), so only float rounding may differ here.
    torch.testing.assert_close(cls, plain, rtol=1e-4, atol=1e-5)
    assert patches.shape == (n_images, expect["patches"], bb.embed_dim)
    logits = bb.logit_scale * F.normalize(cls, dim=-1) @ text.T
    loss = F.cross_entropy(logits, torch.arange(n_images) % 3) + patches.float().pow(2).mean() * 1e-3
    loss.backward()

    assert ctx.grad.abs().sum() > 0 and vocab.grad.abs().sum() > 0
    # with the up-projection at zero only it (and its bias) gets a gradient on the first step
    assert all(a.up.weight.grad.abs().sum() > 0 for a in bb.adapters)
    assert all(p.grad is None for p in bb.model.parameters())


@pytest.mark.slow
def test_vit_b32_quickgelu_forward_backward_on_cpu():
    _forward_backward(
        "ViT-B-32-quickgelu",
        n_images=2,
        expect=dict(embed_dim=512, vision_width=768, text_width=512, image_size=224, patches=49,
                    adapter_params=24 * (768 * 64 + 64 + 64 * 768 + 768)),
    )


@pytest.mark.slow
def test_vit_l14_quickgelu_forward_backward_on_cpu():
    """The papers' backbone: 48 adapters and 6,343,680 adapter parameters (spec-cluspro §1.1)."""
    _forward_backward(
        "ViT-L-14-quickgelu",
        n_images=1,
        expect=dict(embed_dim=768, vision_width=1024, text_width=768, image_size=224, patches=256,
                    adapter_params=6_343_680),
    )
