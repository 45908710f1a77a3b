"""The Troika-style three-path model shared by Troika, ClusPro and the ClusPro base.

Three recognition branches over one adapted CLIP (docs/cluspro.md-§1.3, §6):

* **composition**: image feature ``f`` (adapted CLS token) against prompts
  ``[SOT] <prefix_c> <attr> <obj> [EOT]``;
* **attribute** / **object**: a primitive disentangler ``h^a(f)`` / ``h^o(f)`` against prompts
  ``[SOT] <prefix_a> <attr> [EOT]`` / ``[SOT] <prefix_o> <obj> [EOT]``.

Learnable parts: three independent 3-token prompt prefixes (initialised from "a photo of"), one
primitive vocabulary (|A| + |O| rows, each the mean CLIP token embedding of the name) with
vocabulary dropout, parallel bottleneck adapters on every ViT block (added through the backbone),
and the disentanglers: one Linear-BN-ReLU-Dropout(0.5) stage per primitive (Troika) or two stacked
stages (ClusPro, whose clustering reads the stage-1 output). Troika additionally has Cross-Modal
Traction (:class:`CrossModalTraction`), which makes the text features image-dependent.

Inference score (spec §1.3): ``s_c(x, (i, j)) + softmax(s_a)_i * softmax(s_o)_j`` where ``s_c`` is
the *raw* scaled composition logit, as the released code does (the paper writes p(c|x)).

The model talks to the backbone only through the contract of ``czsl_bench.backbone``
(``docs/architecture.md``): ``tokenize``, ``token_embedding``, ``encode_text_embeddings``,
``encode_image_tokens``, ``add_adapters`` and the frozen ``logit_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from czsl_bench.names import clean_name

PROMPT_INIT = "a photo of"
CONTEXT_LENGTH = 8


@dataclass(frozen=True)
class ThreePathSpec:
    """Architecture settings of the three-path model (the method configs carry these fields)."""

    n_ctx: int = 3  # prompt-prefix length: the tokens of "a photo of"
    context_length: int = CONTEXT_LENGTH
    vocab_dropout: float = 0.3  # nn.Dropout on the whole vocabulary matrix (0 on C-GQA)
    disentangler_stages: int = 2  # 1 = Troika, VP-CMJL; 2 = ClusPro; 0 = none (CAMS)
    disentangler_dropout: float = 0.5
    adapter_dim: int = 64
    adapter_dropout: float = 0.1
    adapter_scale: float = 0.1
    adapter_blocks: int = 0  # 0 = every ViT block; M > 0 = only the last M (CAMS)
    prim_template: str = "a photo of x"  # primitive prompt; its row goes at EOT-1 (docs/vpcmjl.md)
    attr_row: bool = True  # False: attribute prompts carry no attribute row (CAMS's code, docs/cams.md)
    cmt_layers: int = 0  # > 0 enables Troika's cross-modal traction
    cmt_dropout: float = 0.0
    cmt_init_lambda: float = 0.1


class Disentangler(nn.Module):
    """One primitive-adapter stage: Linear(D, D) -> BatchNorm1d -> ReLU -> Dropout(p)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(F.relu(self.norm(self.linear(x))))

    def forward_frozen_stats(self, x: Tensor) -> Tensor:
        """The stage with running BatchNorm statistics and no dropout, leaving the running
        statistics untouched but still differentiable in the stage's weights. The ``paper``
        variant pushes prototypes through stage 2 this way (spec §8.1)."""
        y = F.batch_norm(self.linear(x), self.norm.running_mean, self.norm.running_var,
                         self.norm.weight, self.norm.bias, training=False, eps=self.norm.eps)
        return F.relu(y)


