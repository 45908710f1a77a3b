"""CUDA paths: a real-architecture ClusPro step in bf16 autocast, a whole embedded-world run, and
frozen features on the GPU against the CPU. ``gpu``-marked tests are skipped without CUDA
(tests/conftest.py); ``scripts/gpu-check.sh`` runs them and prints the figures (peak memory,
step time) that docs/backbone.md records. The step itself is also run on the CPU with the tiny
backbone (unmarked), so the code the GPU check relies on is tested on every machine.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

import czsl_bench
from czsl_bench.backbone import load_backbone
from czsl_bench.config import resolve_config
from czsl_bench.method import RunContext
from czsl_bench.methods.cluspro import ClusPro

ATTRS = ["red", "wet", "old", "sliced"]
OBJS = ["apple", "cup", "boot"]
TRAIN_PAIRS = [("red", "apple"), ("wet", "cup"), ("old", "apple"), ("sliced", "boot"), ("red", "cup")]


class _TrainSplit:
    """The parts of a train Split the three-path methods read, with random images."""

    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.name, self.world, self.pairs = "train", "closed", TRAIN_PAIRS
        self.pair_attr = torch.tensor([ATTRS.index(a) for a, _ in TRAIN_PAIRS])
        self.pair_obj = torch.tensor([OBJS.index(o) for _, o in TRAIN_PAIRS])
        self.labels = torch.randint(len(TRAIN_PAIRS), (n,), generator=g)
        self.images = torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self, transform=None):
        return torch.utils.data.TensorDataset(self.images, self.labels, torch.arange(len(self.labels)))


def cluspro_step(arch: str, device: str, n_images: int = 4) -> dict:
    """One ClusPro optimiser step on random-weight ``arch`` under bf16 autocast (fp32 on a CPU
    without bf16 autocast support is not needed: CPU autocast does bf16). Returns the figures."""
    torch.manual_seed(0)
    backbone = load_backbone(arch, None, device=device)
    cfg = resolve_config(ClusPro.Config, "synthetic", {})
    method = ClusPro(cfg)
    split = _TrainSplit(n_images, backbone.image_size)
    data = SimpleNamespace(attrs=ATTRS, objs=OBJS, train_pairs=TRAIN_PAIRS, split=lambda *a, **k: split)
    ctx = RunContext(dataset_name="synthetic", dataset=data, backbone=backbone, config=cfg, seed=0)
    with torch.no_grad():
        method.prepare(ctx)
    method.train_dataset(ctx)
    method.train_mode(True)
    params = [p for p in method.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    images, labels = split.images.to(device), split.labels.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = method.training_step(ctx, (images, labels, torch.arange(n_images, device=device)))
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"loss": float(loss.detach()), "grads_finite": grads_finite, "changed": changed, "params": len(params),
            "trainable": sum(p.numel() for p in params), "seconds": seconds, "peak_gib": peak}


def test_the_bf16_step_runs_on_the_cpu_with_the_tiny_backbone():
    out = cluspro_step("czsl-tiny-vit", "cpu")
    assert math.isfinite(out["loss"]) and out["grads_finite"]
    assert out["changed"] > 0 and out["trainable"] > 0


@pytest.mark.gpu
@pytest.mark.slow
def test_vit_l14_cluspro_step_in_bf16_on_cuda():
    out = cluspro_step("ViT-L-14-quickgelu", "cuda", n_images=8)
    print(f"\nViT-L-14-quickgelu ClusPro bf16 step (8 images, random weights): {out}")
    assert math.isfinite(out["loss"]) and out["grads_finite"]
    assert out["changed"] == out["params"]  # Adam moves every parameter that got a gradient


@pytest.mark.gpu
def test_frozen_features_on_cuda_match_the_cpu():
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        bb = load_backbone("czsl-tiny-vit", None, device=device)
        with torch.no_grad():
            feats[device] = bb.encode_image(images.to(device), adapters=False).float().cpu()
    torch.testing.assert_close(feats["cuda"], feats["cpu"], rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_cluspro_runs_the_embedded_world_on_cuda(tmp_path):
    started = time.perf_counter()
    record = czsl_bench.run("cluspro", "synthetic", seed=0, results_dir=tmp_path / "r",
                            cache_dir=tmp_path / "c", device="cuda", overrides=["epochs=1"], write=False)
    print(f"\nClusPro, embedded world, 1 epoch on CUDA: {time.perf_counter() - started:.1f} s, "
          f"test AUC {record.metrics['test']['auc']:.4f}")
    assert 0 <= record.metrics["test"]["auc"] <= 1
    assert all(math.isfinite(e["train_loss"]) for e in record.environment["training"]["history"])
