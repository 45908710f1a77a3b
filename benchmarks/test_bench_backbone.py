"""Backbone and feature-cache speed on CPU.

* image-encoder throughput of the tiny model (``czsl-tiny-vit``, 64 px) and of ViT-B-32 (224 px);
* one frozen-encoder training epoch (CSP-style soft vocabulary, 512 images on disk) with image
  features read from the feature cache, and without it (decode + preprocess + encode every step).

Run: ``pytest benchmarks/test_bench_backbone.py --benchmark-only``. Weights are random (speed does
not depend on them). Figures measured on the project's 2-core CPU machine are in docs/backbone.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from czsl_bench.backbone import load_backbone, packaged_backbone_dir
from czsl_bench.cache import FeatureCache
from czsl_bench.features import image_features
from czsl_bench.names import clean_name

TINY = "czsl-tiny-vit"
N_IMAGES = 512
BATCH = 64
ATTRS = ["red", "old", "wet", "sliced", "broken", "shiny"]
OBJS = ["apple", "car", "road", "shoe", "table", "bottle"]


def _tiny_backbone():
    if not (packaged_backbone_dir() / f"{TINY}.json").is_file():
        pytest.skip(f"{TINY} config is not packaged")
    torch.manual_seed(0)
    return load_backbone(TINY, None, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return _tiny_backbone()


def test_bench_image_encoder_tiny(benchmark, tiny):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = torch.randn(BATCH, 3, tiny.image_size, tiny.image_size)

    def run():
        with torch.inference_mode():
            return tiny.encode_image(images, adapters=False)

    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (BATCH, tiny.embed_dim)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


def test_bench_image_encoder_vit_b32(benchmark):
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-32-quickgelu", None, device="cpu")
    images = torch.randn(16, 3, 224, 224)

    def run():
        with torch.inference_mode():
            return bb.encode_image(images, adapters=False)

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == (16, 512)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = 16 / benchmark.stats.stats.mean


# ---- a frozen-encoder training epoch ----------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> tuple[Path, list[str], torch.Tensor]:
    root = tmp_path_factory.mktemp("bench_images")
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(N_IMAGES):
        arr = (torch.rand(80, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
        names.append(f"img{i:04d}.jpg")
        Image.fromarray(arr).save(root / names[-1], quality=90)
    labels = torch.randint(len(ATTRS) * len(OBJS), (N_IMAGES,), generator=g)
    return root, names, labels


class _SoftVocab(torch.nn.Module):
    """CSP in miniature: one learnable vector per attribute and object in "a photo of x x"."""

    def __init__(self, bb):
        super().__init__()
        self.bb = [bb]
        self.vocab = torch.nn.Parameter(bb.word_embedding([clean_name(n) for n in ATTRS + OBJS]).detach().clone())
        pairs = [(a, o) for a in range(len(ATTRS)) for o in range(len(OBJS))]
        self.register_buffer("pair_attr", torch.tensor([a for a, _ in pairs]))
        self.register_buffer("pair_obj", torch.tensor([len(ATTRS) + o for _, o in pairs]))
        self.register_buffer("ids", bb.tokenize(["a photo of x x"] * len(pairs), context_length=8))

    def forward(self) -> torch.Tensor:
        bb = self.bb[0]
        vocab = F.dropout(self.vocab, 0.3, self.training)
        emb, eot = bb.soft_prompt_embeddings(self.ids, slots={-2: vocab[self.pair_attr], -1: vocab[self.pair_obj]})
        return F.normalize(bb.encode_text_embeddings(emb, eot), dim=-1)


def _epoch(bb, model, opt, batches) -> float:
    model.train()
    total = 0.0
    for feats, labels in batches:
        text = model()
        logits = 100.0 * F.normalize(feats, dim=-1) @ text.T
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total


def _loader(bb, root, names, labels):
    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(names)

        def __getitem__(self, i):
            with Image.open(root / names[i]) as im:
                return bb.preprocess_eval(im.convert("RGB")), labels[i]

    return torch.utils.data.DataLoader(Files(), batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def test_bench_frozen_encoder_epoch_without_cache(benchmark, tiny, image_dir):
    root, names, labels = image_dir
    model = _SoftVocab(tiny)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)

    def batches():
        for images, y in _loader(tiny, root, names, labels):
            with torch.no_grad():
                feats = tiny.encode_image(images, adapters=False)
            yield feats, y  # outside no_grad: a generator suspended inside it would leak the mode

    loss = benchmark.pedantic(lambda: _epoch(tiny, model, opt, batches()), rounds=3, iterations=1)
    assert loss > 0


def test_bench_frozen_encoder_epoch_with_cache(benchmark, tiny, image_dir, tmp_path):
    root, names, labels = image_dir
    store = FeatureCache(tmp_path / "cache")
    image_features(tiny, root, names, cache=store)  # the first epoch of a run fills the cache
    model = _SoftVocab(tiny)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)

    def batches():
        feats = image_features(tiny, root, names, cache=store)  # a hit: read, verified, no encoding
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(0))
        for start in range(0, len(names), BATCH):
            idx = order[start : start + BATCH]
            yield feats[idx], labels[idx]

    loss = benchmark.pedantic(lambda: _epoch(tiny, model, opt, batches()), rounds=3, iterations=1)
    assert loss > 0
