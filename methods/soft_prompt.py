"""Shared building blocks of the CLIP prompt methods (CLIP zero-shot, CoOp, CSP and successors).

Not a method itself (no entry point): ``clip.py``, ``coop.py`` and ``csp.py`` import it.

Prompt construction follows the CSP codebase (docs/methods.md):

* class names are cleaned by replacing ``.`` with a space and lower-casing;
* the soft prompt is the token sequence of ``"a photo of x x"``; the two ``x`` positions (the
  two tokens before the end-of-text token) take an attribute and an object vector; the three
  tokens after start-of-text are the context ``"a photo of"``;
* a word's vector is the mean of the token embeddings of its cleaned name (the tokens between
  start-of-text and end-of-text), so multi-token names become one vector;
* text features are read at the end-of-text position by the (frozen) text encoder, scores are
  ``logit_scale · cos(image, text)`` (100 for OpenAI CLIP).

The image encoder stays frozen: training and scoring use cached image features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from czsl_bench.config import at_least
from czsl_bench.method import Method, RunContext, TrainConfig, iter_column_blocks
from czsl_bench.names import clean_name
from czsl_bench.text_memory import encode_text

TEMPLATE = "a photo of x x"
CONTEXT = "a photo of"
N_CONTEXT = 3  # "a photo of"


def eot_positions(backbone, ids: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token in each row of ``ids``."""
    finder = getattr(backbone, "eot_index", None)
    if callable(finder):
        return torch.as_tensor(finder(ids)).long()
    return ids.argmax(dim=-1)  # CLIP's EOT has the largest id of the vocabulary


def logit_scale(backbone) -> float:
    """The backbone's (frozen) multiplicative logit scale, e.g. 100 for OpenAI CLIP."""
    scale = getattr(backbone, "logit_scale", 100.0)
    scale = scale() if callable(scale) else scale
    return float(scale.detach() if isinstance(scale, torch.Tensor) else scale)


@torch.no_grad()
def word_vectors(backbone, names: Sequence[str], device: torch.device,
                 clean: Callable[[str], str] = clean_name) -> torch.Tensor:
    """``[len(names), d]``: mean token embedding of each cleaned name (its SOT..EOT interior)."""
    ids = backbone.tokenize([clean(n) for n in names]).to(device)
    emb = backbone.token_embedding(ids).float()
    eot = eot_positions(backbone, ids)
    out = torch.empty(len(names), emb.shape[-1], device=emb.device)
    for i in range(len(names)):
        stop = max(int(eot[i]), 2)  # an empty name would give no interior token: keep one
        out[i] = emb[i, 1:stop].mean(dim=0)
    return out