class _TractionLayer(nn.Module):
    """One CMT layer: ``q += proj(MHA(q, P, P))``; ``q += drop(MLP(LN(q)))`` (no LN before the
    attention; q/k/v without bias, output projection with bias; QuickGELU MLP 4x)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, q: Tensor, tokens: Tensor) -> Tensor:
        b, n, d = q.shape
        attn = F.scaled_dot_product_attention(
            self._split(self.q(q)), self._split(self.k(tokens)), self._split(self.v(tokens))
        )
        q = q + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, n, d)))
        h = self.fc(self.norm(q))
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as in CLIP
        return q + self.dropout(self.out(h))


class CrossModalTraction(nn.Module):
    """Troika's CMT (spec §6): text features of a branch attend to the image's output tokens.

    ``forward(text [N, D], tokens [B, T, D], branch)`` returns image-dependent, L2-normalised text
    features ``[B, N, D]``: ``t' = normalize(t + lambda * q)`` with ``q`` the text features after
    the traction layers. The tokens are layer-normalised ``branch + 1`` times (Troika re-applies
    one LayerNorm cumulatively inside its branch loop; kept for fidelity).
    """

    def __init__(self, dim: int, layers: int, dropout: float, init_lambda: float):
        super().__init__()
        heads = max(1, dim // 64)
        while dim % heads:
            heads -= 1
        self.patch_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([_TractionLayer(dim, heads, dropout) for _ in range(layers)])
        self.lamda = nn.Parameter(torch.full((dim,), float(init_lambda)))

    def forward(self, text: Tensor, tokens: Tensor, branch: int) -> Tensor:
        for _ in range(branch + 1):
            tokens = self.patch_norm(tokens)
        q = text.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, tokens)
        return F.normalize(text.unsqueeze(0) + self.lamda * q, dim=-1)


@dataclass
class BranchFeatures:
    """Image-side outputs of one forward pass."""

    image: Tensor  # f: adapted CLS feature [B, D]
    tokens: Tensor | None  # [B, 1 + L, D] output tokens (CLS first), only kept when CMT is on
    attr_stage1: Tensor  # h1^a(f) [B, D] (ClusPro clusters these)
    obj_stage1: Tensor
    attr: Tensor  # final attribute-branch feature [B, D]
    obj: Tensor


class ThreePathModel(nn.Module):
    """Prompts, vocabulary, disentanglers and (optionally) CMT over a backbone with adapters.

    The backbone is *not* a sub-module (its frozen weights stay out of this module's
    ``state_dict``); the adapters it creates are registered here as ``adapters`` so they are saved,
    counted and trained with the rest.
    """

    def __init__(self, backbone: Any, attrs: Sequence[str], objs: Sequence[str],
                 spec: ThreePathSpec = ThreePathSpec(), *, add_adapters: bool = True,
                 clean: Callable[[str], str] = clean_name):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)
        self.spec = spec
        self.n_attrs, self.n_objs = len(attrs), len(objs)
        if add_adapters and spec.adapter_dim > 0:
            blocks = None
            if spec.adapter_blocks:
                n_blocks = backbone.vision_layers
                if not 0 < spec.adapter_blocks <= n_blocks:
                    raise ValueError(f"adapter_blocks {spec.adapter_blocks} is out of range: {backbone.arch} "
                                     f"has {n_blocks} visual blocks (0 = all)")
                blocks = range(n_blocks - spec.adapter_blocks, n_blocks)
            backbone.add_adapters(bottleneck=spec.adapter_dim, dropout=spec.adapter_dropout,
                                  scale=spec.adapter_scale, blocks=blocks)
        # the backbone owns the adapter modules (its block loop calls them); registering the same
        # ModuleList here puts them in this model's parameters, state_dict and train/eval switch
        self.adapters = backbone.adapters if len(getattr(backbone, "adapters", ())) else None

        with torch.no_grad():
            init_ids = self._tokenize([PROMPT_INIT])
            init_emb = backbone.token_embedding(init_ids)[0, 1 : 1 + spec.n_ctx].float()
            self.prefix = nn.Parameter(init_emb.unsqueeze(0).repeat(3, 1, 1).clone())  # comp/attr/obj
            names = [clean(n) for n in list(attrs) + list(objs)]
            self.vocabulary = nn.Parameter(self._mean_name_embeddings(names))
            comp_ids = self._tokenize(["a photo of x x"])
            prim_ids = self._tokenize([spec.prim_template])
        self.register_buffer("comp_ids", comp_ids, persistent=False)
        self.register_buffer("prim_ids", prim_ids, persistent=False)
        self.register_buffer("comp_template", backbone.token_embedding(comp_ids).detach().float(),
                             persistent=False)
        self.register_buffer("prim_template", backbone.token_embedding(prim_ids).detach().float(),
                             persistent=False)
        self.comp_eot = int(backbone.eot_index(comp_ids)[0])
        self.prim_eot = int(backbone.eot_index(prim_ids)[0])
        self.vocab_dropout = nn.Dropout(spec.vocab_dropout)

        dim = int(backbone.embed_dim)
        if spec.disentangler_stages not in (0, 1, 2):
            raise ValueError(f"disentangler_stages must be 0, 1 or 2, got {spec.disentangler_stages}")
        if spec.disentangler_stages >= 1:
            self.attr_dis = Disentangler(dim, spec.disentangler_dropout)
            self.obj_dis = Disentangler(dim, spec.disentangler_dropout)
        if spec.disentangler_stages == 2:
            self.attr_dis2 = Disentangler(dim, spec.disentangler_dropout)
            self.obj_dis2 = Disentangler(dim, spec.disentangler_dropout)
        self.cmt = (CrossModalTraction(dim, spec.cmt_layers, spec.cmt_dropout, spec.cmt_init_lambda)
                    if spec.cmt_layers > 0 else None)

    # -- text side ----------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> Tensor:
        return self.backbone.tokenize(texts, context_length=self.spec.context_length)

    def _mean_name_embeddings(self, names: list[str]) -> Tensor:
        ids = self._tokenize(names)  # [n, L]: SOT, BPE tokens..., EOT, pad
        emb = self.backbone.token_embedding(ids).float()
        eot = self.backbone.eot_index(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        inside = (pos >= 1) & (pos < eot[:, None])
        return (emb * inside[..., None]).sum(1) / inside.sum(1, keepdim=True).clamp_min(1)

    @property
    def logit_scale(self) -> float:
        return float(self.backbone.logit_scale)

    def _encode(self, template: Tensor, prefix: Tensor, slots: list[tuple[int, Tensor]], eot: int,
                normalize: bool = True, n: int | None = None) -> Tensor:
        n = slots[0][1].shape[0] if n is None else n
        emb = template.expand(n, -1, -1).clone()
        emb[:, 1 : 1 + self.spec.n_ctx] = prefix.to(emb.dtype)
        for position, rows in slots:
            emb[:, position] = rows.to(emb.dtype)
        eot_index = torch.full((n,), eot, dtype=torch.long, device=emb.device)
        out = self.backbone.encode_text_embeddings(emb, eot_index).float()
        return F.normalize(out, dim=-1) if normalize else out

    def text_features(self, pair_attr: Tensor, pair_obj: Tensor, raw: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """L2-normalised text features ``(comp [P, D], attr [|A|, D], obj [|O|, D])`` for the
        given pairs (``raw=True``: before normalisation; VP-CMJL's cross-attention keys).
        Vocabulary dropout applies in training mode (one mask for all prompts)."""
        norm = not raw
        vocab = self.vocab_dropout(self.vocabulary)
        a_rows, o_rows = vocab[: self.n_attrs], vocab[self.n_attrs :]
        comp = self._encode(self.comp_template, self.prefix[0],
                            [(self.comp_eot - 2, a_rows[pair_attr]), (self.comp_eot - 1, o_rows[pair_obj])],
                            self.comp_eot, norm)
        if self.spec.attr_row:
            attr = self._encode(self.prim_template, self.prefix[1], [(self.prim_eot - 1, a_rows)], self.prim_eot, norm)
        else:  # the prefix and the template's literal token only: one prompt, the same for every attribute
            attr = self._encode(self.prim_template, self.prefix[1], [], self.prim_eot, norm, n=1).expand(self.n_attrs, -1)
        obj = self._encode(self.prim_template, self.prefix[2], [(self.prim_eot - 1, o_rows)], self.prim_eot, norm)
        return comp, attr, obj

    # -- image side ---------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> BranchFeatures:
        cls, patches = self.backbone.encode_image_tokens(images)
        f = cls.float()
        tokens = torch.cat([f[:, None], patches.float()], 1) if self.cmt is not None else None
        if self.spec.disentangler_stages == 0:
            return BranchFeatures(f, tokens, f, f, f, f)
        a1, o1 = self.attr_dis(f), self.obj_dis(f)
        if self.spec.disentangler_stages == 2:
            a, o = self.attr_dis2(a1), self.obj_dis2(o1)
        else:
            a, o = a1, o1
        return BranchFeatures(f, tokens, a1, o1, a, o)

    # -- logits and score ---------------------------------------------------------------------
    def branch_logits(self, feats: BranchFeatures, text: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled cosine logits ``(s_c [B, P], s_a [B, |A|], s_o [B, |O|])``."""
        scale = self.logit_scale
        out = []
        for branch, (img, txt) in enumerate(zip((feats.image, feats.attr, feats.obj), text)):
            img = F.normalize(img, dim=-1)
            if self.cmt is None:
                out.append(scale * img @ txt.T)
            else:
                txt_b = self.cmt(txt, feats.tokens, branch)  # [B, N, D]
                out.append(scale * torch.einsum("bd,bnd->bn", img, txt_b))
        return out[0], out[1], out[2]

    @staticmethod
    def combine(s_c: Tensor, s_a: Tensor, s_o: Tensor, pair_attr: Tensor, pair_obj: Tensor) -> Tensor:
        """``s_c + softmax(s_a)[attr] * softmax(s_o)[obj]`` (raw composition logit, spec §1.3)."""
        return s_c + s_a.softmax(-1)[:, pair_attr] * s_o.softmax(-1)[:, pair_obj]

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def format_millions(n: int) -> str:
    """``8742912 -> '8.74 M'`` (how the paper's Table 10 states parameter counts)."""
    return f"{n / 1e6:.2f} M"


__all__ = [
    "ThreePathSpec", "ThreePathModel", "Disentangler", "CrossModalTraction", "BranchFeatures",
    "format_millions", "PROMPT_INIT", "CONTEXT_LENGTH",
]


# ============================================================================================
# The method plugin base shared by Troika, ClusPro and the ClusPro base
# ============================================================================================

from czsl_bench.config import at_least  # noqa: E402
from czsl_bench.method import Method, RunContext, TrainConfig  # noqa: E402


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
    # The released code steps StepLR twice per epoch (spec §3.6.5); 1 everywhere else.
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
