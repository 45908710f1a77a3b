"""CoOp as implemented in the CSP codebase (docs/methods.md).

Prompt ``"a photo of [attr] [obj]"``: the three context vectors after start-of-text are
learned (initialised from the embeddings of "a photo of", 3 × d parameters); the attribute and
object vectors are the frozen mean token embeddings of the cleaned names. Loss, optimiser and
hyper-parameters are CSP's (cross-entropy over the seen pairs, Adam, no scheduler). The CSP code
applies no dropout to CoOp's frozen vocabulary, so neither does this.
"""

from __future__ import annotations

from dataclasses import dataclass

from .soft_prompt import SoftPromptConfig, SoftPromptMethod, csp_training_defaults


@dataclass
class CoOpConfig(SoftPromptConfig):
    @classmethod
    def defaults(cls, dataset: str) -> CoOpConfig:
        values = csp_training_defaults(dataset)
        values.pop("attr_dropout")
        return cls(**values)


class CoOp(SoftPromptMethod):
    name = "coop"
    Config = CoOpConfig
    learn_context = True
    learn_vocab = False
    use_dropout = False
