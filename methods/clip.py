"""CLIP zero-shot (docs/methods.md): score every pair with the prompt "a photo of {attr} {obj}".

No training, no parameters of its own. Names are cleaned as in the CSP codebase (``.`` → space,
lower case); text and image features are L2-normalised and scores are
``logit_scale · cos(image, text)`` (100 for OpenAI CLIP). The prompt template is a config field,
so ``--set template="a photo of a {obj} that is {attr}"`` tries another wording.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from czsl_bench.config import at_least
from czsl_bench.method import Method, RunContext

from .soft_prompt import CosineScoring, explain_scores, logit_scale


@dataclass
class CLIPConfig:
    template: str = "a photo of {attr} {obj}"
    text_batch_size: int = at_least(1, 1024)  # prompts per text-encoder call
    score_block: int = at_least(1, 50_000)  # open worlds with more pairs are scored as column blocks

    def __post_init__(self) -> None:
        if "{attr}" not in self.template or "{obj}" not in self.template:
            raise ValueError(f"template {self.template!r} must contain {{attr}} and {{obj}}")

    @classmethod
    def defaults(cls, dataset: str) -> CLIPConfig:
        return cls()  # the same prompt for every dataset (evaluate.py --experiment_name clip)


class CLIPZeroShot(CosineScoring, Method):
    name = "clip"
    Config = CLIPConfig

    def prepare(self, ctx: RunContext) -> None:
        self.scale = logit_scale(ctx.backbone)
        self._text: dict[tuple[str, int, int], torch.Tensor] = {}

    def prompts(self, pairs, clean) -> list[str]:
        return [self.config.template.format(attr=clean(a), obj=clean(o)) for a, o in pairs]

    @torch.no_grad()
    def text_features(self, ctx: RunContext, split, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = len(split.pairs) if stop is None else stop
        key = (split.world, start, stop)
        if key in self._text:  # val and test share the pair list of their world
            return self._text[key]
        if ctx.cache is not None:  # content-hashed on disk: shared by seeds and runs
            from czsl_bench.cache import pair_text_features

            feats = pair_text_features(ctx.backbone, split.pairs[start:stop], self.config.template,
                                       cache=ctx.cache, batch_size=self.config.text_batch_size, clean=ctx.clean_name)
        else:
            prompts = self.prompts(split.pairs[start:stop], ctx.clean_name)
            bs = self.config.text_batch_size
            feats = torch.cat([ctx.backbone.encode_text(prompts[i:i + bs]).float()
                               for i in range(0, len(prompts), bs)])
        feats = F.normalize(feats.float().to(ctx.device), dim=-1)
        if stop - start == len(split.pairs):  # keep whole worlds only; blocks of huge ones stream
            self._text[key] = feats
        return feats

    @classmethod
    def ablations(cls) -> dict[str, dict]:
        # Word order matters to CLIP's text encoder; this variant measures how much.
        return {"object-first": {"template": "a photo of a {obj} which is {attr}"}}

    def explain(self, ctx: RunContext, split, index: int, top: int = 5) -> dict:
        return explain_scores(self.score(ctx, split), split, index, top)
