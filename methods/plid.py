"""PLID, Prompting Language-Informed Distribution (Bao, Chen, Huang & Kong, ECCV 2024; docs/plid.md).

PLID is CSP plus five parts (spec-baselines §4.1, the released ``gencsp`` model):

1. **Soft prompt** (CSP-style): a learnable attribute/object vocabulary *and* a learnable 3-token
   context initialised from "a photo of" give the text feature ``t_k`` of pair ``k``.
2. **Description bank**: ``num_texts`` sentences per pair (an LLM's, read from a bank file;
   czsl_bench.text_bank), cleaned by PLID's rules, encoded once by the frozen text encoder
   (content-hashed cache). A pair without sentences takes one fallback sentence (counted).
3. **Text enhancement**: a cross-attention block (query ``t_k``, keys/values the pair's
   sentence features; residual, LayerNorm, 4x QuickGELU MLP, dropout ``attn_dropout``) gives the
   class mean ``mu_k``.
4. **Language-informed distribution**: class samples ``mu_k + e_kj`` (normalised, centred over
   ``j``) define a Gaussian with diagonal covariance; the loss is the closed-form upper bound of
   the expected cross-entropy (ProDA), ``logit'_k = logit_k + tau^2/2 * sum_d x_d^2 (S_yy + S_kk -
   2 S_yk)_d`` (:func:`gaussian_upper_bound`). ``group_gauss`` computes it group by group (pairs
   grouped by object), exactly and with one group's samples in memory at a time
   (:func:`grouped_upper_bound`). The same bound is applied to the primitive logits.
5. **Visual enhancement**: ``num_aug`` AugMix views per image, encoded by the image encoder; a
   cross-attention block (query the image, keys/values the views) adds a residual. Test views are
   **seeded per image** by default (``eval_views=seeded``: the same numbers every run);
   ``eval_views=random`` draws them afresh each evaluation, as the released code does.
6. **VLPD**: two MLPs map the image feature to a state and an object feature, scored against the
   primitive text features (the mean of the pair features sharing that primitive).
7. **Stochastic logit mixup**: ``(1 - lam) * comp + lam * (attr[a] + obj[o])`` with
   ``lam ~ Beta(1, 9)`` per training step and ``lam = E[lam] = 0.1`` at test.
8. Partial label smoothing (mass ``label_smoothing`` spread over the train pairs that share the
   target's attribute) and, optionally, the last ViT block trained (``tune_vit``).

Open world on large pair sets (C-GQA) scores column blocks of ``score_block`` pairs: the text side
is enhanced block by block (two passes: the primitive features are means over every pair first).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from czsl_bench.config import at_least
from czsl_bench.method import Method, RunContext, iter_column_blocks

from .soft_prompt import SoftPrompt, SoftPromptConfig, explain_scores, logit_scale, seen_pair_targets

NEG = -1e4  # the logit of a primitive that no pair of the current pair list has (fp16-safe)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass
class PLIDConfig(SoftPromptConfig):
    """PLID's settings (spec-baselines §4.1-4.2; docs/plid.md lists them per dataset)."""

    text_bank: str = "dataset"  # "dataset" = the dataset's descriptions.json, or a .json/.jsonl/.pkl bank
    fallback_sentence: str = "a photo of {attr} {obj}."  # for pairs without a usable sentence
    num_texts: int = at_least(1, 64)  # sentences per pair (fewer are repeated cyclically)
    attn_heads: int = at_least(0, 0)  # 0 = embed_dim // 64 (12 on ViT-L/14)
    attn_dropout: float = 0.5
    gauss: bool = True  # the distribution's upper bound on the composition logits
    gauss_prims: bool = True  # ... and on the primitive logits (use_attrobj_gauss)
    group_gauss: bool = False  # compute the bound object group by object group (C-GQA)
    gauss_group_size: int = at_least(1, 2048)  # object groups are packed into blocks of at most this many pairs
    num_aug: int = at_least(0, 8)  # AugMix views per image; 0 disables the visual enhancement
    aug_severity: int = at_least(1, 3)
    aug_width: int = at_least(1, 3)
    aug_alpha: float = 1.0
    eval_views: Literal["seeded", "random"] = "seeded"  # seeded per image, or the released random views
    view_seed: int = at_least(0, 0)  # seeds the test-time views (with each image's path)
    train_views: Literal["fresh", "fixed"] = "fresh"  # new views every epoch, or one seeded set per run
    vlpd: bool = True  # the primitive decomposition (two MLPs) and its losses
    mlp_dropout: float = 0.1
    w_attr: float = 0.1
    w_obj: float = 0.1
    fusion: bool = True  # stochastic logit mixup of composition and primitive logits
    fusion_alpha: float = 1.0  # lam ~ Beta(fusion_alpha, fusion_beta) in training, its mean at test
    fusion_beta: float = 9.0
    label_smoothing: float = 0.0  # partial: spread over the train pairs sharing the target's attribute
    tune_vit: bool = False  # train the last block of the image encoder

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{attr}" not in self.fallback_sentence or "{obj}" not in self.fallback_sentence:
            raise ValueError(f"fallback_sentence {self.fallback_sentence!r} must contain {{attr}} and {{obj}}")
        for name in ("attn_dropout", "mlp_dropout", "label_smoothing", "attr_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.fusion_alpha <= 0 or self.fusion_beta <= 0:
            raise ValueError(f"fusion_alpha and fusion_beta must be > 0, got {self.fusion_alpha}, {self.fusion_beta}")
        if self.aug_alpha <= 0:
            raise ValueError(f"aug_alpha must be > 0, got {self.aug_alpha}")

    @property
    def test_lambda(self) -> float:
        """E[lam] of Beta(alpha, beta): the mixing weight at test time (0.1 for Beta(1, 9))."""
        return self.fusion_alpha / (self.fusion_alpha + self.fusion_beta)

    @classmethod
    def defaults(cls, recipe: str) -> PLIDConfig:
        return cls(**plid_defaults(recipe))


# spec-baselines §4.2 (config/<ds>/fullmodel/train.yml); StepLR(epochs // 5, 0.5), validation every
# 2 epochs, Adam eps 1e-4 (fp16), context length 8 and AugMix views everywhere.
_COMMON: dict[str, Any] = dict(optimizer="adam", scheduler="step", step_size=0, gamma=0.5, val_every=2,
                               adam_eps=1e-4, context_length=8, num_aug=8, attr_dropout=0.3)
_PER_DATASET: dict[str, dict[str, Any]] = {
    "mit-states": dict(epochs=50, lr=5e-5, weight_decay=2e-5, batch_size=64, grad_accum=2, num_texts=64,
                       attn_dropout=0.5, tune_vit=False, label_smoothing=0.0, group_gauss=False,
                       w_attr=0.1, w_obj=0.1),
    "ut-zappos": dict(epochs=25, lr=1e-4, weight_decay=1e-5, batch_size=128, grad_accum=2, num_texts=32,
                      attn_dropout=0.1, tune_vit=True, label_smoothing=0.001, group_gauss=False,
                      w_attr=0.01, w_obj=0.01),
    "cgqa": dict(epochs=20, lr=1e-5, weight_decay=1e-5, batch_size=64, grad_accum=2, num_texts=64,
                 attn_dropout=0.1, tune_vit=True, label_smoothing=0.01, group_gauss=True,
                 w_attr=0.01, w_obj=0.01),
}
# The embedded world (128-d tiny CLIP, 2 CPU cores; docs/plid.md): CSP's embedded schedule (12
# epochs of 512 with Adam, no scheduler) with lr chosen on synthetic validation AUC (seed 0) over
# {1e-2, 3e-3, 1e-3, 3e-4}; 4 views fixed per training image (encoding fresh AugMix views every
# epoch is the whole cost on a CPU), the world's 3 sentences per pair, the image encoder frozen as
# on MIT-States.
_EMBEDDED: dict[str, Any] = dict(epochs=12, batch_size=512, grad_accum=1, lr=1e-3, weight_decay=1e-5,
                                 optimizer="adam", scheduler="none", val_every=2, context_length=8,
                                 attr_dropout=0.3, num_texts=3, num_aug=4, train_views="fixed",
                                 attn_dropout=0.1, tune_vit=False, label_smoothing=0.0, w_attr=0.1, w_obj=0.1)


def plid_defaults(recipe: str) -> dict[str, Any]:
    if recipe == "synthetic":
        return dict(_EMBEDDED)
    return {**_COMMON, **_PER_DATASET[recipe]}


# ---------------------------------------------------------------------------------------------
# The loss pieces (pure functions; tests/test_plid.py checks them by hand)
# ---------------------------------------------------------------------------------------------
def centred_samples(mean: Tensor, sentences: Tensor) -> Tensor:
    """``[S, K, D]`` centred class samples: ``normalize(mean_k + e_kj)`` minus their mean over ``j``.

    ``mean`` is ``[K, D]``, ``sentences`` ``[K, S, D]``."""
    samples = F.normalize(mean[:, None, :] + sentences, dim=-1)
    return (samples - samples.mean(dim=1, keepdim=True)).transpose(0, 1)


def gaussian_upper_bound(logits: Tensor, image: Tensor, samples: Tensor, target: Tensor, scale: float) -> Tensor:
    """The logits whose cross-entropy upper-bounds the expected CE under the class Gaussians.

    With ``t_k ~ N(mu_k, Sigma)`` (diagonal per class pair, estimated from the centred samples
    ``samples[s, k]``), ``logit_k = scale * x . t_k`` and label ``y``,
    ``E[CE] <= CE(logit + scale^2 / 2 * Var[x . (t_k - t_y)])`` (the Gaussian moment generating
    function with Jensen), and ``Var[x . (t_k - t_y)] = sum_d x_d^2 (S_yy + S_kk - 2 S_yk)_d`` with
    ``S_kl = mean_s z_sk * z_sl`` (element-wise). ``logits`` ``[B, K]``, ``image`` ``[B, D]``,
    ``samples`` ``[S, K, D]``, ``target`` ``[B]``."""
    return logits + 0.5 * scale ** 2 * _bound_terms(image, samples, samples[:, target])


def _bound_terms(image: Tensor, cols: Tensor, rows: Tensor) -> Tensor:
    """``[B, C]``: ``mean_s sum_d x_bd^2 (z_s,y_b,d - z_s,c,d)^2`` for samples ``cols`` ``[S, C, D]``
    and the samples of each image's label ``rows`` ``[S, B, D]``."""
    x2 = image.pow(2)
    n = cols.shape[0]
    yy = (x2[None] * rows.pow(2)).sum(-1).mean(0)  # [B]
    kk = x2 @ cols.pow(2).mean(0).t()  # [B, C]
    yk = torch.einsum("sbd,scd->bc", x2[None] * rows, cols) / n
    return yy[:, None] + kk - 2 * yk


def grouped_upper_bound(logits: Tensor, image: Tensor, mean: Tensor, sentences: Tensor, target: Tensor,
                        scale: float, groups: Sequence[Tensor]) -> Tensor:
    """:func:`gaussian_upper_bound` computed over column ``groups`` (index tensors that partition
    the classes): one group's samples exist at a time, and in training each group is recomputed
    in backward (checkpointed), so the memory is that of the largest group, not of all classes.
    The result equals the full computation (tests/test_plid.py)."""
    rows = centred_samples(mean[target], sentences[target])  # [S, B, D]: the labels' samples
    grad = torch.is_grad_enabled() and (mean.requires_grad or image.requires_grad)

    def block(idx: Tensor, img: Tensor, m: Tensor, r: Tensor) -> Tensor:
        return _bound_terms(img, centred_samples(m[idx], sentences[idx]), r)

    parts = []
    for idx in groups:
        if grad:
            term = torch.utils.checkpoint.checkpoint(block, idx, image, mean, rows, use_reentrant=False)
        else:
            term = block(idx, image, mean, rows)
        parts.append((idx, term))
    order = torch.cat([i for i, _ in parts]).to(logits.device)
    terms = torch.cat([t for _, t in parts], dim=1)
    out = torch.empty_like(terms).index_copy(1, order, terms)  # back to class order
    return logits + 0.5 * scale ** 2 * out


def object_groups(pair_obj: Tensor, max_size: int) -> list[Tensor]:
    """Pairs grouped by object, whole object groups packed in order into blocks of at most
    ``max_size`` pairs (a larger object group is its own block)."""
    order = torch.argsort(pair_obj, stable=True)
    counts = torch.bincount(pair_obj, minlength=int(pair_obj.max()) + 1 if len(pair_obj) else 0)
    blocks, current, size, start = [], [], 0, 0
    for c in counts.tolist():
        if c == 0:
            continue
        if current and size + c > max_size:
            blocks.append(torch.cat(current))
            current, size = [], 0
        current.append(order[start:start + c])
        size += c
        start += c
    if current:
        blocks.append(torch.cat(current))
    return blocks


def sample_lambda(alpha: float, beta: float) -> float:
    """One mixing weight ``lam ~ Beta(alpha, beta)``, from the global torch RNG (which the
    Trainer seeds per run), as a ratio of two Gamma draws."""
    a = torch._standard_gamma(torch.tensor([float(alpha)], dtype=torch.float64))
    b = torch._standard_gamma(torch.tensor([float(beta)], dtype=torch.float64))
    return float(a / (a + b))


def partial_smoothing_targets(target: Tensor, pair_attr: Tensor, mass: float) -> Tensor:
    """``[B, K]`` target distributions: ``1 - mass`` on the label, ``mass`` spread evenly over the
    other pairs sharing its attribute (all on the label when it has none)."""
    same = pair_attr[target][:, None] == pair_attr[None, :]  # [B, K]
    same[torch.arange(len(target)), target] = False
    n = same.sum(1, keepdim=True)
    spread = torch.where(n > 0, mass / n.clamp(min=1), torch.zeros_like(n, dtype=torch.float32))
    q = same.float() * spread
    q[torch.arange(len(target)), target] = torch.where(n[:, 0] > 0, 1.0 - mass, 1.0)
    return q


def soft_cross_entropy(logits: Tensor, q: Tensor) -> Tensor:
    return -(q * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def primitive_means(values: Tensor, index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` rows per primitive ``index`` (``[n, ...]``) and which of the ``n``
    primitives occur at all."""
    counts = torch.bincount(index, minlength=n).to(values.dtype)
    sums = torch.zeros((n,) + values.shape[1:], dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, values)
    shape = (n,) + (1,) * (values.dim() - 1)
    return sums / counts.clamp(min=1).view(shape), counts > 0


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossAttention(nn.Module):
    """PLID's cross-attention block: ``q + attn(LN(q), LN(kv))``, then ``+ MLP(LN(.))`` (4x,
    QuickGELU, dropout). Parameters: ``12 d^2 + 15 d`` (docs/plid.md)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), QuickGELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """``query`` ``[B, D]``, ``keys`` ``[B, N, D]`` -> ``[B, D]``."""
        x = query[:, None, :]
        kv = self.ln_kv(keys)
        x = x + self.attn(self.ln_q(x), kv, kv, need_weights=False)[0]
        x = x + self.mlp(self.ln_mlp(x))
        return x[:, 0]


def mlp(dim: int, dropout: float) -> nn.Sequential:
    """VLPD's decomposition MLP ``d -> 4d -> d`` (QuickGELU, dropout)."""
    return nn.Sequential(nn.Linear(dim, 4 * dim), QuickGELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))


class PLIDModel(nn.Module):
    """The trainable parts: soft prompt, text and image enhancement, VLPD MLPs, last ViT block."""

    def __init__(self, backbone, attrs: Sequence[str], objs: Sequence[str], cfg: PLIDConfig,
                 device: torch.device, clean: Callable[[str], str]):
        super().__init__()
        dim = backbone.embed_dim
        heads = cfg.attn_heads or max(1, dim // 64)
        self.prompt = SoftPrompt(backbone, attrs, objs, device, learn_context=True, learn_vocab=True,
                                 vocab_dropout=cfg.attr_dropout, context_length=cfg.context_length, clean=clean)
        self.text_attn = CrossAttention(dim, heads, cfg.attn_dropout)
        self.image_attn = CrossAttention(dim, heads, cfg.attn_dropout) if cfg.num_aug > 0 else None
        self.attr_mlp = mlp(dim, cfg.mlp_dropout) if cfg.vlpd else None
        self.obj_mlp = mlp(dim, cfg.mlp_dropout) if cfg.vlpd else None
        self.vit_block = None
        if cfg.tune_vit:
            self.vit_block = copy.deepcopy(backbone.visual.transformer.resblocks[-1])
            self.vit_block.requires_grad_(True)
        self.to(device)

    def enhance_text(self, base: Tensor, sentences: Tensor) -> Tensor:
        """``mu`` ``[P, D]`` (normalised) from prompt features ``[P, D]`` and sentences ``[P, N, D]``."""
        return F.normalize(self.text_attn(base, sentences), dim=-1)

    def enhance_image(self, image: Tensor, views: Tensor | None) -> Tensor:
        image = F.normalize(image, dim=-1)
        if self.image_attn is None or views is None:
            return image
        return F.normalize(self.image_attn(image, F.normalize(views, dim=-1)), dim=-1)


# ---------------------------------------------------------------------------------------------
# Image views
# ---------------------------------------------------------------------------------------------
def view_transform(backbone, cfg: PLIDConfig):
    """PLID's AugMix views: random resized crop and flip, AugMix, then CLIP's normalisation."""
    from torchvision import transforms as T

    pp = backbone.preprocess_cfg
    size = pp.get("size", backbone.image_size)
    size = size if isinstance(size, int) else tuple(size)
    return T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.AugMix(severity=cfg.aug_severity, mixture_width=cfg.aug_width, alpha=cfg.aug_alpha),
        T.ToTensor(),
        T.Normalize(pp.get("mean"), pp.get("std")),
    ])


def image_view_seed(seed: int, image: str, view: int) -> int:
    """The seed of view ``view`` of ``image``: a function of the view seed and the image's
    relative path only (not of batch order or which images came before)."""
    digest = hashlib.sha256(f"{int(seed)}\t{image}\t{int(view)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ViewImages(torch.utils.data.Dataset):
    """Item ``i``: ``(original [3, H, W] or an empty tensor, views [M, 3, H, W], i)``.

    ``seed`` set: view ``j`` of image ``i`` is drawn under :func:`image_view_seed` (the same
    pixels every time); ``None``: from the global torch RNG (seeded per epoch by the Trainer)."""

    def __init__(self, split, n_views: int, views, original=None, seed: int | None = None):
        self.split, self.n_views, self.views, self.original, self.seed = split, n_views, views, original, seed

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, i: int):
        from czsl_bench.datasets.czsl_format import decode_image

        img = decode_image(self.split.image_path(i))
        orig = self.original(img) if self.original is not None else torch.empty(0)
        out = []
        for j in range(self.n_views):
            if self.seed is None:
                out.append(self.views(img))
            else:
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed would also queue a CUDA seeding per call
                    torch.random.default_generator.manual_seed(image_view_seed(self.seed, self.split.images[i], j))
                    out.append(self.views(img))
        return orig, torch.stack(out) if out else torch.empty(0), i


class _FeatureItems(torch.utils.data.Dataset):
    """Training items on the frozen-encoder path: cached feature, view features or images, target."""

    def __init__(self, feats: Tensor, targets: Tensor, views: Tensor | None = None,
                 view_images: ViewImages | None = None):
        self.feats, self.targets, self.views, self.view_images = feats, targets, views, view_images

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if self.view_images is not None:
            views = self.view_images[i][1]
        elif self.views is not None:
            views = self.views[i]
        else:
            views = torch.empty(0)
        return self.feats[i], views, self.targets[i]


class _ImageItems(torch.utils.data.Dataset):
    """Training items when the last ViT block is tuned: image, view images, target."""

    def __init__(self, images: ViewImages, targets: Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        orig, views, _ = self.images[i]
        return orig, views, self.targets[i]


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
@dataclass
class _PairText:
    """Sentence features of a pair list: a table of unique sentences and ``[P, N]`` indices."""

    table: Tensor  # [U, D] normalised
    index: Tensor  # [P, N] long
    fallback: int

    def sentences(self, start: int = 0, stop: int | None = None) -> Tensor:
        return self.table[self.index[start:stop]]


class PLID(Method):
    name = "plid"
    Config = PLIDConfig

    # -- identity and bank --------------------------------------------------------------------
    @classmethod
    def identity_inputs(cls, config: PLIDConfig, dataset: Any) -> dict[str, Any]:
        from czsl_bench.text_bank import bank_digest

        return {"text_bank": bank_digest(_load_bank(config.text_bank, dataset))}

    @property
    def frozen_image_encoder(self) -> bool:  # type: ignore[override]
        return not self.config.tune_vit

    def prepare(self, ctx: RunContext) -> None:
        cfg = self.config
        ds = ctx.dataset
        self.bank = _load_bank(cfg.text_bank, ds)
        self.model = PLIDModel(ctx.backbone, ds.attrs, ds.objs, cfg, ctx.device, ctx.clean_name)
        self.model.eval()
        self.scale = logit_scale(ctx.backbone)
        self._ctx = ctx
        train = ctx.split("train", "closed")
        self.seen_attr, self.seen_obj, self.train_targets = seen_pair_targets(ctx, train)
        self._train_split = train
        self._texts: dict[tuple, _PairText] = {}
        self._views: dict[tuple, Tensor] = {}
        self._info: dict[str, Any] = {"text_bank": self.bank.describe(), "fallback_pairs": {},
                                      "eval_views": cfg.eval_views if cfg.num_aug else "none",
                                      "test_lambda": cfg.test_lambda if cfg.fusion else 0.0}
        seen_pairs = [p for p, is_seen in zip(train.pairs, train.seen_mask.tolist()) if is_seen]
        self.train_text = self.pair_text(ctx, seen_pairs, "train")
        self._groups = object_groups(self.seen_obj.cpu(), cfg.gauss_group_size) if cfg.group_gauss else None
        self._train_prims = self._primitive_sentences(self.train_text.sentences(), self.seen_attr, self.seen_obj, ds)

    def modules(self) -> list[nn.Module]:
        return [self.model] if hasattr(self, "model") else []

    def record_info(self) -> dict[str, Any]:
        return copy.deepcopy(self._info)

    # -- text ---------------------------------------------------------------------------------
    def pair_text(self, ctx: RunContext, pairs: Sequence[tuple[str, str]], label: str) -> _PairText:
        """Cleaned, fallback-completed sentences of ``pairs``, encoded once (frozen text encoder,
        content-hashed cache)."""
        from czsl_bench.features import cached_text_features
        from czsl_bench.text_bank import clean_pair_texts

        cfg = self.config
        resolved = clean_pair_texts(self.bank, pairs, cfg.fallback_sentence, ctx.clean_name)
        table: dict[str, int] = {}
        rows = []
        for group in resolved.texts:
            ids = [table.setdefault(t, len(table)) for t in group]
            rows.append([ids[j % len(ids)] for j in range(cfg.num_texts)])
        feats = cached_text_features(ctx.backbone, ctx.cache, list(table), cfg.text_batch_size)
        self._info["fallback_pairs"][label] = {"pairs": len(pairs), "fallback": resolved.n_fallback}
        return _PairText(F.normalize(feats.float(), dim=-1).to(ctx.device),
                         torch.tensor(rows, dtype=torch.long, device=ctx.device).view(len(pairs), cfg.num_texts),
                         resolved.n_fallback)

    def _world_text(self, ctx: RunContext, split) -> _PairText:
        key = (split.world, len(split.pairs))
        if key not in self._texts:
            self._texts[key] = self.pair_text(ctx, list(split.pairs), split.world)
        return self._texts[key]

    @staticmethod
    def _primitive_sentences(sentences: Tensor, pair_attr: Tensor, pair_obj: Tensor, ds) -> tuple[Tensor, Tensor]:
        """Primitive-level sentence features: the mean over the pairs sharing the primitive."""
        ea, _ = primitive_means(sentences, pair_attr, len(ds.attrs))
        eo, _ = primitive_means(sentences, pair_obj, len(ds.objs))
        return ea, eo

    def _text_means(self, pair_attr: Tensor, pair_obj: Tensor, sentences: Tensor) -> Tensor:
        base = self.model.prompt(pair_attr, pair_obj)
        return self.model.enhance_text(base, sentences)

    # -- images -------------------------------------------------------------------------------
    def _encode(self, ctx: RunContext, images: Tensor) -> Tensor:
        """Image features through the backbone, the last block swapped for the tuned copy."""
        bb = ctx.backbone
        with self._tuned_block(bb), bb.autocast():
            return bb.encode_image(images).float()

    @contextmanager
    def _tuned_block(self, bb):
        block = self.model.vit_block
        if block is None:
            yield
            return
        blocks = bb.visual.transformer.resblocks
        original = blocks[len(blocks) - 1]
        blocks[len(blocks) - 1] = block
        try:
            yield
        finally:
            blocks[len(blocks) - 1] = original

    def _encode_views(self, ctx: RunContext, views: Tensor) -> Tensor:
        """``[B, M, 3, H, W]`` -> ``[B, M, D]``."""
        b, m = views.shape[:2]
        return self._encode(ctx, views.flatten(0, 1).to(ctx.device)).view(b, m, -1)

    def _view_dataset(self, ctx: RunContext, split, seed: int | None, original: bool) -> ViewImages:
        bb = ctx.backbone
        orig = bb.preprocess_eval if original else None
        return ViewImages(split, self.config.num_aug, view_transform(bb, self.config), orig, seed)

    @torch.no_grad()
    def _frozen_view_features(self, ctx: RunContext, split, seed: int | None) -> Tensor:
        """``[N, M, D]`` view features of a split by the frozen encoder; cached when seeded."""
        from torch.utils.data import DataLoader

        cfg = self.config

        def compute() -> dict[str, Tensor]:
            loader = DataLoader(self._view_dataset(ctx, split, seed, False), batch_size=max(1, ctx.eval_batch_size // max(1, cfg.num_aug)),
                                shuffle=False, num_workers=ctx.num_workers)
            out = []
            with ctx.progress.task(f"plid: {split.name} views", total=len(loader)) as task:
                for _, views, _ in loader:
                    out.append(self._encode_views(ctx, views).cpu())
                    task.advance()
            return {"features": torch.cat(out)}

        if seed is None or ctx.cache is None:
            return compute()["features"]
        from czsl_bench.features import image_list_hash

        bb = ctx.backbone
        parts = {"kind": "plid_view_features", "arch": bb.arch, "weights": bb.weights_hash,
                 "precision": bb.precision, "preprocess": bb.describe_preprocess(),
                 "images": image_list_hash(split.root, split.images, getattr(split, "image_path", None)),
                 "n": len(split.images),
                 "views": cfg.num_aug, "seed": int(seed), "augmix": [cfg.aug_severity, cfg.aug_width, cfg.aug_alpha],
                 "transform": "RandomResizedCrop-bicubic/HFlip/AugMix/1"}
        return ctx.cache.get_or_compute(parts, compute, meta={"arch": bb.arch, "split": split.name})["features"]

    # -- training -------------------------------------------------------------------------------
    def train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        cfg = self.config
        split = self._train_split
        if cfg.tune_vit:
            return _ImageItems(ViewImages(split, cfg.num_aug, view_transform(ctx.backbone, cfg),
                                          ctx.backbone.preprocess_train, None), self.train_targets)
        feats = ctx.image_features(split)
        if cfg.num_aug == 0:
            return _FeatureItems(feats, self.train_targets)
        if cfg.train_views == "fixed":
            with torch.random.fork_rng(devices=[]):
                views = self._frozen_view_features(ctx, split, seed=1_000_003 * (ctx.seed + 1))
            return _FeatureItems(feats, self.train_targets, views=views)
        return _FeatureItems(feats, self.train_targets,
                             view_images=ViewImages(split, cfg.num_aug, view_transform(ctx.backbone, cfg)))

    def _train_images(self, ctx: RunContext, first: Tensor, views: Tensor) -> Tensor:
        cfg = self.config
        if cfg.tune_vit:
            image = self._encode(ctx, first)
            v = self._encode_views(ctx, views) if cfg.num_aug else None
        else:
            image = first
            if cfg.num_aug and views.dim() == 5:  # fresh view images, frozen encoder
                with torch.no_grad():
                    v = self._encode_views(ctx, views)
            else:
                v = views if cfg.num_aug else None
        return self.model.enhance_image(image.float(), None if v is None else v.float())

    def training_step(self, ctx: RunContext, batch) -> Tensor:
        cfg = self.config
        first, views, target = batch
        image = self._train_images(ctx, first, views)
        sentences = self.train_text.sentences()
        mu = self._text_means(self.seen_attr, self.seen_obj, sentences)
        comp = self.scale * image @ mu.t()
        if cfg.gauss:
            if self._groups is not None:
                comp = grouped_upper_bound(comp, image, mu, sentences, target, self.scale, self._groups)
            else:
                comp = gaussian_upper_bound(comp, image, centred_samples(mu, sentences), target, self.scale)
        y_attr, y_obj = self.seen_attr[target], self.seen_obj[target]
        loss_prims = 0.0
        logits = comp
        if cfg.vlpd:
            attr, obj = self._primitive_logits(image, mu, self.seen_attr, self.seen_obj, self._train_prims,
                                               (y_attr, y_obj) if cfg.gauss_prims else None)
            loss_prims = cfg.w_attr * F.cross_entropy(attr, y_attr) + cfg.w_obj * F.cross_entropy(obj, y_obj)
            if cfg.fusion:
                lam = sample_lambda(cfg.fusion_alpha, cfg.fusion_beta)
                logits = (1 - lam) * comp + lam * (attr[:, self.seen_attr] + obj[:, self.seen_obj])
        if cfg.label_smoothing > 0:
            loss = soft_cross_entropy(logits, partial_smoothing_targets(target, self.seen_attr, cfg.label_smoothing))
        else:
            loss = F.cross_entropy(logits.float(), target)
        return loss + loss_prims

    def _primitive_logits(self, image: Tensor, mu: Tensor | None, pair_attr: Tensor | None, pair_obj: Tensor | None,
                          prim_sentences: tuple[Tensor, Tensor], targets: tuple[Tensor, Tensor] | None,
                          prim_means: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``[B, |A|]`` and ``[B, |O|]`` VLPD logits (bounded when ``targets`` are given); a primitive
        that no pair of the list has gets :data:`NEG`."""
        ds = self._ctx.dataset
        if prim_means is None:
            ma, has_a = primitive_means(mu, pair_attr, len(ds.attrs))
            mo, has_o = primitive_means(mu, pair_obj, len(ds.objs))
        else:
            ma, has_a, mo, has_o = prim_means
        ma, mo = F.normalize(ma, dim=-1), F.normalize(mo, dim=-1)
        fa = F.normalize(self.model.attr_mlp(image), dim=-1)
        fo = F.normalize(self.model.obj_mlp(image), dim=-1)
        attr = self.scale * fa @ ma.t()
        obj = self.scale * fo @ mo.t()
        if targets is not None:
            attr = gaussian_upper_bound(attr, fa, centred_samples(ma, prim_sentences[0]), targets[0], self.scale)
            obj = gaussian_upper_bound(obj, fo, centred_samples(mo, prim_sentences[1]), targets[1], self.scale)
        attr = attr.masked_fill(~has_a[None], NEG)
        obj = obj.masked_fill(~has_o[None], NEG)
        return attr, obj

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, ctx: RunContext, split) -> Tensor:
        """``[N, D]`` enhanced, normalised image features of a split (eval mode)."""
        from torch.utils.data import DataLoader

        cfg = self.config
        self.model.eval()
        seed = cfg.view_seed if cfg.eval_views == "seeded" else None
        if not cfg.tune_vit:
            feats = ctx.image_features(split).to(ctx.device)
            views = None
            if cfg.num_aug:
                views = self._frozen_view_features(ctx, split, seed).to(ctx.device)
            out = []
            for i in range(0, len(feats), ctx.eval_batch_size):
                v = None if views is None else views[i:i + ctx.eval_batch_size]
                out.append(self.model.enhance_image(feats[i:i + ctx.eval_batch_size], v))
            return torch.cat(out) if out else feats
        loader = DataLoader(self._view_dataset(ctx, split, seed, True), batch_size=max(1, ctx.eval_batch_size // (1 + cfg.num_aug)),
                            shuffle=False, num_workers=ctx.num_workers)
        out = []
        with ctx.progress.task(f"plid: encode {split.name}", total=len(loader)) as task:
            for orig, views, _ in loader:
                image = self._encode(ctx, orig.to(ctx.device))
                v = self._encode_views(ctx, views) if cfg.num_aug else None
                out.append(self.model.enhance_image(image, v))
                task.advance()
        return torch.cat(out)

    @torch.no_grad()
    def _means(self, ctx: RunContext, split, text: _PairText, start: int, stop: int) -> Tensor:
        attr = split.pair_attr[start:stop].to(ctx.device)
        obj = split.pair_obj[start:stop].to(ctx.device)
        bs = self.config.text_batch_size
        return torch.cat([self._text_means(attr[i:i + bs], obj[i:i + bs], text.sentences(start + i, min(stop, start + i + bs)))
                          for i in range(0, stop - start, bs)])

    @torch.no_grad()
    def score(self, ctx: RunContext, split):
        cfg = self.config
        self.model.eval()
        image = self.image_features(ctx, split)
        text = self._world_text(ctx, split)
        n_pairs = len(split.pairs)
        pa, po = split.pair_attr.to(ctx.device), split.pair_obj.to(ctx.device)
        lam = cfg.test_lambda if (cfg.vlpd and cfg.fusion) else 0.0
        if n_pairs <= cfg.score_block:
            mu = self._means(ctx, split, text, 0, n_pairs)
            comp = self.scale * image @ mu.t()
            if lam == 0.0:
                return comp.float().cpu()
            attr, obj = self._primitive_logits(image, mu, pa, po, (None, None), None)
            return ((1 - lam) * comp + lam * (attr[:, pa] + obj[:, po])).float().cpu()
        return self._blocks(ctx, split, image, text, lam)

    def _blocks(self, ctx, split, image, text, lam) -> Iterator[tuple[int, Tensor]]:
        """Two passes over column blocks: the primitive means over every pair, then the scores."""
        cfg = self.config
        ds = ctx.dataset
        n_pairs = len(split.pairs)
        prims = None
        if lam:
            d = image.shape[1]
            sa = torch.zeros(len(ds.attrs), d, device=ctx.device)
            so = torch.zeros(len(ds.objs), d, device=ctx.device)
            na = torch.zeros(len(ds.attrs), device=ctx.device)
            no = torch.zeros(len(ds.objs), device=ctx.device)
            for start, stop in iter_column_blocks(n_pairs, cfg.score_block):
                with torch.no_grad():
                    mu = self._means(ctx, split, text, start, stop)
                pa = split.pair_attr[start:stop].to(ctx.device)
                po = split.pair_obj[start:stop].to(ctx.device)
                sa.index_add_(0, pa, mu)
                so.index_add_(0, po, mu)
                na.index_add_(0, pa, torch.ones_like(pa, dtype=na.dtype))
                no.index_add_(0, po, torch.ones_like(po, dtype=no.dtype))
            prims = (sa / na.clamp(min=1)[:, None], na > 0, so / no.clamp(min=1)[:, None], no > 0)
            with torch.no_grad():
                attr, obj = self._primitive_logits(image, None, None, None, (None, None), None, prim_means=prims)
        for start, stop in iter_column_blocks(n_pairs, cfg.score_block):
            with torch.no_grad():
                mu = self._means(ctx, split, text, start, stop)
                comp = self.scale * image @ mu.t()
                if prims is not None:
                    pa = split.pair_attr[start:stop].to(ctx.device)
                    po = split.pair_obj[start:stop].to(ctx.device)
                    comp = (1 - lam) * comp + lam * (attr[:, pa] + obj[:, po])
            yield start, comp.float().cpu()

    def explain(self, ctx: RunContext, split, index: int, top: int = 5) -> dict:
        return explain_scores(self.score(ctx, split), split, index, top)

    @classmethod
    def ablations(cls) -> dict[str, dict]:
        return {
            "no-gauss": {"gauss": False, "gauss_prims": False},  # plain CE: no language-informed distribution
            "no-vlpd": {"vlpd": False},  # no primitive decomposition (and so no logit mixup)
            "no-fusion": {"fusion": False},  # VLPD losses kept, composition logits alone
            "no-views": {"num_aug": 0},  # no visual enhancement
        }


def _load_bank(source: str, dataset: Any):
    from czsl_bench.text_bank import bank_for

    return bank_for(source, dataset, "pass --set text_bank=PATH (a bank from `czsl-bench text generate`)")
