"""Troika (Huang et al., CVPR 2024): multi-path CZSL with cross-modal traction (docs/cluspro.md).

The three-path model of ``three_path.py`` with one Linear-BN-ReLU-Dropout(0.5) disentangler per
primitive branch and Cross-Modal Traction: each branch's text features attend to the image's
output tokens (``t' = normalize(t + lambda * CMT(t, tokens))``), so its logits are
image-dependent. Defaults follow the released Troika configs (spec §4.2): Adam, weight decay
1e-5, StepLR(5, 0.5) stepped once per epoch, fp32, and per dataset the batch size, learning rate,
vocabulary dropout, loss weights and CMT depth/dropout of that table.
"""

from __future__ import annotations

from dataclasses import dataclass

from czsl_bench.methods.three_path import ThreePathConfig, ThreePathMethod

# released Troika configs (docs/cluspro.md); the synthetic row is CPU-sized
_TROIKA = {
    "mit-states": dict(epochs=10, batch_size=64, lr=1e-4, vocab_dropout=0.3, w_attr=1.0, w_obj=1.0,
                       cmt_layers=3, cmt_dropout=0.1),
    "ut-zappos": dict(epochs=15, batch_size=128, lr=5e-4, vocab_dropout=0.3, w_attr=1.0, w_obj=1.0,
                      cmt_layers=2, cmt_dropout=0.0),
    "cgqa": dict(epochs=15, batch_size=16, lr=3.125e-6, vocab_dropout=0.0, w_attr=0.1, w_obj=0.1,
                 cmt_layers=2, cmt_dropout=0.0),
}


@dataclass
class TroikaConfig(ThreePathConfig):
    """Troika settings: the three-path fields plus cross-modal traction."""

    cmt_layers: int = 2
    cmt_dropout: float = 0.0
    cmt_init_lambda: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cmt_layers < 0:
            raise ValueError(f"cmt_layers must be >= 0 (0 turns traction off), got {self.cmt_layers}")

    @classmethod
    def defaults(cls, recipe: str) -> TroikaConfig:
        key = recipe
        base = ThreePathConfig.common_defaults(recipe)
        if key == "synthetic":
            return cls(**base, cmt_layers=1)
        base.update(weight_decay=1e-5, amp=False, step_size=5, **_TROIKA[key])
        return cls(**base)


class Troika(ThreePathMethod):
    """Troika: three paths, one disentangler stage per primitive, cross-modal traction."""

    name = "troika"
    Config = TroikaConfig
    disentangler_stages = 1

    def extra_spec(self) -> dict:
        c = self.config
        return dict(cmt_layers=c.cmt_layers, cmt_dropout=c.cmt_dropout, cmt_init_lambda=c.cmt_init_lambda)

    def explain(self, ctx, split, index: int, top: int = 5) -> dict:
        from czsl_bench.methods.explanations import three_path_explanation

        return three_path_explanation(self, ctx, split, index, top)
