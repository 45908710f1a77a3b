"""The method plugin base shared by Troika, ClusPro, the ClusPro base, VP-CMJL and CAMS.

It owns the config fields of the three-path model (``methods/three_path_model.py``), builds the
model on a run's backbone and dataset, and implements the training loss and the scores the
evaluator reads (docs/cluspro.md, docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from czsl_bench.config import at_least
from czsl_bench.method import Method, RunContext, TrainConfig
from czsl_bench.methods.three_path_model import BranchFeatures, ThreePathModel, ThreePathSpec



class VariantDefault:
    """Marks a config value that was filled in from the ClusPro ``variant`` rather than set by
    the user, so ``--set variant=code`` re-derives it while an explicit ``--set alpha=0.3`` wins.
    Instances are plain ``float``/``int`` subclasses: JSON, arithmetic and comparisons see the
    number."""


class VFloat(float, VariantDefault):
    pass


class VInt(int, VariantDefault):
    pass


class VStr(str, VariantDefault):
    pass


@dataclass
class ThreePathConfig(TrainConfig):
    """Settings shared by the three-path methods (docs/cluspro.md)."""

    vocab_dropout: float = 0.3
    disentangler_dropout: float = 0.5
    adapter_dim: int = at_least(1, 64)
    adapter_dropout: float = 0.1
    adapter_scale: float = 0.1
    w_pair: float = 1.0  # loss weights lambda_c, lambda_a, lambda_o
    w_attr: float = 1.0
    w_obj: float = 1.0
    eval_text_batch: int = at_least(1, 4096)  # prompts encoded per text-encoder call when scoring
    # The released code steps StepLR twice per epoch (docs/cluspro.md, "Variants"); 1 everywhere else.
    scheduler_steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vocab_dropout", "disentangler_dropout", "adapter_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    @staticmethod
    def common_defaults(recipe: str) -> dict:
        """Training recipe of the ClusPro paper with Troika's unstated choices (docs/cluspro.md),
        and a CPU-sized recipe for the embedded world."""
        key = recipe
        if key == "synthetic":
            # tiny ViT at 64 px on 2 CPU cores: a few epochs, larger LR (the tiny model is far
            # from converged on the world at the paper's 1e-4)
            return dict(epochs=4, batch_size=64, lr=1e-3, weight_decay=5e-5, scheduler="step",
                        step_size=2, gamma=0.5, vocab_dropout=0.3, amp=False)
        batch = {"mit-states": 64, "ut-zappos": 128, "cgqa": 16}[key]
        return dict(epochs=15, batch_size=batch, lr=1e-4, weight_decay=5e-5, scheduler="step",
                    step_size=5, gamma=0.5, vocab_dropout=0.0 if key == "cgqa" else 0.3,
                    amp=True, amp_dtype="bfloat16")


class ThreePathMethod(Method):
    """Prepare/fit/score of a three-path model; subclasses set the architecture and may add
    losses through :meth:`extra_loss`. The image encoder is tuned (adapters), so training and
    scoring read images, not cached features."""

    frozen_image_encoder = False
    disentangler_stages: int = 2

    def model_spec(self) -> ThreePathSpec:
        c = self.config
        return ThreePathSpec(vocab_dropout=c.vocab_dropout, disentangler_stages=self.disentangler_stages,
                             disentangler_dropout=c.disentangler_dropout, adapter_dim=c.adapter_dim,
                             adapter_dropout=c.adapter_dropout, adapter_scale=c.adapter_scale,
                             **self.extra_spec())

    def extra_spec(self) -> dict:
        return {}

    # -- prepare ---------------------------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> None:
        ds = ctx.dataset
        self.model = ThreePathModel(ctx.backbone, ds.attrs, ds.objs, self.model_spec(),
                                    clean=ctx.clean_name).to(ctx.device)
        self._backbone = ctx.backbone
        attr_index = {a: i for i, a in enumerate(ds.attrs)}
        obj_index = {o: i for i, o in enumerate(ds.objs)}
        self.train_pair_attr = torch.tensor([attr_index[a] for a, _ in ds.train_pairs], device=ctx.device)
        self.train_pair_obj = torch.tensor([obj_index[o] for _, o in ds.train_pairs], device=ctx.device)
        self._text_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self._train_lookup: tuple[Tensor, Tensor, Tensor] | None = None

    def modules(self) -> list[nn.Module]:
        return [self.model] if hasattr(self, "model") else []

    def train_mode(self, on: bool) -> None:
        super().train_mode(on)
        self._text_cache = {}  # weights change while training; cached text features go stale

    # -- training --------------------------------------------------------------------------------
    def train_dataset(self, ctx: RunContext):
        split = ctx.split("train")
        # the lookups translate a train-split label (index into split.pairs) into the indices the
        # three losses need: position among the seen training pairs, attribute, object
        train_index = {p: i for i, p in enumerate(ctx.dataset.train_pairs)}
        to_train = torch.tensor([train_index.get(tuple(p), -1) for p in split.pairs], device=ctx.device)
        self._train_lookup = (to_train, split.pair_attr.to(ctx.device), split.pair_obj.to(ctx.device))
        # decoded once, augmented per batch: the PIL path's tensors and random draws (docs/methods.md)
        return ctx.train_images(split)

    def batch_targets(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        to_train, pair_attr, pair_obj = self._train_lookup
        y_pair = to_train[labels]
        if (y_pair < 0).any():
            raise ValueError("a training image is labelled with a pair outside train_pairs; "
                             "the dataset's train split is inconsistent")
        return y_pair, pair_attr[labels], pair_obj[labels]

    def training_step(self, ctx: RunContext, batch) -> Tensor:
        images, labels = batch[0], batch[1]
        y_pair, y_attr, y_obj = self.batch_targets(labels)
        model = self.model
        feats = model.image_features(images)
        text = model.text_features(self.train_pair_attr, self.train_pair_obj)
        s_c, s_a, s_o = model.branch_logits(feats, text)
        c = self.config
        loss = (c.w_pair * F.cross_entropy(s_c, y_pair) + c.w_attr * F.cross_entropy(s_a, y_attr)
                + c.w_obj * F.cross_entropy(s_o, y_obj))
        return loss + self.extra_loss(feats, y_attr, y_obj)

    def extra_loss(self, feats: BranchFeatures, y_attr: Tensor, y_obj: Tensor) -> Tensor | float:
        """Hook for losses on top of the three-path CE (ClusPro's clustering)."""
        return 0.0

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def pair_text_features(self, pair_attr: Tensor, pair_obj: Tensor,
                           key: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Text features for a pair list, computed once per evaluation and reused for every image
        batch (they do not depend on the image; CMT only post-processes them per image). ``key``
        names the pair list for the cache (cleared whenever the weights may change)."""
        if key is None or key not in self._text_cache:
            model = self.model
            model.eval()
            step = max(1, self.config.eval_text_batch)
            chunks = [model.text_features(pair_attr[i : i + step], pair_obj[i : i + step])
                      for i in range(0, len(pair_attr), step)]
            comp = torch.cat([ch[0] for ch in chunks]) if chunks else torch.empty(0)
            result = (comp, chunks[0][1], chunks[0][2])
            if key is None:
                return result
            self._text_cache = {key: result}
        return self._text_cache[key]

    @torch.no_grad()
    def score(self, ctx: RunContext, split) -> Tensor:
        model = self.model
        model.eval()
        pair_attr = split.pair_attr.to(ctx.device)
        pair_obj = split.pair_obj.to(ctx.device)
        text = self.pair_text_features(pair_attr, pair_obj, key=(split.name, split.world, len(split.pairs)))
        batch = ctx.eval_batch_size
        if model.cmt is not None:  # image-dependent text: bound the [B, P, D] tensor to ~64 M floats
            batch = max(1, min(batch, (64 << 20) // max(1, len(split.pairs) * model.backbone.embed_dim)))
        out = []
        with ctx.progress.task(f"{self.name}: score {split.name}", total=-(-len(split) // batch)) as task:
            for images, _, _ in ctx.eval_batches(split, batch):
                feats = model.image_features(images)
                s_c, s_a, s_o = model.branch_logits(feats, text)
                out.append(model.combine(s_c, s_a, s_o, pair_attr, pair_obj).float().cpu())
                task.advance()
        return torch.cat(out) if out else torch.empty(0, len(split.pairs))
