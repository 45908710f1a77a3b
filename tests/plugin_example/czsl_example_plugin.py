"""A complete czsl-bench method in one file: a residual linear adapter on frozen CLIP image
features (in the spirit of CLIP-Adapter), trained with cross-entropy over the seen pairs.

It shows every part of the contract: a typed config with per-dataset defaults, ``prepare``
(text bank + parameters), the three Trainer hooks (``train_dataset``, ``training_step``,
``modules``), ``score`` and ``ablations``. The harness does the rest: seeding, caching,
training loop, model selection, evaluation and the run record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from czsl_bench.method import Method, RunContext, TrainConfig


@dataclass
class LinearAdapterConfig(TrainConfig):
    residual: float = 0.2  # weight of the adapted feature in the mix
    template: str = "a photo of {attr} {obj}"

    @classmethod
    def defaults(cls, recipe: str) -> LinearAdapterConfig:
        # ``recipe`` is the dataset's recipe family (mit-states, ut-zappos, cgqa or synthetic),
        # so a third-party dataset gets the defaults of the family its plugin declares
        if recipe == "synthetic":  # CPU-sized for the synthetic world
            return cls(epochs=4, batch_size=128, lr=1e-3)
        return cls(epochs=10, batch_size=64, lr=1e-3)


class LinearAdapter(Method):
    name = "linear-adapter"
    Config = LinearAdapterConfig

    def prepare(self, ctx: RunContext) -> None:
        dim = int(ctx.backbone.embed_dim)
        self.adapter = nn.Linear(dim, dim).to(ctx.device)
        nn.init.zeros_(self.adapter.weight)  # starts as CLIP zero-shot
        nn.init.zeros_(self.adapter.bias)
        self.scale = float(ctx.backbone.logit_scale)
        self.text: dict[str, torch.Tensor] = {}
        train = ctx.split("train")
        self.seen = torch.nonzero(train.seen_mask).squeeze(1)
        position = torch.full((len(train.pairs),), -1, dtype=torch.long)
        position[self.seen] = torch.arange(len(self.seen))
        self.targets = position[train.labels]  # label -> index among the seen pairs
        self.train_split = train

    def text_bank(self, ctx: RunContext, split) -> torch.Tensor:
        if split.world not in self.text:
            prompts = [self.config.template.format(attr=a, obj=o) for a, o in split.pairs]
            with torch.no_grad():
                self.text[split.world] = F.normalize(ctx.backbone.encode_text(prompts).float(), dim=-1)
        return self.text[split.world]

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image = F.normalize(image, dim=-1)
        mixed = F.normalize(image + self.config.residual * self.adapter(image), dim=-1)
        return self.scale * mixed @ text.t()

    # -- Trainer hooks ------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.adapter]

    def train_dataset(self, ctx: RunContext):
        return torch.utils.data.TensorDataset(ctx.image_features(self.train_split), self.targets)

    def training_step(self, ctx: RunContext, batch) -> torch.Tensor:
        image, target = batch
        text = self.text_bank(ctx, self.train_split)[self.seen.to(image.device)]
        return F.cross_entropy(self.logits(image, text), target)

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, ctx: RunContext, split) -> torch.Tensor:
        image = ctx.image_features(split).to(ctx.device)
        return self.logits(image, self.text_bank(ctx, split)).cpu()

    @classmethod
    def ablations(cls) -> dict[str, dict]:
        return {"zero-shot": {"epochs": 0}}