def seen_pair_targets(ctx: Any, train: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seen (training) pairs' attribute and object indices on the run's device, and each
    training image's target among them: train labels index the closed pair list, the loss is over
    the seen pairs only (CSP, PLID)."""
    seen = torch.nonzero(train.seen_mask).squeeze(1)
    position = torch.full((len(train.pairs),), -1, dtype=torch.long)
    position[seen] = torch.arange(len(seen))
    targets = position[train.labels]
    if (targets < 0).any():
        raise ValueError(f"{ctx.dataset_name}: a training image has a pair outside train_pairs")
    return train.pair_attr[seen].to(ctx.device), train.pair_obj[seen].to(ctx.device), targets


class SoftPrompt(nn.Module):
    """Builds ``"a photo of [attr] [obj]"`` token embeddings and encodes them.

    ``learn_context`` makes the three context vectors trainable (CoOp); ``learn_vocab`` makes
    the attribute/object vocabulary trainable (CSP). ``vocab_dropout`` is CSP's "attr_dropout":
    element-wise dropout on the whole vocabulary matrix (objects included) at every forward.
    """

    def __init__(self, backbone, attrs: Sequence[str], objs: Sequence[str], device: torch.device,
                 learn_context: bool, learn_vocab: bool, vocab_dropout: float = 0.0,
                 context_length: int | None = None, clean: Callable[[str], str] = clean_name):
        super().__init__()
        self.backbone = [backbone]  # a list keeps the frozen backbone out of this module's state
        with torch.no_grad():
            ids = backbone.tokenize([TEMPLATE]).to(device)
            eot = int(eot_positions(backbone, ids)[0])
            if context_length is not None and eot < context_length < ids.shape[1]:
                # The text transformer is causal and read at EOT: dropping the padding after EOT
                # changes nothing but the cost (docs/methods.md, context_length 8 in training).
                ids = ids[:, :context_length]
            template = backbone.token_embedding(ids).float()
        self.register_buffer("template", template, persistent=False)
        self.eot = eot
        self.n_attrs = len(attrs)
        vocab = word_vectors(backbone, list(attrs) + list(objs), device, clean)
        context = template[0, 1:1 + N_CONTEXT].clone()
        if learn_vocab:
            self.vocab = nn.Parameter(vocab)
        else:
            self.register_buffer("vocab", vocab)
        if learn_context:
            self.context = nn.Parameter(context)
        else:
            self.register_buffer("context", context, persistent=False)
        self.dropout = nn.Dropout(vocab_dropout)

    def token_embeddings(self, pair_attr: torch.Tensor, pair_obj: torch.Tensor) -> torch.Tensor:
        vocab = self.dropout(self.vocab)
        n = len(pair_attr)
        tokens = self.template.expand(n, -1, -1).clone()
        tokens[:, 1:1 + N_CONTEXT] = self.context
        tokens[:, self.eot - 2] = vocab[pair_attr]
        tokens[:, self.eot - 1] = vocab[self.n_attrs + pair_obj]
        return tokens

    def forward(self, pair_attr: torch.Tensor, pair_obj: torch.Tensor) -> torch.Tensor:
        """``[P, D]`` L2-normalised text features of the pairs ``(pair_attr[i], pair_obj[i])``."""
        tokens = self.token_embeddings(pair_attr, pair_obj)
        eot = torch.full((len(pair_attr),), self.eot, dtype=torch.long, device=tokens.device)
        feats = encode_text(self.backbone[0], tokens, eot)  # CZSL_TEXT_CHUNK / _CHECKPOINT: memory only
        return F.normalize(feats.float(), dim=-1)


@dataclass
class SoftPromptConfig(TrainConfig):
    """CSP-codebase training settings (docs/methods.md) plus the prompt's own."""

    attr_dropout: float = 0.0
    context_length: int = at_least(1, 8)  # training prompts are cut here (no effect on the features)
    text_batch_size: int = at_least(1, 1024)  # pairs per text-encoder call when scoring
    score_block: int = at_least(1, 50_000)  # open worlds with more pairs are scored as column blocks


# docs/methods.md: epochs 20, batch 64 x accumulation 2 (effective 128), weight decay 1e-5,
# context length 8 in training.
_COMMON = dict(epochs=20, batch_size=64, grad_accum=2, weight_decay=1e-5, context_length=8,
               optimizer="adam", scheduler="none")
_PER_DATASET: dict[str, dict[str, Any]] = {
    "mit-states": dict(lr=5e-5, attr_dropout=0.3),  # README command [code]
    "ut-zappos": dict(lr=5e-4, attr_dropout=0.2),  # README mix-vocabulary example [code]
    "cgqa": dict(lr=5e-5, attr_dropout=0.3),  # recalled appendix table [paper?]
}
# The embedded world: a 128-d tiny CLIP on CPU. The text encoder runs once per step whatever the
# batch, so few large batches are cheapest; lr tuned on synthetic validation (seed 0).
_EMBEDDED = dict(epochs=12, batch_size=512, grad_accum=1, lr=1e-2, attr_dropout=0.3, weight_decay=1e-5,
                 context_length=8, optimizer="adam", scheduler="none")


def csp_training_defaults(recipe: str) -> dict[str, Any]:
    """The CSP-codebase training settings of a recipe family (also used by CoOp)."""
    if recipe == "synthetic":
        return dict(_EMBEDDED)
    return {**_COMMON, **_PER_DATASET[recipe]}


class CosineScoring:
    """Scoring shared by CLIP zero-shot, CoOp and CSP: ``scale * cos(image, pair text)`` over the
    cached frozen image features; dense up to ``config.score_block`` pairs, else a stream of
    column blocks (open world on C-GQA). Needs ``self.scale`` and ``text_features(ctx, split,
    start, stop)`` (L2-normalised ``[stop - start, D]``)."""

    @torch.no_grad()
    def score(self, ctx: RunContext, split):
        image = F.normalize(ctx.image_features(split), dim=-1).to(ctx.device)
        if len(split.pairs) <= self.config.score_block:
            return (self.scale * image @ self.text_features(ctx, split).t()).float().cpu()
        return self._blocks(ctx, split, image)

    def _blocks(self, ctx: RunContext, split, image: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        for start, stop in iter_column_blocks(len(split.pairs), self.config.score_block):
            text = self.text_features(ctx, split, start, stop)
            yield start, (self.scale * image @ text.t()).float().cpu()


class SoftPromptMethod(CosineScoring, Method):
    """CoOp/CSP: a learnable part of the prompt, trained with cross-entropy over seen pairs on
    cached image features; subclasses choose what is learnable."""

    learn_context: bool = False
    learn_vocab: bool = False
    use_dropout: bool = True

    def prepare(self, ctx: RunContext) -> None:
        cfg = self.config
        ds = ctx.dataset
        self.prompt = SoftPrompt(ctx.backbone, ds.attrs, ds.objs, ctx.device, self.learn_context,
                                 self.learn_vocab, cfg.attr_dropout if self.use_dropout else 0.0,
                                 cfg.context_length, clean=ctx.clean_name)
        self.prompt.eval()  # scoring never drops out; the Trainer switches training mode on
        self.scale = logit_scale(ctx.backbone)
        train = ctx.split("train", "closed")
        self.seen_attr, self.seen_obj, self.train_targets = seen_pair_targets(ctx, train)
        self._train_split = train

    def modules(self) -> list[nn.Module]:
        return [self.prompt]

    def train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        feats = F.normalize(ctx.image_features(self._train_split), dim=-1)
        return torch.utils.data.TensorDataset(feats, self.train_targets)

    def training_step(self, ctx: RunContext, batch) -> torch.Tensor:
        image, target = batch
        text = self.prompt(self.seen_attr, self.seen_obj)
        logits = self.scale * image.to(text.dtype) @ text.t()
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def text_features(self, ctx: RunContext, split, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = len(split.pairs) if stop is None else stop
        attr = split.pair_attr[start:stop].to(ctx.device)
        obj = split.pair_obj[start:stop].to(ctx.device)
        bs = self.config.text_batch_size
        return torch.cat([self.prompt(attr[i:i + bs], obj[i:i + bs]) for i in range(0, len(attr), bs)])


    def explain(self, ctx: RunContext, split, index: int, top: int = 5) -> dict:
        return explain_scores(self.score(ctx, split), split, index, top)


def explain_scores(scores, split, index: int, top: int = 5) -> dict:
    """Top pairs for one image with their scores, and where the true pair ranks (among the split's
    candidate pairs, as the evaluator ranks them; no unseen bias)."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.cat([block[index:index + 1] for _, block in scores], dim=1)
        index_row = 0
    else:
        index_row = index
    row = scores[index_row].float()
    order = torch.where(split.candidate_mask.bool(), row, torch.full_like(row, -float("inf"))).argsort(descending=True)
    gt = int(split.labels[index])
    return {
        "image": split.images[index],
        "true_pair": " ".join(split.pairs[gt]),
        "true_rank": int((order == gt).nonzero()[0, 0]) + 1,
        "ranking": "by raw score among the split's candidate pairs (no unseen bias)",
        "top": [{"pair": " ".join(split.pairs[int(j)]), "score": float(row[j]),
                 "seen": bool(split.seen_mask[j])} for j in order[:top]],
    }
