"""CSP, Compositional Soft Prompting (Nayak, Yu & Bach, ICLR 2023; docs/methods.md).

The prompt ``"a photo of [attr] [obj]"`` keeps CLIP's frozen "a photo of" and learns one vector
per attribute and per object (the vocabulary, (|A|+|O|) × d, initialised with the mean token
embedding of each cleaned name). "attr_dropout" is element-wise dropout over the whole
vocabulary matrix at every forward. Loss: cross-entropy over the seen pairs of
``logit_scale · cos(image, text)``, text features recomputed every step through the frozen text
encoder; Adam on the vocabulary only, no scheduler.

Per-dataset defaults: the README commands (MIT-States, UT-Zappos) and the recalled paper table
(C-GQA: a recalled paper appendix, marked uncertain in docs/methods.md, "Defaults"). The CSP repository picks no epoch automatically; here the
harness selects the epoch on validation AUC (``--set select_metric=last`` keeps the final one).
"""

from __future__ import annotations

from dataclasses import dataclass

from .soft_prompt import SoftPromptConfig, SoftPromptMethod, csp_training_defaults


@dataclass
class CSPConfig(SoftPromptConfig):
    @classmethod
    def defaults(cls, dataset: str) -> CSPConfig:
        return cls(**csp_training_defaults(dataset))


class CSP(SoftPromptMethod):
    name = "csp"
    Config = CSPConfig
    learn_context = False
    learn_vocab = True

    @classmethod
    def ablations(cls) -> dict[str, dict]:
        return {"no-dropout": {"attr_dropout": 0.0}}
